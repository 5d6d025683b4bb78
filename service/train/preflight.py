"""Pre-flight: every check that can fail a run, done once on the driver before MLflow or Ray.

Each rule lives with the module that owns it — the config's own shape (``config``), the loss
(``losses``), the model (``models``), data and augmentation (``data.checks``), the optimiser
(``train.optim``), mixed precision (``train.amp``), cached-gradient steps (``train.gradcache``),
tracking — and this module only gathers them, so a user sees every problem at once. The
config's own types (choice fields included) and shape come first (``service.config.validate``).

Each check runs once per config: ``load_checked_config`` returns a config marked as checked
(``Config.is_checked``: "config" for types and shape, "rules" for the owners', "data" for the
files), and ``preflight`` skips what the mark covers, e.g. the driver and the sweep then check
only the data. A config changed after a check counts as unchecked again.

    >>> from service.config import Config
    >>> config = Config()
    >>> config.loss.temperature, config.augment.strength = -1.0, 9.0
    >>> for problem in config_problems(config): print(problem)  # doctest: +ELLIPSIS
    augment.strength must be in [0, 2.5] (hue jitter 0.2*s <= 0.5), got 9.0
    loss.temperature must be > 0...
"""

from __future__ import annotations

from service.config import Config, raise_problems, validate, validation_problems
from service.data.checks import (
    augment_config_problems,
    data_config_problems,
    data_problems,
    text_config_problems,
)
from service.eval.image_text import CHAMPION_METRICS as IMAGE_TEXT_CHAMPIONS
from service.eval.image_text import image_text_problems
from service.losses import loss_class, loss_config_problems
from service.models.backbones import model_config_problems
from service.train.optim import train_config_problems

# The split each champion metric is measured on (the names: config.ChampionMetric).
CHAMPION_METRICS = {"knn_top1": "validation", "train_loss": None}
CHAMPION_METRICS.update(dict.fromkeys(IMAGE_TEXT_CHAMPIONS, "validation"))  # text mode only


def loss_problems(config: Config) -> list[str]:
    """The loss's own rules (names, options, hyperparameter ranges), from the loss's class:
    no loss is built (the worker's constructor is the one other check)."""
    text_mode = bool(config.text.column)
    problems = loss_config_problems(config.loss, config.augment.n_views, text_mode=text_mode)
    if problems:
        return problems
    per_worker = config.per_worker_batch_size
    if per_worker < 2 and loss_class(config.loss.name).in_batch_negatives:
        return [f"per-worker batch {per_worker} is too small for in-batch negatives"]
    return []


def tracking_problems(config: Config) -> list[str]:
    m = config.mlflow
    if not (m.enabled and m.registered_model_name):
        return []
    needs = CHAMPION_METRICS.get(m.champion_metric)
    if needs == "validation" and not config.data.has_val:
        return [
            f"mlflow.champion_metric={m.champion_metric} is measured on the validation split, "
            f"and there is none (data.val null, data.val_fraction 0); hold rows out "
            f"(data.val_fraction > 0) or use mlflow.champion_metric=train_loss"
        ]
    return []


def config_problems(config: Config) -> list[str]:
    """Every rule of every section, from its owner (no file is read). A config that did not
    pass ``validate`` (built or changed in code) gets its type and shape problems instead: the
    owners' rules compare values of the right types."""
    from service.train.micro_batch import gradcache_problems

    own = [] if config.is_checked("config") else validation_problems(config)
    if own:
        return own
    t = config.train
    return [
        *augment_config_problems(config.augment),
        *data_config_problems(config.data),
        *text_config_problems(config.text),
        *loss_problems(config),
        *model_config_problems(config.model),
        *train_config_problems(t),
        *gradcache_problems(config),
        *tracking_problems(config),
        *image_text_problems(config),
    ]


def preflight(config: Config, *, data: bool = True) -> None:
    """Raise one ``ConfigError`` listing every problem of ``config`` (and of its data files).

    What ``config`` is marked as having passed is not checked again (``load_checked_config``);
    a config nobody checked gets every check, its types and shape first."""
    if not config.is_checked("config"):
        validate(config)  # types and shape: the rules below compare values of the right types
    stages = ["rules", "data"] if data else ["rules"]
    todo = [stage for stage in stages if not config.is_checked(stage)]
    problems = config_problems(config) if "rules" in todo else []
    if "data" in todo:
        problems += data_problems(config, train_needs_labels=_loss_needs_labels(config))
    raise_problems(problems)
    config.mark_checked(*todo)


def _loss_needs_labels(config: Config) -> bool:
    from service.losses import LOSS_CLASSES

    cls = LOSS_CLASSES.get(config.loss.name)  # an unknown name is already a problem
    return bool(cls is not None and cls.needs_labels)


def load_checked_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """``load_config`` plus every owner's rules (no data read): what each command starts from.
    The config comes back marked as checked, so ``preflight`` on it (the driver's, the sweep's)
    checks only the data."""
    from service.config import load_config

    config = load_config(path, overrides)
    preflight(config, data=False)
    return config
