"""`contrastive demo`: the README's main command — pretrain on the bundled subset with embedded
Ray and a local MLflow store, evaluate against a random-init encoder, and say where things are."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service.config import load_config


def run_demo(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    from service.eval.offline import evaluate_command
    from service.train.driver import run_pretraining

    config = load_config(config_path, overrides)
    print(
        f"[demo] pretraining {config.model.arch} with {config.loss.name} on {config.data.train} "
        f"({config.train.num_workers} Ray workers, global batch {config.train.global_batch_size})",
        file=sys.stderr,
    )
    summary = run_pretraining(config)
    print("[demo] evaluating the encoder (linear + kNN) beside a random-init one", file=sys.stderr)
    evaluation = evaluate_command(
        argparse.Namespace(
            checkpoint=summary["checkpoint"],
            model=None,
            train=config.data.train,
            test=config.data.test,
            baseline="random",
            log_to_run=summary.get("run_id"),
            config=config_path,
            overrides=overrides,
        )
    )
    summary["evaluation"] = evaluation
    uri = summary.get("tracking_uri")
    if uri:
        ui = uri if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"
        print(
            f"[demo] done. checkpoint: {summary['checkpoint']}\n"
            f"[demo] MLflow run {summary.get('run_id')} (open with: {ui}); "
            f"registered model: {summary.get('model_uri')}",
            file=sys.stderr,
        )
    return summary
