"""Pre-flight on the driver: every config and data problem at once, before MLflow or Ray."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from service.config import BUNDLED_DATA_DIR, REPO_ROOT, ConfigError, load_config
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


# --- which splits go together: the test split's classes, validation apart from training --------

BUNDLED_TEST = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _named(path: Path, names: list[str], rows: int = 300) -> str:
    """A labelled Parquet file whose label i is called names[i]."""
    labels = [i % len(names) for i in range(rows)]
    pq.write_table(
        pa.table({
            "image": pa.array([_jpeg((i % 250, 0, 0)) for i in range(rows)], pa.binary()),
            "label": pa.array(labels, pa.int64()),
            "label_name": pa.array([names[k] for k in labels], pa.string()),
        }),
        path,
    )  # fmt: skip
    return str(path)


def test_the_bundled_test_split_is_refused_beside_other_training_data(tmp_path: Path) -> None:
    mine = _named(tmp_path / "mine.parquet", ["cat", "dog"])
    with pytest.raises(ConfigError) as info:
        preflight(load_config(SMOKE, [f"data.train={mine}"]))
    message = str(info.value)
    assert "1 problem" in message or "problems" not in message, message
    assert mine in message and str(BUNDLED_TEST) in message, message
    assert "--set data.test=" in message and "data.test=null" in message, message
    # CIFAR-10's class names under other label ids are other classes for kNN and the probe.
    relabelled = _named(tmp_path / "relabelled.parquet", CIFAR10[::-1])
    with pytest.raises(ConfigError, match="data.test"):
        preflight(load_config(SMOKE, [f"data.train={relabelled}"]))
    # Said explicitly, either way, it is the user's choice.
    preflight(load_config(SMOKE, [f"data.train={mine}", "data.test=null"]))
    own_test = _named(tmp_path / "mine-test.parquet", ["cat", "dog"], rows=40)
    preflight(load_config(SMOKE, [f"data.train={mine}", f"data.test={own_test}"]))


def test_the_bundled_test_split_stays_beside_cifar10_training_data(tmp_path: Path) -> None:
    from service.data.checks import data_problems

    trains = [
        BUNDLED_DATA_DIR / "cifar10-train-subset.parquet",  # the default
        BUNDLED_DATA_DIR / "cifar10-train-captions.parquet",
        _named(tmp_path / "copy.parquet", CIFAR10),  # a CIFAR-10 of one's own, same classes
    ]
    full = REPO_ROOT.parent / "shared" / "data" / "cifar10-train.parquet"
    trains += [full] if full.exists() else []
    for train in trains:
        config = load_config(SMOKE, [f"data.train={train}"])
        assert config.data.test == str(BUNDLED_TEST)
        assert data_problems(config) == [], train


def test_validation_data_must_not_be_training_data(tmp_path: Path) -> None:
    train = str(BUNDLED_DATA_DIR / "cifar10-train-subset.parquet")
    with pytest.raises(ConfigError) as info:
        preflight(load_config(SMOKE, [f"data.val={train}"]))
    message = str(info.value)
    assert "data.val" in message and "data.train" in message and "own neighbour" in message
    # The same file through another name, or inside a training directory, is the same file.
    link = tmp_path / "link.parquet"
    link.symlink_to(train)
    with pytest.raises(ConfigError, match="own neighbour"):
        preflight(load_config(SMOKE, [f"data.val={link}"]))
    folder = tmp_path / "parts"
    folder.mkdir()
    a = _named(folder / "a.parquet", CIFAR10)
    _named(folder / "b.parquet", CIFAR10)
    keys = [f"data.train={folder}", "data.test=null"]
    with pytest.raises(ConfigError, match=r"a\.parquet"):
        preflight(load_config(SMOKE, [*keys, f"data.val={a}"]))
    other = _named(tmp_path / "held-out.parquet", CIFAR10, rows=40)
    preflight(load_config(SMOKE, [*keys, f"data.val={other}"]))


# --- what an embedded Ray can hold, known before it starts ------------------------------------


def test_an_embedded_ray_is_sized_to_this_machine_and_checked_before_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.train.driver import check_local_fits, local_cpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = local_cpus()
    assert 1 <= cpus <= (os.cpu_count() or 1)
    keys = ["train.num_workers=1", f"train.cpus_per_worker={cpus}", "train.global_batch_size=32"]
    check_local_fits(load_config(SMOKE, keys), address=None)  # the whole machine, one trial
    with pytest.raises(ConfigError, match=rf"2 trial\(s\) x 1 workers x {cpus:g} CPUs = "):
        check_local_fits(load_config(SMOKE, keys), address=None, trials=2)
    ray_reader = load_config(SMOKE, [*keys, "data.reader=ray"])  # its map tasks need a CPU
    with pytest.raises(ConfigError, match="data.reader=ray needs at least one CPU"):
        check_local_fits(ray_reader, address=None)
    check_local_fits(ray_reader, address="127.0.0.1:6379")  # a cluster: checked once connected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpus_this_machine_lacks_are_refused_before_an_embedded_ray_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.train.driver import check_local_fits

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"train.use_gpu=true.*set train.use_gpu=false"):
        check_local_fits(load_config(SMOKE, ["train.use_gpu=true"]), address=None)
    check_local_fits(load_config(SMOKE, ["train.use_gpu=true"]), address="10.0.0.1:6379")


TOO_MANY = 128  # workers: divides the smoke batch of 256, more CPUs than a CI machine has


@pytest.mark.parametrize(
    ("command", "override", "needle"),
    [
        ("pretrain", f"train.num_workers={TOO_MANY}", f"{TOO_MANY} CPUs needed"),
        ("pretrain", "train.use_gpu=true", "train.use_gpu=true"),
        ("tune", f"train.num_workers={TOO_MANY}", f"{TOO_MANY} CPUs needed"),
    ],
)
def test_what_this_machine_cannot_run_exits_2_in_one_line_and_leaves_nothing(
    tmp_path: Path, command: str, override: str, needle: str
) -> None:
    if (os.cpu_count() or 1) >= TOO_MANY or ("gpu" in override and torch.cuda.is_available()):
        pytest.skip("this machine could run it")
    config = SMOKE if command == "pretrain" else REPO_ROOT / "jobs" / "configs" / "tune-smoke.yaml"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", command, "--config", str(config), "--set", override,
         "--set", f"train.storage_path={tmp_path / 'runs'}",
         "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert needle in proc.stderr and "starting a local Ray" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be left behind"
