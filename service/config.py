"""One typed configuration for every job: YAML files + ``--set key=value`` overrides.

Every hyperparameter lives here, visible in one place. Jobs load a YAML file from
``jobs/configs/``, apply dotted overrides (``--set loss.temperature=0.2``), validate, and save the
resolved config with the run. Unknown keys are an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
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
    # Validation (kNN monitor, Tune, champion alias): this file, or when null a seeded
    # val_fraction of the training rows, held out from training. Test: the final number only.
    val: str | None = None
    val_fraction: float = 0.1
    test: str | None = str(BUNDLED_DATA_DIR / "cifar10-test-subset.parquet")
    reader: str = "torch"  # "torch" (DataLoader + DistributedSampler) or "ray" (Ray Data shards)
    image_size: int = 32
    loader_workers: int = 0  # DataLoader worker processes per Ray Train worker
    max_bad_fraction: float = 0.01  # corrupt images above this fraction of a dataset → error
    limit: int | None = None  # use only the first N rows (after a seeded shuffle); for smoke runs
    # Where augment.backend=batched augments: "cuda" when the worker has a GPU (auto), or forced.
    augment_device: str = "auto"  # auto | cpu | cuda
    # Decode once on the driver and share one read-only copy through Ray's object store with
    # every rank (and every concurrent Tune trial); false: each rank decodes its own copy.
    share_decoded: bool = True

    @property
    def has_val(self) -> bool:
        """Whether there is a validation split (a file, or rows held out from ``train``)."""
        return bool(self.val) or self.val_fraction > 0


@dataclass
class AugmentConfig:
    strength: float = 1.0  # SimCLR colour-jitter strength s (0.8s, 0.8s, 0.8s, 0.2s)
    min_scale: float = 0.2  # RandomResizedCrop lower scale bound (0.08 on ImageNet, 0.2 for CIFAR)
    n_views: int = 2
    # Side of the training views (RandomResizedCrop output); None = data.image_size. Smaller views
    # train faster (conv cost ~ pixels: 16 px is ~3x cheaper than 32 px on CPU); evaluation and
    # the registered encoder still see data.image_size (the backbone pools globally).
    crop_size: int | None = None
    blur: bool = False  # GaussianBlur: on for ImageNet-size images, off at 32 px
    grayscale_p: float = 0.2
    jitter_p: float = 0.8
    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: list[float] = field(default_factory=lambda: [0.2470, 0.2435, 0.2616])
    # "batched" (default; ~19x the images per CPU-second, smoke kNN 0.398 vs 0.358, see
    # docs/benchmarks.md): decoded uint8 batches augmented at once on data.augment_device
    # (service/data/batch_augment.py); "torchvision": the per-image PIL pipeline (the reference).
    backend: str = "batched"


@dataclass
class ModelConfig:
    arch: str = "small_cnn"  # small_cnn | resnet18 | resnet50
    cifar_stem: bool = True  # 3x3 conv stem without max-pool for 32 px inputs
    width: int = 32  # small_cnn: channels of the first stage (stages w, 2w, 4w, 8w)
    proj_hidden_dim: int = 512
    proj_out_dim: int = 128
    proj_layers: int = 2
    proj_batch_norm: bool = True
    sync_batchnorm: bool = False
    channels_last: bool = False


@dataclass
class LossConfig:
    # ntxent | symmetric | moco | hard_negative | debiased | supcon | triplet | pairwise | siglip
    name: str = "ntxent"
    temperature: float = 0.5
    learnable_temperature: bool = False
    chunk_size: int | None = None  # memory-bounded mode: never builds the full B x B logits
    top_k: int = 64  # hard_negative: keep only the k most similar negatives
    tau_plus: float = 0.1  # debiased: class prior of false negatives (Chuang et al. 2020)
    moco_momentum: float = 0.99
    moco_queue_size: int = 4096
    # triplet / pairwise: distance margin between L2-normalised embeddings (distances in [0, 2]);
    # null: the loss's default (triplet 0.2, pairwise 1.0)
    margin: float | None = None
    siglip_bias_init: float = -10.0  # siglip: initial logit bias b (Zhai et al. 2023)


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
    # Time-budgeted training (docs/training.md): train for this many minutes of *training* time
    # (monitor evaluation and checkpointing excluded) and lay the LR schedule over the budget;
    # train.epochs is then an upper bound (set it high). null: train for train.epochs.
    time_budget_minutes: float | None = None
    # With a time budget: linear LR warmup over this fraction of the budget (warmup_epochs is not
    # used then: epochs are not the schedule's unit; the worker says so when it is set).
    warmup_fraction: float = 0.0


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
    # Under train.time_budget_minutes ASHA's rungs are training minutes, not epochs (trials reach
    # an epoch after different training times); the first rung, default budget / factor**2.
    grace_period_minutes: float | None = None
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
    # every rank waits before this (1-based) epoch until <run_dir>/faults/go exists (outage drill)
    pause_before_epoch: int | None = None


@dataclass
class TextConfig:
    """Image–text (CLIP-style) mode: set ``column`` to the caption column of the Parquet files."""

    column: str | None = None  # None → image-only training; set → image–text mode
    context_length: int = 32  # tokens per caption (end-of-text included; padded with 0)
    vocab_size: int = 2048  # byte-level BPE fitted on the training captions (service/text)
    width: int = 128  # text Transformer width
    layers: int = 3
    heads: int = 4
    class_name_column: str = "label_name"  # zero-shot: class names from this column
    # Zero-shot prompts: each class name is put into every template and the embeddings averaged.
    templates: list[str] = field(
        default_factory=lambda: [
            "a photo of a {}.",
            "a blurry photo of a {}.",
            "a low resolution photo of the {}.",
            "a close-up photo of a {}.",
            "a photo of the small {}.",
            "itap of a {}.",
        ]
    )


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
    text: TextConfig = field(default_factory=TextConfig)

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
        tree = _read_yaml(path)
    items = (
        overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    )
    for key, value in items:
        set_dotted(tree, key, value)
    config = _build(Config, tree, "")
    validate(config)
    _resolve_local_paths(config)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    """The config file's mapping; a missing, empty or invalid file is named with the line."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if tree is None:
        raise ConfigError(
            f"config file {path} is empty; start from a shipped one, e.g. "
            f"jobs/configs/smoke-cpu.yaml, or omit --config for the defaults"
        )
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {tree!r}")
    return tree


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
    validate(config)
    return config


