"""``contrastive evaluate``: linear + kNN evaluation of a frozen encoder.

The encoder comes from a training checkpoint or the model registry; resolving that (and the
config that describes its architecture) is this command's job, so the evaluation library
(``service.eval``) takes a ready model and never imports ``service.train``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.commands import args
from service.commands.config import load_checked_config
from service.config import Config


def add_parser(subparsers: args.Subparsers) -> None:
    """Register ``contrastive evaluate`` and its arguments."""
    p = subparsers.add_parser("evaluate", help="linear + kNN evaluation of a frozen encoder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a pretraining checkpoint directory")
    src.add_argument("--model", help="a registered encoder, models:/NAME@ALIAS or models:/NAME/V")
    p.add_argument("--train", required=True, help="labelled Parquet for fitting the probes")
    p.add_argument("--test", required=True, help="labelled Parquet for scoring the probes")
    p.add_argument("--baseline", choices=["random", "none"], default="none")
    p.add_argument("--log-to-run", default=None, help="MLflow run id to log the results into")
    args.add_config(p)
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line → :func:`evaluate_command`."""
    return args.call(evaluate_command, a, random_baseline=a.baseline == "random")


@dataclass(frozen=True)
class _Source:
    """The encoder to evaluate, its eval transform, the Config that describes its training (a
    checkpoint's own; None for a registered model) and how to build its architecture afresh."""

    encoder: Any
    transform: Callable
    config: Config | None
    build_random: Callable[[], Any] | None


def _from_checkpoint(checkpoint: str) -> _Source:
    from service.data.augment import eval_transform
    from service.train.checkpoint import load_encoder_from_checkpoint

    encoder, config = load_encoder_from_checkpoint(checkpoint)
    transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
    return _Source(encoder, transform, config, None)  # None: the baseline builds config.model


def _from_registry(model: str, tracking_uri: str) -> _Source:
    """A registered encoder: the random baseline is built from *its* recorded architecture
    (``encoder.json``), never from the command's config, which may describe another model."""
    from service.registry import backbone_from_spec, load_registered

    loaded = load_registered(model, tracking_uri)
    return _Source(loaded.module, loaded.preprocess, None, lambda: backbone_from_spec(loaded.spec))


def _log_to_run(result: dict[str, Any], config: Config, run_id: str) -> None:
    from service.eval.offline import evaluation_metrics
    from service.tracking.logger import MetricLogger
    from service.tracking.uri import resolve_tracking_uri

    logger = MetricLogger(resolve_tracking_uri(config.mlflow), run_id)
    logger.log_metrics(evaluation_metrics(result), step=0)
    with tempfile.TemporaryDirectory() as tmp:
        if "baseline_random" in result:
            logger.log_artifact(_comparison_chart(result, Path(tmp)), "plots")
        logger.flush()  # before the chart's directory goes: uploads may be deferred to here


def _comparison_chart(result: dict[str, Any], workdir: Path) -> Path:
    """plots/pretrained_vs_random.png: the evaluation's kNN and linear top-1 beside random
    init, on the test split."""
    from service.tracking.plots import plot_baseline_comparison

    return plot_baseline_comparison(
        result, result["baseline_random"], workdir / "pretrained_vs_random.png", split="test"
    )


def evaluate_command(
    train: str,
    test: str,
    *,
    checkpoint: str | None = None,
    model: str | None = None,
    random_baseline: bool = False,
    log_to_run: str | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate the encoder of ``checkpoint`` (a checkpoint directory) or ``model``
    (``models:/NAME@ALIAS``, ``models:/NAME/V`` or a pulled directory) on ``train``/``test``.

    A checkpoint carries its own config; for a registered model the probe settings and the
    tracking store come from ``config_path`` + ``overrides`` (``resolve_tracking_uri``), and the
    random baseline is the registered architecture (``encoder.json``) at random init.
    ``log_to_run`` logs the top-1s into that MLflow run. Returns the JSON-able result
    (+ ``source``, and ``baseline_random`` with ``random_baseline``).
    """
    from service.eval.offline import evaluate_beside_random
    from service.tracking.uri import resolve_tracking_uri

    if bool(checkpoint) == bool(model):
        raise ValueError("evaluate needs exactly one of checkpoint= or model=")
    if checkpoint:
        source = _from_checkpoint(checkpoint)
        config = source.config or load_checked_config(config_path, overrides)
    else:
        config = load_checked_config(config_path, overrides)
        source = _from_registry(str(model), resolve_tracking_uri(config.mlflow))
    result = evaluate_beside_random(
        source.encoder,
        source.transform,
        train,
        test,
        config,
        random_baseline=random_baseline,
        build_random=source.build_random,
    )
    result["source"] = checkpoint or model
    if log_to_run:
        _log_to_run(result, config, log_to_run)
    return result
