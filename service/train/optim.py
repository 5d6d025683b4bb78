"""Large-batch recipe: LR scaled with the global batch, warmup + cosine, LARS/AdamW/SGD.

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

import torch
from torch import nn

from service.config import TrainConfig

OPTIMIZERS = ("adamw", "sgd", "lars")
LR_SCALINGS = ("linear", "sqrt", "none")


def train_config_problems(cfg: TrainConfig) -> list[str]:
    """The optimiser's rules for ``train.*`` as human messages (empty: fine).

    >>> for problem in train_config_problems(TrainConfig(optimizer="lars", weight_decay=0.0)):
    ...     print(problem)  # doctest: +ELLIPSIS
    train.optimizer=lars with train.weight_decay=0 does no layer adaptation (timm's Lars ...
    """
    problems = []
    if cfg.optimizer not in OPTIMIZERS:
        problems.append(
            f"train.optimizer must be one of {'|'.join(OPTIMIZERS)}, got {cfg.optimizer!r}"
        )
    if cfg.lr_scaling not in LR_SCALINGS:
        problems.append(
            f"train.lr_scaling must be one of {'|'.join(LR_SCALINGS)}, got {cfg.lr_scaling!r}"
        )
    # a non-number is a type problem (config.py), not this rule
    if _is_number(cfg.lr) and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        problems.append(f"train.lr must be a finite number > 0, got {cfg.lr}")
    problems += _time_budget_problems(cfg)
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
    groups = _param_groups(modules, cfg)
    lr = scaled_lr(cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer != "lars":
        raise ValueError(
            f"train.optimizer must be one of {'|'.join(OPTIMIZERS)}, got {cfg.optimizer!r}"
        )
    from timm.optim import Lars  # maintained LARS (You et al. 2017), as used by SimCLR

    # timm adapts only groups with weight decay, so biases/BN (decay 0) skip LARS as in SimCLR.
    return Lars(groups, lr=lr, momentum=cfg.momentum, trust_clip=False)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ~0 to the peak LR, then cosine decay to 0 at ``total_steps``."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_cosine_factor(progress: float, warmup_fraction: float) -> float:
    """LR factor at ``progress`` in [0, 1] of the run: linear warmup from 0 over the first
    ``warmup_fraction``, then cosine decay to 0 at 1.

    >>> [round(warmup_cosine_factor(p, 0.1), 3) for p in (0.0, 0.05, 0.1, 0.55, 1.0)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    progress = min(1.0, max(0.0, progress))
    if progress < warmup_fraction:
        return progress / warmup_fraction
    decay = (progress - warmup_fraction) / max(1e-12, 1.0 - warmup_fraction)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, decay)))


def time_warmup_cosine(
    optimizer: torch.optim.Optimizer, progress: Callable[[], float], warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine laid over a time budget: each ``scheduler.step()`` sets the LR from
    ``progress()`` (training time / budget, the same on every rank), not from the step count."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _step: warmup_cosine_factor(progress(), warmup_fraction)
    )
