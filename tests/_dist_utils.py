"""Run a function on every rank of a real torch.distributed gloo group (spawned processes).

``run_in_gloo_group(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a gloo
group through a ``file://`` rendezvous (no ports to race for), calls ``fn(rank, world_size,
*args)`` with torch threads set to 1, and returns the per-rank results (anything ``torch.save``
can write) in rank order. ``fn`` must be importable (module level) because of the spawn start
method. A bounded collective timeout turns a deadlock into a test failure instead of a hang.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


def _entry(rank: int, world_size: int, workdir: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(workdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# The first functional collective imports torch._dynamo (seconds). A forkserver imports it once,
# then forks every rank of every group from that clean, single-threaded process: much cheaper on
# a 2-core CI box than a fresh interpreter per rank, and safe unlike forking the pytest process.
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed._functional_collectives"]


def run_in_gloo_group(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """``[fn(0, W, *args), ..., fn(W-1, W, *args)]`` computed by W processes in one gloo group."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD + [fn.__module__])
    with tempfile.TemporaryDirectory(prefix="gloo-") as workdir:
        mp.start_processes(
            _entry,
            args=(world_size, workdir, fn, args),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )
        return [
            torch.load(Path(workdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)
        ]
