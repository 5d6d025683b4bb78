"""One typed configuration for every job: YAML files + ``--set key=value`` overrides.

Every hyperparameter lives here, visible in one place. Jobs load a YAML file from
``jobs/configs/``, apply dotted overrides (``--set loss.temperature=0.2``), validate, and save the
resolved config with the run. Unknown keys are an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DATA_DIR = REPO_ROOT / "service" / "data" / "bundled"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the offending value."""


@dataclass
class DataConfig:
    train: str = str(BUNDLED_DATA_DIR / "cifar10-train-subset.parquet")
    val: str | None = str(BUNDLED_DATA_DIR / "cifar10-test-subset.parquet")
    test: str | None = str(BUNDLED_DATA_DIR / "cifar10-test-subset.parquet")
    reader: str = "torch"  # "torch" (DataLoader + DistributedSampler) or "ray" (Ray Data shards)
    image_size: int = 32
    loader_workers: int = 0  # DataLoader worker processes per Ray Train worker
    max_bad_fraction: float = 0.01  # corrupt images above this fraction of a dataset → error
    limit: int | None = None  # use only the first N rows (after a seeded shuffle); for smoke runs


@dataclass
class AugmentConfig:
    strength: float = 1.0  # SimCLR colour-jitter strength s (0.8s, 0.8s, 0.8s, 0.2s)
    min_scale: float = 0.2  # RandomResizedCrop lower scale bound (0.08 on ImageNet, 0.2 for CIFAR)
    n_views: int = 2
    blur: bool = False  # GaussianBlur: on for ImageNet-size images, off at 32 px
    grayscale_p: float = 0.2
    jitter_p: float = 0.8
    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: list[float] = field(default_factory=lambda: [0.2470, 0.2435, 0.2616])


@dataclass
class ModelConfig:
    arch: str = "small_cnn"  # small_cnn | resnet18 | resnet50
    cifar_stem: bool = True  # 3x3 conv stem without max-pool for 32 px inputs
    proj_hidden_dim: int = 512
    proj_out_dim: int = 128
    proj_layers: int = 2
    proj_batch_norm: bool = True
    sync_batchnorm: bool = False
    channels_last: bool = False


@dataclass
class LossConfig:
    name: str = "ntxent"  # ntxent | symmetric | moco | hard_negative | debiased
    temperature: float = 0.5
    learnable_temperature: bool = False
    chunk_size: int | None = None  # memory-bounded mode: never builds the full B x B logits
    top_k: int = 64  # hard_negative: keep only the k most similar negatives
    tau_plus: float = 0.1  # debiased: class prior of false negatives (Chuang et al. 2020)
    moco_momentum: float = 0.99
    moco_queue_size: int = 4096


@dataclass
class TrainConfig:
    epochs: int = 2
    global_batch_size: int = 128
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD (one worker per node)
    optimizer: str = "adamw"  # adamw | sgd | lars
    lr: float = 1e-3  # base LR; the effective LR is scaled with the global batch (lr_scaling)
    lr_scaling: str = "linear"  # linear: lr*B/256 | sqrt: lr*sqrt(B/256) | none
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    grad_clip_norm: float | None = 1.0
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    seed: int = 0
    log_every_steps: int = 10
    checkpoint_every_epochs: int = 1
    max_failures: int = 0
    run_name: str = "contrastive-pretrain"
    storage_path: str = str(Path.home() / "ray_results")
    # Continue the run storage_path/run_name (same MLflow run) instead of starting a new one;
    # refused when a key that changes what is trained differs (service/train/identity.py).
    resume: bool = False
    # Cached-gradient steps (service/train/gradcache.py): each worker embeds its local batch in
    # micro-batches of this many samples (all views together) without a graph, computes the loss
    # over the global batch once, then replays each micro-batch with a graph; same loss and
    # gradients as the plain step for models without batch statistics, memory bounded by the
    # micro-batch. BatchNorm: each micro-batch is normalised by its own statistics (SyncBN: over
    # the k-th micro-batches of all ranks) in both passes; running stats update once per sample.
    # null or >= the per-worker batch: the plain step.
    micro_batch_size: int | None = None


@dataclass
class EvalConfig:
    knn_every_epochs: int = 1
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_max_train: int | None = None
    linear_epochs: int = 30
    linear_lr: float = 1e-2


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None → $MLFLOW_TRACKING_URI or a local SQLite store
    experiment: str = "contrastive-pretrain"
    registered_model_name: str | None = "contrastive-encoder"
    champion_metric: str = "knn_top1"
    enabled: bool = True


@dataclass
class TuneConfig:
    num_samples: int = 4
    search: str = "random"  # random | optuna
    metric: str = "knn_top1"
    mode: str = "max"
    max_concurrent_trials: int = 1
    grace_period_epochs: int = 1
    reduction_factor: int = 2
    # search space: dotted config key → {"type": loguniform|uniform|choice, "low", "high", "values"}
    space: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "loss.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0},
            "augment.strength": {"type": "uniform", "low": 0.25, "high": 1.5},
        }
    )


