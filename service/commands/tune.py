"""``contrastive tune``: a Ray Tune sweep over temperature / augmentation strength."""

from __future__ import annotations

import argparse
from typing import Any

from service.commands import args
from service.commands.config import load_checked_config


def add_parser(subparsers: args.Subparsers) -> None:
    """Register ``contrastive tune`` and its arguments."""
    p = subparsers.add_parser(
        "tune", help="Ray Tune sweep over temperature / augmentation strength"
    )
    args.add_config(p, default="jobs/configs/tune-smoke.yaml")
    p.add_argument(
        "--num-samples", type=int, default=None, help="trials (default: tune.num_samples)"
    )
    args.add_address(p)
    p.add_argument(
        "--resume", action="store_true", help="continue the sweep of the same name after a crash"
    )
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line → :func:`tune_command`."""
    return args.call(tune_command, a)


def tune_command(
    config_path: str | None,
    overrides: list[str] | None = None,
    num_samples: int | None = None,
    address: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Load the config, then run (or with ``resume``, continue) the sweep it describes.

    Returns the JSON-able summary: best_config (the searched keys), best_metric, num_trials,
    num_stopped_early, num_failed, parent_run_id, model_uri, ...
    """
    from service.tune.sweep import run_sweep

    config = load_checked_config(config_path, overrides)
    return run_sweep(config, num_samples=num_samples, address=address, resume=resume)
