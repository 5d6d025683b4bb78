"""Large-batch recipe: LR scaled with the global batch, warmup + cosine, LARS/AdamW/SGD.

The LR schedule is one function of the run's progress in [0, 1] (``SCHEDULES``) (``lr_schedule``):
progress is ``step / total_steps`` (a ``LambdaLR``), or under ``train.time_budget_minutes`` the
training clock's fraction of the budget (``ClockLR``: each step's LR from the clock at its start).

Parameter groups (``build_optimizer``):

- weights (``ndim > 1``): ``train.weight_decay``, the batch-scaled LR, LARS adaptation;
- biases, norm layers: no weight decay and hence no LARS adaptation (as in SimCLR);
- a learnable temperature (``criterion.temperature_parameters()``): no weight decay, no LARS
  adaptation and the *unscaled* base ``train.lr``. It is a log-scale scalar, not a layer: the
  batch-scaled LR (4.8 for LARS at batch 4096) moved it from 2.66 to -12.7 in four steps.

timm's ``Lars`` adapts a group only when its ``weight_decay != 0`` or ``always_adapt`` is set
(``_single_tensor_lars``/``_multi_tensor_lars``), so ``weight_decay=0`` turns LARS into plain
momentum SGD without a word: ``train_config_problems`` refuses that configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import get_args

import torch
from torch import nn

from service.config import ConfigError, LrScaling, Optimizer, TrainConfig, type_problem
from service.train.budget import TrainClock

OPTIMIZERS = get_args(Optimizer)  # the names are checked with the config's types
LR_SCALINGS = get_args(LrScaling)


def train_config_problems(cfg: TrainConfig) -> list[str]:
    """The optimiser's rules for ``train.*`` as human messages (empty: fine).

    >>> for problem in train_config_problems(TrainConfig(optimizer="lars", weight_decay=0.0)):
    ...     print(problem)  # doctest: +ELLIPSIS
    train.optimizer=lars with train.weight_decay=0 does no layer adaptation (timm's Lars ...
    """
    problems = []
    # a non-number is a type problem (config.py), not this rule
    if _is_number(cfg.lr) and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        problems.append(f"train.lr must be a finite number > 0, got {cfg.lr}")
    problems += _time_budget_problems(cfg)
    steps = cfg.max_steps
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < 1:
        problems.append(
            f"train.max_steps must be a positive number of optimizer steps (or null for no step "
            f"limit), got {steps}"
        )
    if cfg.optimizer == "lars" and cfg.weight_decay == 0:
        problems.append(
            "train.optimizer=lars with train.weight_decay=0 does no layer adaptation (timm's Lars "
            "adapts only decayed groups); set weight_decay > 0, e.g. 1e-6, or use sgd"
        )
    return problems


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _time_budget_problems(cfg: TrainConfig) -> list[str]:
    """``train.time_budget_minutes`` / ``train.warmup_fraction`` (non-numbers: type problems)."""
    problems = []
    budget, warmup = cfg.time_budget_minutes, cfg.warmup_fraction
    if _is_number(budget) and not (math.isfinite(budget) and budget > 0):
        problems.append(
            f"train.time_budget_minutes must be a positive number of minutes (or null for no "
            f"budget), got {budget}"
        )
    if _is_number(warmup) and not (0 <= warmup < 1):
        problems.append(f"train.warmup_fraction must be in [0, 1), got {warmup}")
    if budget is None and _is_number(warmup) and warmup > 0:
        problems.append(
            "train.warmup_fraction applies to time-budgeted runs only; set "
            "train.time_budget_minutes, or warm up with train.warmup_epochs"
        )
    return problems


def scaled_lr(cfg: TrainConfig) -> float:
    """Effective peak LR from the base LR and the global batch (SimCLR: lr * B / 256)."""
    ratio = cfg.global_batch_size / 256
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(ratio)
    return cfg.lr


def _temperature_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    found = []
    for module in modules:
        get = getattr(module, "temperature_parameters", None)
        if callable(get):
            found.extend(p for p in get() if p.requires_grad)
    return found


def _param_groups(modules: Iterable[nn.Module], cfg: TrainConfig) -> list[dict]:
    """Weights (decay), biases/norms/scalars (no decay nor LARS) and temperatures (own group)."""
    modules = list(modules)
    temperatures = _temperature_parameters(modules)
    own_group = {id(p) for p in temperatures}
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad or id(param) in own_group:
                continue
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if temperatures:
        # always_adapt=False + weight_decay=0: timm's Lars skips the trust ratio for this group
        # (other optimizers ignore the key).
        groups.append(
            {"params": temperatures, "weight_decay": 0.0, "lr": cfg.lr, "always_adapt": False}
        )
    return groups


def build_optimizer(modules: Iterable[nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer over every trainable parameter of ``modules`` (model and, e.g., a learnable τ)."""
    # a TrainConfig built in code was never validated: refuse a name rather than fall to LARS
    problem = type_problem("train.optimizer", Optimizer, cfg.optimizer)
    if problem:
        raise ConfigError(problem)
    groups = _param_groups(modules, cfg)
    lr = scaled_lr(cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    from timm.optim import Lars  # maintained LARS (You et al. 2017), as used by SimCLR

    # timm adapts only groups with weight decay, so biases/BN (decay 0) skip LARS as in SimCLR.
    return Lars(groups, lr=lr, momentum=cfg.momentum, trust_clip=False)


def warmup_cosine_factor(progress: float, warmup_fraction: float, lead: float = 0.0) -> float:
    """LR factor at ``progress`` in [0, 1] of the run: linear warmup over the first
    ``warmup_fraction``, then cosine decay to 0 at 1. ``lead``: how far ahead the warmup ramp
    is read; a per-step schedule reads it at the end of the step (``1 / total_steps``), so its
    first step does not train at LR 0.

    >>> [round(warmup_cosine_factor(p, 0.1), 3) for p in (0.0, 0.05, 0.1, 0.55, 1.0)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    progress = min(1.0, max(0.0, progress))
    if progress < warmup_fraction:
        return min(1.0, (progress + lead) / warmup_fraction)
    decay = (progress - warmup_fraction) / max(1e-12, 1.0 - warmup_fraction)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, decay)))


# name -> factor(progress in [0, 1], warmup fraction, warmup lead): the LR multiplier
SCHEDULES: dict[str, Callable[[float, float, float], float]] = {
    "warmup_cosine": warmup_cosine_factor,
}


# A time-based warmup reads its ramp this fraction of the warmup ahead, so it starts at 1% of the
# peak LR: a per-step ramp leads by one step (its first step trains at 1 / warmup steps), but how
# many steps a warmup of minutes holds is not known when it starts.
CLOCK_WARMUP_LEAD = 0.01


class ClockLR(torch.optim.lr_scheduler.LRScheduler):
    """LR = base LR x ``factor(clock.progress, warmup_fraction, lead)``, the training clock's
    fraction of the budget (the same on every rank).

    ``train_step`` calls :meth:`follow_clock` at each step's start, after the clock's sync, so a
    step trains at the schedule of the time it starts; ``step()`` after the optimizer step reads
    the same shared clock and changes nothing until then. The clock is not part of the state
    (the checkpoint has the training seconds).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clock: TrainClock,
        factor: Callable[[float, float, float], float],
        warmup_fraction: float,
        max_steps: int | None = None,
    ) -> None:
        self.clock, self.factor, self.warmup_fraction = clock, factor, warmup_fraction
        self.max_steps = max_steps
        super().__init__(optimizer)

    @property
    def progress(self) -> float:
        """The clock's fraction of the budget or, with ``train.max_steps`` too, the steps'
        fraction of it when that is further along: whichever limit stops the run first, the
        schedule has reached its end there. ``last_epoch`` counts the optimizer steps taken
        (restored on resume), the same on every rank."""
        if self.max_steps is None:
            return self.clock.progress
        return max(self.clock.progress, min(1.0, self.last_epoch / self.max_steps))

    def get_lr(self) -> list[float]:  # noqa: D102 (LRScheduler's)
        lead = CLOCK_WARMUP_LEAD * self.warmup_fraction
        f = self.factor(self.progress, self.warmup_fraction, lead)
        return [base * f for base in self.base_lrs]

    def follow_clock(self) -> None:
        """Set every group's LR from the clock's current (shared) value."""
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs

    def state_dict(self) -> dict:  # noqa: D102 (LRScheduler's, without the clock and factor)
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "clock", "factor")}


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    steps_per_epoch: int,
    clock: TrainClock,
    name: str = "warmup_cosine",
) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's LR schedule: ``SCHEDULES[name]`` over the steps the run takes,
    ``train.epochs * steps_per_epoch`` or ``train.max_steps`` when fewer (warmup
    ``train.warmup_epochs``), or, when the clock has a budget, over the training time (warmup
    ``train.warmup_fraction``, :class:`ClockLR`): each step's LR then comes from the clock's
    fraction of the budget when the step starts (or the steps' fraction of ``train.max_steps``,
    when further along), not from the step count."""
    factor = SCHEDULES[name]
    if clock.budgeted:
        return ClockLR(optimizer, clock, factor, cfg.warmup_fraction, cfg.max_steps)
    total = max(1, schedule_steps(cfg, steps_per_epoch))
    warmup_steps = min(max(0, round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: factor(step / total, warmup_steps / total, 1 / total)
    )


def schedule_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps a run without a time budget takes: ``train.epochs`` epochs, or
    ``train.max_steps`` when that comes first (the step-counted schedule's length).

    >>> schedule_steps(TrainConfig(epochs=10), 40), schedule_steps(TrainConfig(max_steps=50), 40)
    (400, 50)
    """
    total = cfg.epochs * steps_per_epoch
    return total if cfg.max_steps is None else min(total, cfg.max_steps)
