"""The training state of one worker: model, loss, optimizer, schedule and position.

:func:`build_state` builds it from a Config without Ray (``bench/train_step.py`` and the unit
tests use it); the Ray worker passes ``wrap=ray.train.torch.prepare_model`` (DDP + device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from service.config import Config
from service.losses import build_loss
from service.models import build_training_model, maybe_convert_sync_batchnorm, unwrap
from service.train.amp import Amp, amp_policy
from service.train.budget import TrainClock
from service.train.micro_batch import resolve_micro_batch
from service.train.optim import build_optimizer, lr_schedule


@dataclass
class TrainState:
    """Everything a step changes, plus where training stands (``epoch`` is the current one)."""

    config: Config
    device: torch.device
    model: nn.Module  # DDP-wrapped in a Ray worker
    criterion: Any  # a service.losses loss with the method hooks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    amp: Amp
    rank: int = 0
    world: int = 1
    run_dir: str = "."
    num_nodes: int = 1
    epoch: int = 0
    epoch_step: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # Training seconds so far (rank 0's clock, shared when a time budget is set); checkpointed.
    clock: TrainClock = field(default_factory=TrainClock)
    # train.micro_batch_size, checked once here (not per step): cached-gradient steps when set
    # and smaller than the step's local batch (service.train.gradcache)
    micro_batch: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.micro_batch = resolve_micro_batch(self.config)

    @property
    def steps_done(self) -> bool:
        """``train.max_steps`` optimizer steps taken (never, without it). Every rank takes the
        same steps, so every rank sees this after the same step without a collective."""
        max_steps = self.config.train.max_steps
        return max_steps is not None and self.global_step >= max_steps

    @property
    def finished(self) -> bool:
        """Training is over before ``train.epochs``: the time budget is spent or
        ``train.max_steps`` reached (whichever first). The loop asks this after every step."""
        return self.clock.exhausted or self.steps_done

    def expected_initial_loss(self) -> float | None:
        """The loss of indistinguishable embeddings for this run's loss, views and global batch
        (seeds §7.4): the step-0 check and the reference line of the loss curve."""
        c = self.config
        return self.criterion.expected_initial_loss(c.augment.n_views, c.train.global_batch_size)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.config.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def build_state(
    config: Config,
    device: torch.device,
    steps_per_epoch: int,
    *,
    rank: int = 0,
    world: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    run_dir: str = ".",
    gather_distributed: bool = True,
) -> TrainState:
    """Model (→ ``wrap``, default: move to ``device``), loss, optimizer, the LR schedule (over
    the steps, or over the time budget) and the micro-batch of cached-gradient steps."""
    model = maybe_convert_sync_batchnorm(build_training_model(config), config.model.sync_batchnorm)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = wrap(model) if wrap is not None else model.to(device)
    criterion = build_loss(config.loss, config.model.proj_out_dim, gather_distributed)
    # After wrapping: DDP has broadcast rank 0's weights, so e.g. MoCo's key encoder starts as
    # the same copy of the online model on every rank.
    criterion.attach(unwrap(model))
    criterion = criterion.to(device)
    optimizer = build_optimizer([model, criterion], config.train)
    t = config.train
    clock = TrainClock(t.time_budget_minutes, rank=rank, world=world, device=device)
    scheduler = lr_schedule(optimizer, t, steps_per_epoch, clock)
    return TrainState(
        config=config, device=device, model=model, criterion=criterion, optimizer=optimizer,
        scheduler=scheduler, amp=amp_policy(t.amp, device), rank=rank, world=world,
        run_dir=run_dir, clock=clock,
    )  # fmt: skip
