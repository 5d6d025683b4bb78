"""Pre-flight on the driver: every config and data problem at once, before MLflow or Ray."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from service.config import REPO_ROOT, ConfigError, load_config
from service.losses import LOSS_CLASSES, LOSS_NAMES, ContrastiveLoss
from service.train.preflight import config_problems, loss_problems, preflight

SMOKE = REPO_ROOT / "jobs" / "configs" / "smoke-cpu.yaml"


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _parquet(path: Path, images: list[bytes], labels: list[int] | None = None) -> str:
    columns = {"image": pa.array(images, pa.binary())}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_all_config_problems_are_reported_at_once_by_their_owners() -> None:
    config = load_config(SMOKE)
    config.loss.temperature = -1.0  # loss
    config.augment.strength = 3.0  # data (augmentation)
    config.model.width = 0  # models
    config.train.lr = -1.0  # train.optim
    config.train.micro_batch_size = 0  # train.gradcache
    problems = config_problems(config)
    joined = "\n".join(problems)
    for needle in ("loss.temperature", "augment.strength", "model.width", "train.lr",
                   "train.micro_batch_size"):  # fmt: skip
        assert needle in joined, joined
    with pytest.raises(ConfigError, match="problems:"):
        preflight(config, data=False)


def test_choice_fields_are_checked_with_the_types_all_at_once() -> None:
    # A config changed in code after loading: its changes are checked again, the types (choice
    # fields are Literal types) first, every one of them at once.
    config = load_config(SMOKE)
    config.model.arch = "vit"
    config.train.optimizer = "adam"
    config.train.amp = "fp8"
    config.data.reader = "spark"
    config.train.placement_strategy = "RANDOM"
    config.mlflow.champion_metric = "accuracy"
    assert config_problems(config) == [
        "data.reader must be one of torch|ray, got 'spark'",
        "model.arch must be one of small_cnn|resnet18|resnet50, got 'vit'",
        "train.placement_strategy must be one of PACK|SPREAD|STRICT_SPREAD|STRICT_PACK, "
        "got 'RANDOM'",
        "train.optimizer must be one of adamw|sgd|lars, got 'adam'",
        "train.amp must be one of auto|bf16|fp16|off, got 'fp8'",
        "mlflow.champion_metric must be one of knn_top1|train_loss|val_zeroshot_top1|"
        "val_i2t_recall_at_5|val_t2i_recall_at_5, got 'accuracy'",
    ]
    with pytest.raises(ConfigError, match="6 problems:"):
        preflight(config, data=False)


def test_each_check_runs_once_per_config(monkeypatch) -> None:
    import service.train.preflight as pre

    calls = {"rules": 0, "data": 0}
    rules, data = pre.config_problems, pre.data_problems

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(pre, "config_problems", counting("rules", rules))
    monkeypatch.setattr(pre, "data_problems", counting("data", data))
    config = pre.load_checked_config(str(SMOKE))  # what every command starts from
    assert config.is_checked("config") and config.is_checked("rules")
    assert not config.is_checked("data")
    preflight(config)  # the driver's / the sweep's: the data only
    preflight(config)  # and then nothing
    assert calls == {"rules": 1, "data": 1}
    config.loss.temperature = 0.3  # a change voids the marks: checked again, all of it
    preflight(config)
    assert calls == {"rules": 2, "data": 2}
    library = load_config(SMOKE)  # loaded (types checked), the owners' rules not yet
    preflight(library, data=False)
    assert calls == {"rules": 3, "data": 2}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.epochs=abc", "train.epochs must be an integer, got 'abc'"),
        ("data.limit=0", "data.limit must be >= 1"),
        ("loss.name=arcface", "'arcface'"),
        ("loss.learnable_temperature=true", "learnable_temperature"),
        ("loss.chunk_size=16", None),  # ntxent supports chunking: no problem
    ],
)
def test_module_rules_from_overrides(override: str, needle: str | None) -> None:
    try:
        config = load_config(SMOKE, [override])
        problems = config_problems(config)
    except ConfigError as exc:
        problems = [str(exc)]
    if needle is None:
        assert problems == []
    else:
        assert any(needle in p for p in problems), problems


def test_debiased_needs_two_views_and_moco_two_views() -> None:
    for name in ("debiased", "moco", "symmetric"):
        config = load_config(SMOKE, [f"loss.name={name}", "augment.n_views=3"])
        assert any("views" in p for p in config_problems(config)), name


def test_champion_metric_must_be_measured() -> None:
    config = load_config(SMOKE, ["data.val=null", "data.val_fraction=0"])
    assert any("champion_metric" in p for p in config_problems(config))
    config = load_config(SMOKE, ["data.val_fraction=0", "mlflow.champion_metric=train_loss"])
    assert config_problems(config) == []


def test_data_problems_name_the_file_and_fix(tmp_path: Path) -> None:
    good = [_jpeg((i * 20, 0, 0)) for i in range(8)]
    config = load_config(SMOKE)
    config.data.train = str(tmp_path / "missing.parquet")
    config.data.val = _parquet(tmp_path / "nolabel.parquet", good)
    config.data.test = _parquet(tmp_path / "corrupt.parquet", [b"junk"] * 8, [0] * 8)
    with pytest.raises(ConfigError) as info:
        preflight(config)
    message = str(info.value)
    assert "3 problems" in message, message
    assert "missing.parquet" in message
    assert "nolabel.parquet" in message and "'label'" in message
    assert "corrupt.parquet" in message and "none of the first 8 images decode" in message

    wrong = str(tmp_path / "wrong.parquet")
    pq.write_table(pa.table({"pixels": pa.array([1, 2], pa.int64())}), wrong)
    config = load_config(SMOKE, [f"data.train={wrong}", "data.val=null", "data.test=null",
                                 "mlflow.champion_metric=train_loss"])  # fmt: skip
    with pytest.raises(ConfigError, match="no 'image' column"):
        preflight(config)


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(empty)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_cli_bad_input_exits_2_without_traceback_and_touches_nothing(tmp_path: Path) -> None:
    store = tmp_path / "mlruns.db"
    sets = ["--set", f"mlflow.tracking_uri=sqlite:///{store}",
            "--set", f"train.storage_path={tmp_path / 'ray'}"]  # fmt: skip
    runs = [
        ("pretrain", "--config", str(SMOKE), *sets, "--set", "data.train=/nonexistent.parquet",
         "--set", "train.epochs=2"),
        ("pretrain", "--config", str(SMOKE), *sets, "--set", "train.epochs=abc"),
        ("pretrain", "--config", str(tmp_path / "nope.yaml")),
        ("evaluate", "--checkpoint", "/nonexistent", "--train", "x", "--test", "y"),
    ]  # fmt: skip
    for args in runs:
        result = _cli(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().startswith("contrastive:"), result.stderr
    assert not store.exists() and not (tmp_path / "ray").exists()
    assert not (tmp_path / "mlruns").exists()
    debug = _cli("--debug", *runs[1], cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_label_losses_need_a_label_column_in_the_training_data(tmp_path: Path) -> None:
    unlabelled = _parquet(
        tmp_path / "unlabelled.parquet", [_jpeg((i * 8, 0, 0)) for i in range(300)]
    )
    keys = [f"data.train={unlabelled}", "data.val_fraction=0", "data.test=null",
            "mlflow.champion_metric=train_loss"]  # fmt: skip
    preflight(load_config(SMOKE, keys))  # self-supervised: labels are not needed
    with pytest.raises(ConfigError, match="loss.name='supcon' trains on"):
        preflight(load_config(SMOKE, [*keys, "loss.name=supcon"]))


def test_text_mode_loss_rule_is_reported_once() -> None:
    config = load_config(SMOKE, ["text.column=text", "loss.name=ntxent",
                                 "mlflow.champion_metric=train_loss"])  # fmt: skip
    problems = [p for p in config_problems(config) if "ntxent" in p]
    assert len(problems) == 1 and "symmetric|siglip" in problems[0], problems


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_problems_build_no_loss(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pre-flight asks the loss's class for its rules; the worker's constructor is the only other
    # check of loss.temperature. Any construction here would raise.
    def no_construction(self, *args, **kwargs) -> None:
        raise AssertionError(f"pre-flight built a {type(self).__name__}")

    monkeypatch.setattr(ContrastiveLoss, "__init__", no_construction)
    config = load_config(SMOKE, [f"loss.name={name}", "augment.n_views=2"])
    assert loss_problems(config) == []
    key = "loss.margin" if LOSS_CLASSES[name].uses_margin else "loss.temperature"
    setattr(config.loss, key.split(".")[1], -1.0)
    assert loss_problems(config) == [f"{key} must be > 0 and finite, got -1.0"]


def test_per_worker_batch_of_one_needs_negatives_from_elsewhere() -> None:
    keys = ["train.global_batch_size=2", "train.num_workers=2"]
    assert loss_problems(load_config(SMOKE, [*keys, "loss.name=moco"])) == []
    problems = loss_problems(load_config(SMOKE, keys))
    assert problems == ["per-worker batch 1 is too small for in-batch negatives"]
