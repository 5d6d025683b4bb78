"""``contrastive demo``: the README's main command — pretrain on the bundled subset with embedded
Ray and a local MLflow store, evaluate against a random-init encoder, and say where things are."""

from __future__ import annotations

import argparse
import time
from typing import Any

from service.commands import args
from service.commands.config import load_checked_config
from service.commands.evaluate import evaluate_command
from service.console import say


def add_parser(subparsers: args.Subparsers) -> None:
    """Register ``contrastive demo`` and its arguments."""
    p = subparsers.add_parser(
        "demo", help="pretrain → evaluate → register on the bundled data (embedded)"
    )
    args.add_config(p, default="jobs/configs/smoke-cpu.yaml")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line → :func:`demo_command`."""
    return args.call(demo_command, a)


def demo_command(config_path: str | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Pretrain → evaluate (beside random init, logged into the run) → where to look.

    Returns the pretraining summary with the evaluation under ``evaluation``.
    """
    from service.train.driver import run_pretraining

    config = load_checked_config(config_path, overrides)
    # Every demo is a new pretraining: a new run name, never the previous demo's checkpoints.
    config.train.run_name += time.strftime("-%Y%m%d-%H%M%S")
    say(
        "demo",
        f"pretraining {config.model.arch} with {config.loss.name} on {config.data.train} "
        f"({config.train.num_workers} Ray workers, global batch {config.train.global_batch_size})",
    )
    summary = run_pretraining(config)
    say("demo", "evaluating the encoder (linear + kNN) beside a random-init one")
    summary["evaluation"] = evaluate_command(
        config.data.train,
        config.data.test,
        checkpoint=summary["checkpoint"],
        random_baseline=True,
        log_to_run=summary.get("run_id"),
    )
    _say_where(summary)
    return summary


def _say_where(summary: dict[str, Any]) -> None:
    uri = summary.get("tracking_uri")
    if not uri:
        return
    # A tracking server has its own UI; a local store is opened with `contrastive ui`.
    ui = uri if uri.startswith("http") else f"contrastive ui --backend-store-uri {uri}"
    say("demo", f"done. checkpoint: {summary['checkpoint']}")
    say("demo", f"MLflow run {summary.get('run_id')}; registered model: {summary.get('model_uri')}")
    say("demo", f"open the results: {ui}")
