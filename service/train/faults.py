"""Fault drills for recovery tests (``fault.*`` config keys; all off by default)."""

from __future__ import annotations

import json
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
    _wait_for_registered_checkpoint(marker_dir.parent)
    log.warning(
        "fault injection: killing rank %d (pid %d) at step %d", rank, os.getpid(), global_step
    )
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_registered_checkpoint(run_dir: Path, timeout_s: float = 120.0) -> None:
    """Wait until Ray Train's controller has registered a reported checkpoint, so the drill
    restarts from it. The controller registers a report on its next poll (~2 s) and records it
    in ``checkpoint_manager_snapshot.json`` (Ray Train V2's own file); a worker killed before
    that would restart from the checkpoint before, which is not the drill."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return
        except (OSError, ValueError):
            pass  # not written yet, or mid-write
        time.sleep(0.2)
    log.warning("fault injection: no registered checkpoint after %.0f s; killing anyway", timeout_s)


def maybe_pause(fault: FaultConfig, epoch: int, marker_dir: Path, timeout_s: float = 600.0) -> None:
    """Outage drill: before the 1-based ``fault.pause_before_epoch``, every rank waits until
    ``<marker_dir>/go`` exists, so a test can change the world (stop a server) between epochs
    instead of racing the training."""
    if fault.pause_before_epoch != epoch:
        return
    go = marker_dir / "go"
    log.warning("fault injection: waiting for %s before epoch %d", go, epoch)
    deadline = time.monotonic() + timeout_s
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def maybe_poison(fault: FaultConfig, global_step: int, loss: torch.Tensor) -> torch.Tensor:
    """Divergence drill: the loss becomes NaN at ``fault.nan_at_step`` (exercises the stop)."""
    return loss * float("nan") if fault.nan_at_step == global_step else loss