_NUMBER_TYPES = {"int": (int,), "float": (int, float)}


def _type_problem(key: str, hint: str, value: Any) -> str | None:
    """``None`` when ``value`` fits the field's annotation (as a string, e.g. ``int | None``)."""
    base, optional = hint.split(" | ")[0], hint.endswith("| None")
    if value is None:
        return None if optional else f"{key} must not be null"
    if base in _NUMBER_TYPES:
        ok = isinstance(value, _NUMBER_TYPES[base]) and not isinstance(value, bool)
        ok = ok and (base == "float" or not isinstance(value, float))
        return (
            None
            if ok
            else f"{key} must be {'an integer' if base == 'int' else 'a number'}, got {value!r}"
        )
    kinds = {"bool": bool, "str": str, "list[float]": list}
    if base.startswith("dict"):
        kinds[base] = dict
    expected = kinds.get(base)
    if expected is not None and not isinstance(value, expected):
        return f"{key} must be of type {base}, got {value!r}"
    return None


def _coerce_types(config: Config) -> list[str]:
    """YAML gives ints for 1 and strings for 1e-3 in some spellings: coerce numbers to the field
    types, then report every value that still does not fit its type (e.g. epochs=abc)."""
    problems = []
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        for f in dataclasses.fields(obj):
            key, hint, value = f"{section.name}.{f.name}", str(f.type), getattr(obj, f.name)
            if (
                hint.startswith("float")
                and isinstance(value, str | int)
                and not isinstance(value, bool)
            ):
                try:
                    value = float(value)
                except ValueError:
                    pass
            elif hint.startswith("int") and isinstance(value, float) and value.is_integer():
                value = int(value)
            setattr(obj, f.name, value)
            problem = _type_problem(key, hint, value)
            if problem:
                problems.append(problem)
    return problems


def config_problems(config: Config) -> list[str]:
    """The rules ``config`` owns (shapes of the run that no single module owns). Each module
    checks its own section (``service.train.preflight`` gathers them all)."""
    t, d = config.train, config.data
    problems = [
        f"{key} must be >= {low}, got {value}"
        for key, value, low in (
            ("train.num_workers", t.num_workers, 1),
            ("train.epochs", t.epochs, 1),
            ("train.global_batch_size", t.global_batch_size, 2),
            ("train.checkpoint_every_epochs", t.checkpoint_every_epochs, 1),
            ("train.log_every_steps", t.log_every_steps, 1),
            ("train.max_failures", t.max_failures, 0),
            ("data.limit", d.limit if d.limit is not None else 1, 1),
        )
        if value < low
    ]
    if t.num_workers >= 1 and t.global_batch_size % t.num_workers:
        nearest = t.global_batch_size - t.global_batch_size % t.num_workers or t.num_workers
        problems.append(
            f"train.global_batch_size={t.global_batch_size} does not divide by "
            f"train.num_workers={t.num_workers}; choose a multiple of {t.num_workers} "
            f"(e.g. {nearest})"
        )
    return problems


def validate(config: Config) -> None:
    """Raise one ``ConfigError`` listing every type problem and every rule ``config`` owns."""
    problems = _coerce_types(config)
    if not problems:  # the rules compare numbers: only meaningful once the types are right
        problems = config_problems(config)
    raise_problems(problems)


def raise_problems(problems: list[str]) -> None:
    """One ``ConfigError`` naming every problem (one per line), or nothing."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n  - " + "\n  - ".join(problems))
