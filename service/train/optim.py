"""Large-batch recipe: LR scaled with the global batch, warmup + cosine, LARS/AdamW/SGD."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from service.config import TrainConfig


def scaled_lr(cfg: TrainConfig) -> float:
    """Effective peak LR from the base LR and the global batch (SimCLR: lr * B / 256)."""
    ratio = cfg.global_batch_size / 256
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(ratio)
    return cfg.lr


def _param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """No weight decay (nor LARS adaptation) for biases, norm layers and scalars (temperature)."""
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(modules: Iterable[nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer over every trainable parameter of ``modules`` (model and, e.g., a learnable τ)."""
    groups = _param_groups(modules, cfg.weight_decay)
    lr = scaled_lr(cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
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
