"""One training step — the dozen lines every contrastive method shares.

Method-specific parts sit behind the loss's hooks (``forward_views``, ``reduce_gradients``,
``after_step``: MoCo's key encoder and EMA, a learnable temperature), so this reads the same for
SimCLR, MoCo and CLIP-style losses. With ``train.micro_batch_size`` below the local batch the
forward and backward run as cached-gradient micro-batches (``service/train/gradcache.py``).
``bench/train_step.py`` times this very function.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from service.losses import NonFiniteEmbeddingError
from service.train.faults import maybe_poison
from service.train.gradcache import cached_forward_backward, label_kwargs, uses_gradcache
from service.train.state import TrainState


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops and the last good checkpoint is kept."""


def global_mean(value: torch.Tensor, world_size: int) -> float:
    """Mean of a scalar over ranks; every rank gets the same number (so NaN stops are unanimous)."""
    value = value.detach().float().reshape(1).clone()
    if world_size > 1:
        dist.all_reduce(value)
        value /= world_size
    return float(value)


def _where(s: TrainState) -> str:
    return f"epoch {s.epoch + 1}, step {s.epoch_step} (global step {s.global_step})"  # 1-based


def _forward(
    s: TrainState, views: list[torch.Tensor], labels: torch.Tensor | None, cached: bool
) -> torch.Tensor:
    try:
        if cached:  # forward *and* backward in micro-batches; returns the detached loss
            return cached_forward_backward(s, views, labels)
        with s.amp.autocast():
            return s.criterion.forward_views(s.model, views, **label_kwargs(s.criterion, labels))
    except NonFiniteEmbeddingError as exc:
        # Diverged weights show up as non-finite embeddings before the loss is NaN; the loss
        # raises on every rank together, so all ranks stop here in the same step.
        raise NonFiniteLossError(
            f"training diverged at {_where(s)}: {exc}. The last good checkpoint (if any) is kept "
            f"under {s.run_dir}."
        ) from exc


def _check_finite(s: TrainState, mean_loss: float) -> None:
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(
            f"loss became {mean_loss} at {_where(s)}; stopping. The last good checkpoint (if any) "
            f"is kept under {s.run_dir}. Try a higher loss.temperature (now "
            f"{s.config.loss.temperature}) or a lower train.lr."
        )


def train_step(
    s: TrainState, views: list[torch.Tensor], labels: torch.Tensor | None = None
) -> float:
    """Forward all views, loss over the global batch, backward, optimizer step; the mean loss.

    ``labels`` (``[b]`` class ids of this worker's samples; None or -1 where the data has none)
    reach only losses that ``needs_labels`` (SupCon, triplet, pairwise).
    """
    # images [b, C, H, W] get the model's memory format; tokens [b, L] and labels just move
    views = [s.to_device(v) if v.dim() == 4 else v.to(s.device, non_blocking=True) for v in views]
    if labels is not None and getattr(s.criterion, "needs_labels", False):
        labels = labels.to(s.device, non_blocking=True)
    if s.clock.budgeted:  # this step's LR: the schedule at rank 0's training clock now
        s.clock.sync()
        s.scheduler.follow_clock()
    cached = uses_gradcache(s, views[0].shape[0])  # train.micro_batch_size < local batch
    if cached:
        s.optimizer.zero_grad(set_to_none=True)  # the cached passes accumulate into .grad
    loss = maybe_poison(s.config.fault, s.global_step, _forward(s, views, labels, cached))
    mean_loss = global_mean(loss, s.world)
    _check_finite(s, mean_loss)
    scaler = s.amp.scaler
    if not cached:
        s.optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(s.optimizer)
    s.criterion.reduce_gradients()  # parameters outside DDP (a learnable temperature)
    if s.config.train.grad_clip_norm:
        params = list(s.model.parameters()) + list(s.criterion.parameters())
        nn.utils.clip_grad_norm_(params, s.config.train.grad_clip_norm)
    if scaler is not None:
        scaler.step(s.optimizer)
        scaler.update()
    else:
        s.optimizer.step()
    s.scheduler.step()
    s.criterion.after_step(s.model)  # e.g. MoCo's EMA of the key encoder
    s.global_step += 1
    s.epoch_step += 1
    return mean_loss
