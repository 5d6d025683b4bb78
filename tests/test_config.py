"""The typed config: YAML + overrides, validation errors that name the key and value."""

from pathlib import Path

import pytest

from service.config import REPO_ROOT, ConfigError, load_config

CONFIGS = sorted((REPO_ROOT / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.train.global_batch_size % config.train.num_workers == 0


def test_overrides_are_typed_and_applied() -> None:
    config = load_config(
        REPO_ROOT / "jobs/configs/smoke-cpu.yaml",
        ["loss.temperature=0.3", "train.num_workers=4", "augment.strength=1", "loss.chunk_size=64"],
    )
    assert config.loss.temperature == 0.3
    assert config.train.num_workers == 4
    assert isinstance(config.augment.strength, float) and config.augment.strength == 1.0
    assert config.per_worker_batch_size == config.train.global_batch_size // 4
    assert config.flat()["loss.chunk_size"] == 64


def test_resolved_config_round_trips() -> None:
    from service.config import config_from_dict

    config = load_config(REPO_ROOT / "jobs/configs/smoke-cpu.yaml")
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.global_batch_size=100", "does not divide by"),
        ("loss.temperature=0", "loss.temperature must be > 0 and finite, got 0"),
        ("loss.temperature=-0.5", "got -0.5"),
        ("loss.name=arcface", "'arcface'"),
        ("augment.n_views=1", "augment.n_views must be >= 2"),
        ("model.arch=vit", "'vit'"),
        ("train.bogus=1", "train.bogus"),
        ("data.reader=spark", "'spark'"),
        ("augment.min_scale=0", "augment.min_scale"),
        ("augment.crop_size=4", "augment.crop_size must be >= 8 px"),
        ("model.width=0", "model.width must be >= 1"),
    ],
)
def test_bad_values_are_named(override: str, needle: str) -> None:
    from service.train.preflight import preflight

    overrides = ["train.num_workers=3", override] if "divide" in needle else [override]
    with pytest.raises(ConfigError, match=None) as info:  # the config's rules, then its owners'
        preflight(load_config(REPO_ROOT / "jobs/configs/smoke-cpu.yaml", overrides), data=False)
    assert needle in str(info.value)


def test_override_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["loss.temperature"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_relative_data_paths_resolve_against_repo_root(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.train=service/data/bundled/cifar10-train-subset.parquet"])
    assert Path(config.data.train).is_absolute() and Path(config.data.train).exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_pass_every_owners_rules(path: Path) -> None:
    # Not only the types: the loss/model/data/optimiser rules, and the sweep settings of a sweep.
    from service.train.preflight import preflight
    from service.tune.settings import resolve_settings

    config = load_config(path)
    preflight(config, data=False)
    if "tune" in path.read_text():
        resolve_settings(config)


# --- choice fields: Literal types, checked generically -----------------------------------------

CHOICES = [
    ("data.reader", "torch|ray"),
    ("data.augment_device", "auto|cpu|cuda"),
    ("augment.backend", "torchvision|batched"),
    ("model.arch", "small_cnn|resnet18|resnet50"),
    ("train.optimizer", "adamw|sgd|lars"),
    ("train.lr_scaling", "linear|sqrt|none"),
    ("train.amp", "auto|bf16|fp16|off"),
    ("train.placement_strategy", "PACK|SPREAD|STRICT_SPREAD|STRICT_PACK"),
    ("tune.search", "random|optuna"),
    ("tune.mode", "min|max"),
]


@pytest.mark.parametrize(("key", "allowed"), CHOICES)
def test_choice_fields_name_their_values(key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}=x"])
    assert str(info.value) == f"{key} must be one of {allowed}, got 'x'"
    for value in allowed.split("|"):
        assert load_config(None, {key: value}).flat()[key] == value


def test_every_bad_choice_at_once_and_a_number_is_no_choice() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.reader=spark", "model.arch=3", "train.epochs=abc"])
    assert str(info.value).splitlines()[1:] == [
        "  - data.reader must be one of torch|ray, got 'spark'",
        "  - model.arch must be one of small_cnn|resnet18|resnet50, got 3",
        "  - train.epochs must be an integer, got 'abc'",
    ]


def test_owners_lists_are_the_literals() -> None:
    from typing import get_args

    from service.config import Arch, ChampionMetric
    from service.eval.image_text import CHAMPION_METRICS as IMAGE_TEXT_CHAMPIONS
    from service.models import BACKBONES
    from service.train.amp import AMP_MODES
    from service.train.preflight import CHAMPION_METRICS
    from service.tune.settings import SEARCHERS

    assert tuple(BACKBONES) == get_args(Arch)  # every name builds, every backbone is allowed
    assert tuple(CHAMPION_METRICS) == get_args(ChampionMetric)
    assert set(IMAGE_TEXT_CHAMPIONS) <= set(CHAMPION_METRICS)
    assert AMP_MODES == ("auto", "bf16", "fp16", "off") and SEARCHERS == ("random", "optuna")


# --- Config.with_values: sampled values on the typed config ------------------------------------


def test_with_values_coerces_checks_and_copies() -> None:
    base = load_config(REPO_ROOT / "jobs/configs/smoke-cpu.yaml")
    trial = base.with_values({"loss.temperature": "1e-1", "augment.mean": [0.5, 0.5, 0.5]})
    assert trial.loss.temperature == 0.1 and isinstance(trial.loss.temperature, float)
    assert trial.augment.mean == [0.5, 0.5, 0.5]
    assert base.loss.temperature != 0.1 and base.augment.mean != [0.5, 0.5, 0.5]  # untouched
    assert trial.is_checked("config")  # the base was checked, and the changes just now
    assert trial == base.with_values({"loss.temperature": 0.1, "augment.mean": [0.5] * 3})
    with pytest.raises(ConfigError, match="train.optimizer must be one of adamw|sgd|lars"):
        base.with_values({"train.optimizer": "adam"})
    with pytest.raises(ConfigError, match="does not divide by"):  # the run's shape, too
        base.with_values({"train.global_batch_size": 7})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['loss.tau'\]"):
        base.with_values({"loss.tau": 0.1})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['losses.temperature'\]"):
        base.with_values({"losses.temperature": 0.1})


def test_checked_marks_follow_the_content() -> None:
    from service.config import Config

    config = load_config(None)
    assert config.is_checked("config") and not config.is_checked("rules")
    config.mark_checked("rules", "data")
    assert all(config.is_checked(s) for s in ("config", "rules", "data"))
    config.train.epochs += 1
    assert not any(config.is_checked(s) for s in ("config", "rules", "data"))
    assert not Config().is_checked("config")  # built in code: nothing checked yet
