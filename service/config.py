"""One typed configuration for every job: YAML files + ``--set key=value`` overrides.

Every hyperparameter lives here, visible in one place. Jobs load a YAML file from
``jobs/configs/``, apply dotted overrides (``--set loss.temperature=0.2``), validate, and save the
resolved config with the run. Unknown keys are an error, never silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DATA_DIR = REPO_ROOT / "service" / "data" / "bundled"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the offending value."""


# Choice fields: the allowed values live here, once; ``validate`` checks any ``Literal`` field
# generically, and the owners read the list with ``typing.get_args`` (e.g. OPTIMIZERS).
Reader = Literal["torch", "ray"]  # DataLoader + DistributedSampler, or Ray Data shards
AugmentDevice = Literal["auto", "cpu", "cuda"]
AugmentBackend = Literal["torchvision", "batched"]
Arch = Literal["small_cnn", "resnet18", "resnet50"]  # service.models.backbones.BACKBONES
Optimizer = Literal["adamw", "sgd", "lars"]
LrScaling = Literal["linear", "sqrt", "none"]
AmpMode = Literal["auto", "bf16", "fp16", "off"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"]
# knn_top1 / train_loss, and the image–text validation metrics (service.eval.image_text)
ChampionMetric = Literal[
    "knn_top1", "train_loss", "val_zeroshot_top1", "val_i2t_recall_at_5", "val_t2i_recall_at_5"
]
Searcher = Literal["random", "optuna"]
Mode = Literal["min", "max"]


@dataclass
class DataConfig:
    train: str = str(BUNDLED_DATA_DIR / "cifar10-train-subset.parquet")
    # Validation (kNN monitor, Tune, champion alias): this file, or when null a seeded
    # val_fraction of the training rows, held out from training. Test: the final number only.
    val: str | None = None
    val_fraction: float = 0.1
    test: str | None = str(BUNDLED_DATA_DIR / "cifar10-test-subset.parquet")
    reader: Reader = "torch"
    image_size: int = 32
    loader_workers: int = 0  # DataLoader worker processes per Ray Train worker
    max_bad_fraction: float = 0.01  # corrupt images above this fraction of a dataset → error
    limit: int | None = None  # use only the first N rows (after a seeded shuffle); for smoke runs
    # Where augment.backend=batched augments: "cuda" when the worker has a GPU (auto), or forced.
    augment_device: AugmentDevice = "auto"
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
    backend: AugmentBackend = "batched"


@dataclass
class ModelConfig:
    arch: Arch = "small_cnn"
    cifar_stem: bool = True  # 3x3 conv stem without max-pool for 32 px inputs
    width: int = 32  # small_cnn: channels of the first stage (stages w, 2w, 4w, 8w)
    depth: int = 1  # small_cnn: conv-BN-ReLU layers per stage (2: a VGG-style net, ~3.5x the MACs)
    proj_hidden_dim: int = 512
    proj_out_dim: int = 128
    proj_layers: int = 2
    proj_batch_norm: bool = True
    # Global BatchNorm (service/models/global_bn.py): batch statistics over all workers' samples,
    # on gloo/CPU as on NCCL/GPU, so W workers x b train as 1 worker x W*b (SimCLR's global BN);
    # 1-3% more CPU work per step on 2 CPU workers (bench/global_bn.py). false: per-worker
    # statistics (docs/training.md).
    sync_batchnorm: bool = True
    channels_last: bool = False


@dataclass
class LossConfig:
    # ntxent | symmetric | moco | hard_negative | debiased | supcon | triplet | pairwise | siglip
    name: str = "ntxent"
    # null: the named loss's own default (siglip: 0.1 learnable, i.e. t = 10 as in the paper;
    # every other loss: 0.5 fixed), resolved by the loss class (service/losses)
    temperature: float | None = None
    learnable_temperature: bool | None = None
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
    placement_strategy: PlacementStrategy = "PACK"  # STRICT_SPREAD: one worker per node
    optimizer: Optimizer = "adamw"
    lr: float = 1e-3  # base LR; the effective LR is scaled with the global batch (lr_scaling)
    lr_scaling: LrScaling = "linear"  # linear: lr*B/256 | sqrt: lr*sqrt(B/256) | none
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    grad_clip_norm: float | None = 1.0
    amp: AmpMode = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
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
    # micro-batch. BatchNorm: each micro-batch is normalised by its own statistics (global BN: over
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
    # Stop after this many optimizer steps (global steps, counted across epochs and resumes; the
    # epoch it ends in is reported and checkpointed like a last epoch). The step-counted LR
    # schedule runs over min(max_steps, epochs x steps per epoch); with a time budget too,
    # whichever limit comes first stops and the schedule follows whichever is further along.
    # train.epochs stays an upper bound. null: no step limit (docs/training.md).
    max_steps: int | None = None


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
    champion_metric: ChampionMetric = "knn_top1"
    enabled: bool = True


@dataclass
class TuneConfig:
    num_samples: int = 4
    search: Searcher = "random"
    # None: the headline metric of the run's validation monitor (knn_top1, or val_zeroshot_top1 in
    # image–text mode; train_loss without a validation split) and its direction
    metric: str | None = None
    mode: Mode | None = None
    max_concurrent_trials: int = 1
    grace_period_epochs: int = 1
    # Under train.time_budget_minutes ASHA's rungs are training minutes, not epochs (trials reach
    # an epoch after different training times); the first rung, default budget / factor**2.
    grace_period_minutes: float | None = None
    reduction_factor: int = 2
    # Wall-clock cap on the whole sweep (Tune's time_budget_s): when it runs out the running trials
    # are stopped (reported as stopped early) and no new one starts; None: no cap.
    time_budget_minutes: float | None = None
    # Trials to run first, before any sampling (each a mapping of searched keys to values; keys it
    # leaves out are sampled): e.g. the previous stage's best recipe. They count in num_samples.
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)
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

    def with_values(self, values: Mapping[str, Any]) -> Config:
        """A copy with the dotted ``values`` set, each coerced and type-checked against its
        field, then the run's shape rules (``config_problems``); the other fields are not
        checked again. A Tune trial's config is its base config ``with_values(sampled)``.

        >>> Config().with_values({"loss.temperature": "1e-1", "train.epochs": 3.0}).loss
        ... # doctest: +ELLIPSIS
        LossConfig(name='ntxent', temperature=0.1, ...)
        >>> Config().with_values({"train.optimizer": "adam"})
        Traceback (most recent call last):
        service.config.ConfigError: train.optimizer must be one of adamw|sgd|lars, got 'adam'
        """
        new = copy.deepcopy(self)
        problems = []
        for key, value in values.items():
            section, f = _field(key)
            obj = getattr(new, section)
            value = _coerced(_field_types(type(obj))[f.name], value)
            setattr(obj, f.name, value)
            problems += _problems_of(obj, f, key)
        raise_problems(problems or config_problems(new))
        if self.is_checked("config"):  # the rest was checked, and the changes were just now
            new.mark_checked("config")
        return new

    # What has been checked (``validate``: "config"; ``train.preflight``: "rules", "data") is
    # recorded on the instance with its content, so each check runs once per config, and any
    # change after a check makes it count as unchecked again.
    def mark_checked(self, *stages: str) -> None:
        """Record that the checks ``stages`` passed for this config as it is now."""
        content = repr(self)
        seen, done = vars(self).get("_checked", ("", frozenset()))
        vars(self)["_checked"] = (content, (done if seen == content else frozenset()) | set(stages))

    def is_checked(self, stage: str) -> bool:
        """Whether ``stage``'s checks passed for this config as it is now.

        >>> config = Config()
        >>> config.mark_checked("rules"); config.is_checked("rules")
        True
        >>> config.loss.temperature = 0.2; config.is_checked("rules")
        False
        """
        content, done = vars(self).get("_checked", ("", frozenset()))
        return stage in done and content == repr(self)


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
    config.mark_checked("config")  # the paths are strings still: the check holds
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


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a section (``Literal``/``| None`` as objects, not strings)."""
    return typing.get_type_hints(cls)


def _field(key: str) -> tuple[str, dataclasses.Field]:
    """The section name and field of a dotted key such as ``"loss.temperature"``."""
    section, _, name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"unknown config key(s) {[key]}; known: {sorted(sections)}")
    fields = {f.name: f for f in dataclasses.fields(sections[section].default_factory())}
    if name not in fields:
        raise ConfigError(f"unknown config key(s) {[key]}; known: {sorted(fields)}")
    return section, fields[name]


def _optional(tp: Any) -> tuple[Any, bool]:
    """``(int, True)`` for ``int | None``; ``(tp, False)`` for anything else."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


