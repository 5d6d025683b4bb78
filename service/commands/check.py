"""``contrastive check``: does this cluster train W workers x b exactly as 1 process x W*b?"""

from __future__ import annotations

import argparse
from typing import Any

from service.commands import args
from service.commands.config import load_checked_config

DRILLS = ("gather_without_grad",)  # service.losses.SIMULATED_BUGS (not imported: --help is instant)


def add_parser(subparsers: args.Subparsers) -> None:
    """Register ``contrastive check`` and its arguments."""
    p = subparsers.add_parser(
        "check",
        help="self-check of a cluster: W workers vs 1 process (loss, gradients, BN), "
        "collective bandwidth, data wait, MLflow",
        description="Runs a few real training steps of the config on W Ray Train workers and "
        "the same global batches in one process, compares loss, gradients and BatchNorm "
        "statistics, times the all-gather/all-reduce and each rank's data wait, and asks the "
        "MLflow server. Exit 1 when the workers differ from one process beyond --tolerance.",
    )
    args.add_config(p, default="jobs/configs/smoke-cpu.yaml")
    args.add_address(p)
    p.add_argument("--steps", type=int, default=3, help="training steps compared (default 3)")
    p.add_argument("--timed-steps", type=int, default=10,
                   help="further steps of the run's own batch and precision timing the data "
                   "wait and the step (default 10)")  # fmt: skip
    p.add_argument("--batch-per-worker", type=int, default=None,
                   help="samples per worker in the compared steps, the first of each rank's "
                   "batch (default: min(32, the config's); the one-process reference holds "
                   "workers x this, in float64)")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=1e-6,
                   help="largest gradient difference allowed, relative to the largest "
                   "gradient (default 1e-6; the compared steps run in float64 and agree to "
                   "~1e-13)")  # fmt: skip
    p.add_argument("--drill", choices=DRILLS, default=None,
                   help="simulate a known distributed bug in the W-worker run, to see the check "
                   "catch it (gather_without_grad: an all-gather that cuts the graph)")  # fmt: skip
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line → :func:`check_command`."""
    return args.call(check_command, a)


def check_command(
    config_path: str | None,
    overrides: list[str] | None = None,
    address: str | None = None,
    steps: int = 3,
    timed_steps: int = 10,
    batch_per_worker: int | None = None,
    tolerance: float = 1e-6,
    drill: str | None = None,
) -> dict[str, Any]:
    """Check the config on the cluster at ``address`` (None: embedded); the summary."""
    from service.config import ConfigError
    from service.train.check import CheckPlan
    from service.train.check_run import run_check

    problems = [f"--{name} must be >= 1, got {value}" for name, value in
                (("steps", steps), ("timed-steps", timed_steps),
                 ("batch-per-worker", batch_per_worker or 1)) if value < 1]  # fmt: skip
    if not tolerance > 0:
        problems.append(f"--tolerance must be > 0, got {tolerance}")
    if problems:
        raise ConfigError("; ".join(problems))
    config = load_checked_config(config_path, overrides or [])
    plan = CheckPlan(steps=steps, timed_steps=timed_steps, drill=drill)
    return run_check(
        config, address, plan=plan, per_worker_batch=batch_per_worker, tolerance=tolerance
    )
