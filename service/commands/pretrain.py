"""``contrastive pretrain``: distributed contrastive pretraining on Ray Train."""

from __future__ import annotations

import argparse
from typing import Any

from service.commands import args
from service.commands.config import load_checked_config


def add_parser(subparsers: args.Subparsers) -> None:
    """Register ``contrastive pretrain`` and its arguments."""
    p = subparsers.add_parser("pretrain", help="distributed contrastive pretraining on Ray Train")
    args.add_config(p, default="jobs/configs/smoke-cpu.yaml")
    args.add_address(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run train.storage_path/train.run_name (same MLflow run); without it "
        "an existing run name is refused",
    )
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line → :func:`pretrain_command`."""
    return args.call(pretrain_command, a)


def pretrain_command(
    config_path: str | None,
    overrides: list[str] | None = None,
    address: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Load and validate the config (bad input fails here, before Ray), then pretrain.

    ``address`` is a Ray address; None starts (or joins, under ``ray job submit``) a local Ray.
    ``resume`` continues the run of the same name (``train.resume``). Returns the run summary:
    checkpoint, run_id, model_uri, knn_top1, ...
    """
    from service.train.driver import run_pretraining

    config = load_checked_config(
        config_path, [*(overrides or []), *(["train.resume=true"] * resume)]
    )
    return run_pretraining(config, address=address)
