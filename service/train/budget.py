"""Training time: rank 0's clock of seconds spent training, shared with every rank.

A :class:`TrainClock` counts the seconds the loop spends in its epochs (data + steps; the
validation monitor and checkpointing run while it is paused), on rank 0's clock only. With
``train.time_budget_minutes`` the value is broadcast from rank 0 at every step's start (the
step's LR) and after it (the stop), so every rank sees the same number: the LR schedule
(``optim.lr_schedule``, progress = training time / budget) stays identical across ranks and all
ranks stop after the same step. The elapsed time is
checkpointed and restored on resume, so a resumed run trains for the rest of its budget.

    >>> ticks = iter([0.0, 30.0, 90.0])
    >>> clock = TrainClock(budget_minutes=1.0, now=lambda: next(ticks))
    >>> clock.resume()
    >>> clock.sync(), clock.exhausted
    (30.0, False)
    >>> clock.sync(), clock.exhausted, clock.progress
    (90.0, True, 1.0)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist


class TrainClock:
    """Seconds of training so far (rank 0's clock, shared) and the optional budget.

    ``now`` (seconds, monotonic) is injectable: tests drive a fake clock. Call :meth:`resume`
    when training (re)starts, :meth:`sync` at every step's start (``train_step``) and after it,
    :meth:`pause` before evaluation and checkpointing.
    """

    def __init__(
        self,
        budget_minutes: float | None = None,
        *,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_s = None if budget_minutes is None else 60.0 * float(budget_minutes)
        self.elapsed_s = 0.0  # the shared value: every rank holds rank 0's training seconds
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.now = now
        self._base = 0.0  # training seconds before the running segment began
        self._since: float | None = None  # rank 0's clock when the running segment began

    @property
    def budgeted(self) -> bool:
        """Whether training is limited by time (``train.time_budget_minutes``): the loop, the
        LR schedule and the progress lines ask this, not the config."""
        return self.budget_s is not None

    @property
    def exhausted(self) -> bool:
        """Whether the budget is spent (never, without a budget)."""
        return self.budget_s is not None and self.elapsed_s >= self.budget_s

    @property
    def progress(self) -> float:
        """Fraction of the budget spent, in [0, 1] (0 without a budget)."""
        if not self.budget_s:
            return 0.0
        return min(1.0, self.elapsed_s / self.budget_s)

    @property
    def remaining_s(self) -> float | None:
        return None if self.budget_s is None else max(0.0, self.budget_s - self.elapsed_s)

    def resume(self) -> None:
        """Start (or continue) counting training time."""
        self._since = self.now()

    def pause(self) -> None:
        """Stop counting (evaluation, checkpointing); keeps the last shared value."""
        self._base, self._since = self.elapsed_s, None

    def restore(self, elapsed_s: float) -> None:
        """Continue from a checkpoint's training seconds."""
        self.elapsed_s = self._base = float(elapsed_s)

    def sync(self) -> float:
        """Rank 0's training seconds, on every rank: one 8-byte broadcast when a budget is set
        and there are several ranks (the LR and the stop must agree), none otherwise."""
        local = self._base
        if self._since is not None:
            local += self.now() - self._since
        if self.budget_s is not None and self.world > 1 and dist.is_initialized():
            device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            shared = torch.tensor([local], dtype=torch.float64, device=device)
            dist.broadcast(shared, src=0)
            local = float(shared)
        self.elapsed_s = local
        return local