def _coerced(tp: Any, value: Any) -> Any:
    """YAML gives ints for 1 and strings for 1e-3 in some spellings: numbers to the field type."""
    base, _ = _optional(tp)
    if base is float and isinstance(value, str | int) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def type_problem(key: str, tp: Any, value: Any, spelled: str = "") -> str | None:
    """``None`` when ``value`` fits the annotation ``tp`` (resolved: ``int | None``,
    ``Literal["torch", "ray"]``, ``list[float]``, ...); else the message naming ``key``.

    >>> type_problem("data.reader", Reader, "spark")
    "data.reader must be one of torch|ray, got 'spark'"
    """
    base, optional = _optional(tp)
    if value is None:
        return None if optional else f"{key} must not be null"
    if base in (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not (ok and (base is float or not isinstance(value, float))):
            return f"{key} must be {'an integer' if base is int else 'a number'}, got {value!r}"
        return None
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value in choices:
            return None
        return f"{key} must be one of {'|'.join(map(str, choices))}, got {value!r}"
    expected = typing.get_origin(base) or base
    if expected in (bool, str, list, dict) and not isinstance(value, expected):
        return f"{key} must be of type {spelled or expected.__name__}, got {value!r}"
    return None


def _problems_of(obj: Any, f: dataclasses.Field, key: str) -> list[str]:
    spelled = str(f.type).split(" | ")[0]  # as written, e.g. list[float]
    problem = type_problem(key, _field_types(type(obj))[f.name], getattr(obj, f.name), spelled)
    return [problem] if problem else []


def _coerce_types(config: Config) -> list[str]:
    """Coerce numbers to the field types, then report every value that does not fit its field
    (``train.epochs=abc``; a choice field outside its ``Literal``: ``data.reader=spark``)."""
    problems = []
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        hints = _field_types(type(obj))
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _coerced(hints[f.name], getattr(obj, f.name)))
            problems += _problems_of(obj, f, f"{section.name}.{f.name}")
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


def validation_problems(config: Config) -> list[str]:
    """Every type problem (numbers coerced first), else every rule ``config`` owns: the rules
    compare numbers, so they are only meaningful once the types are right."""
    return _coerce_types(config) or config_problems(config)


def validate(config: Config) -> None:
    """Raise one ``ConfigError`` listing ``validation_problems``; else mark ``config`` checked."""
    raise_problems(validation_problems(config))
    config.mark_checked("config")


def raise_problems(problems: list[str]) -> None:
    """One ``ConfigError`` naming every problem (one per line), or nothing."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n  - " + "\n  - ".join(problems))
