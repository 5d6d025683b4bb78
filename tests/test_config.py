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