@dataclass
class FaultConfig:
    """Fault injection for tests of recovery (off by default)."""

    kill_rank: int | None = None  # SIGKILL this rank's worker process once, at global step at_step
    at_step: int | None = None
    nan_at_step: int | None = None  # make the loss NaN at this global step (divergence drill)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @property
    def per_worker_batch_size(self) -> int:
        return self.train.global_batch_size // self.train.num_workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys → values, e.g. {"loss.temperature": 0.5}; used for MLflow params."""
        return flatten(self.to_dict())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "space":
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    """Instantiate a (nested) dataclass from a dict, rejecting unknown keys with their path."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key(s) {[where + k for k in unknown]}; known: {sorted(known)}"
        )
    kwargs = {}
    for name, value in values.items():
        f = known[name]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(type(sub), value, f"{path}.{name}" if path else name)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``dotted == "a.b"``, creating mappings on the way."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.temperature=0.2"`` → ``("loss.temperature", 0.2)``; values parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. loss.temperature=0.2")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides, validate and return it."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
            path = REPO_ROOT / path  # shipped configs work from any working directory
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
    items = (
        overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    )
    for key, value in items:
        set_dotted(tree, key, value)
    config = _build(Config, tree, "")
    _coerce_types(config)
    _resolve_local_paths(config)
    validate(config)
    return config


def _resolve_local_paths(config: Config) -> None:
    """Make relative data paths absolute (cwd first, then the repo root), so Ray workers and
    ``ray job submit`` working-dir copies see the same files. URIs (s3://, gs://) are kept."""
    d = config.data
    for name in ("train", "val", "test"):
        value = getattr(d, name)
        if not value or "://" in value or Path(value).is_absolute():
            continue
        candidates = [Path.cwd() / value, REPO_ROOT / value]
        found = next((c for c in candidates if c.exists() or any(c.parent.glob(c.name))), None)
        setattr(d, name, str((found or candidates[0]).resolve()))


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. inside a Ray worker)."""
    config = _build(Config, tree, "")
    _coerce_types(config)
    validate(config)
    return config


def _coerce_types(config: Config) -> None:
    """YAML gives ints for 1 and strings for 1e-3 in some spellings; coerce to the field types."""
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        hints = {f.name: f.type for f in dataclasses.fields(obj)}
        for name, hint in hints.items():
            value = getattr(obj, name)
            if value is None:
                continue
            hint = str(hint)
            try:
                if hint.startswith("float") and not isinstance(value, bool):
                    setattr(obj, name, float(value))
                elif hint.startswith("int") and isinstance(value, float) and value.is_integer():
                    setattr(obj, name, int(value))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{section.name}.{name}: {value!r} is not a number") from exc


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Reject values that would fail later (or silently train wrong), naming key and value."""
    t, lo, au, m, d = config.train, config.loss, config.augment, config.model, config.data
    _require(t.num_workers >= 1, f"train.num_workers must be >= 1, got {t.num_workers}")
    _require(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _require(
        t.global_batch_size >= 2, f"train.global_batch_size must be >= 2, got {t.global_batch_size}"
    )
    _require(
        t.global_batch_size % t.num_workers == 0,
        f"train.global_batch_size={t.global_batch_size} does not divide by "
        f"train.num_workers={t.num_workers}; choose a multiple of {t.num_workers} "
        f"(e.g. {t.global_batch_size - t.global_batch_size % t.num_workers or t.num_workers})",
    )
    _require(
        config.per_worker_batch_size >= 2 or lo.name == "moco",
        f"per-worker batch {config.per_worker_batch_size} is too small for in-batch negatives",
    )
    _require(t.lr > 0 and math.isfinite(t.lr), f"train.lr must be > 0, got {t.lr}")
    _require(
        t.optimizer in {"adamw", "sgd", "lars"},
        f"train.optimizer must be adamw|sgd|lars, got {t.optimizer!r}",
    )
    _require(
        t.placement_strategy in {"PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"},
        f"train.placement_strategy must be PACK|SPREAD|STRICT_SPREAD|STRICT_PACK, "
        f"got {t.placement_strategy!r}",
    )
    _require(
        t.lr_scaling in {"linear", "sqrt", "none"},
        f"train.lr_scaling must be linear|sqrt|none, got {t.lr_scaling!r}",
    )
    _require(
        t.amp in {"auto", "bf16", "fp16", "off"},
        f"train.amp must be auto|bf16|fp16|off, got {t.amp!r}",
    )
    _require(
        lo.temperature > 0 and math.isfinite(lo.temperature),
        f"loss.temperature must be > 0, got {lo.temperature}",
    )
    _require(
        lo.name in {"ntxent", "symmetric", "moco", "hard_negative", "debiased"},
        f"loss.name must be ntxent|symmetric|moco|hard_negative|debiased, got {lo.name!r}",
    )
    _require(
        lo.chunk_size is None or lo.chunk_size >= 1,
        f"loss.chunk_size must be >= 1 or null, got {lo.chunk_size}",
    )
    _require(
        0 <= lo.moco_momentum < 1, f"loss.moco_momentum must be in [0, 1), got {lo.moco_momentum}"
    )
    _require(au.n_views >= 2, f"augment.n_views must be >= 2, got {au.n_views}")
    _require(au.strength >= 0, f"augment.strength must be >= 0, got {au.strength}")
    _require(0 < au.min_scale <= 1, f"augment.min_scale must be in (0, 1], got {au.min_scale}")
    _require(
        lo.name not in {"symmetric", "moco"} or au.n_views == 2,
        f"loss.name={lo.name!r} uses exactly 2 views; got augment.n_views={au.n_views}",
    )
    _require(d.reader in {"torch", "ray"}, f"data.reader must be torch|ray, got {d.reader!r}")
    _require(d.image_size >= 8, f"data.image_size must be >= 8, got {d.image_size}")
    _require(
        0 <= d.max_bad_fraction <= 1,
        f"data.max_bad_fraction must be in [0, 1], got {d.max_bad_fraction}",
    )
    _require(
        m.arch in {"small_cnn", "resnet18", "resnet50"},
        f"model.arch must be small_cnn|resnet18|resnet50, got {m.arch!r}",
    )
