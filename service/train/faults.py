"""Fault drills for recovery tests (``fault.*`` config keys; all off by default)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch

from service.config import FaultConfig

log = logging.getLogger("service.train")


def maybe_kill(fault: FaultConfig, rank: int, global_step: int, marker_dir: Path) -> None:
    """SIGKILL this worker once at ``fault.at_step`` (a marker file makes it one-shot)."""
    if fault.kill_rank != rank or fault.at_step != global_step:
        return
    marker = marker_dir / f"fault-fired-rank{rank}"
    if marker.exists():
        return
    marker_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(time.time()))
    log.warning(
        "fault injection: killing rank %d (pid %d) at step %d", rank, os.getpid(), global_step
    )
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_poison(fault: FaultConfig, global_step: int, loss: torch.Tensor) -> torch.Tensor:
    """Divergence drill: the loss becomes NaN at ``fault.nan_at_step`` (exercises the stop)."""
    return loss * float("nan") if fault.nan_at_step == global_step else loss
