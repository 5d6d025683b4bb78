"""``contrastive evaluate``: linear + kNN evaluation of a frozen encoder.

The encoder comes from a training checkpoint or the model registry; resolving that (and the
config that describes its architecture) is this command's job, so the evaluation library
(``service.eval``) takes a ready model and never imports ``service.train``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.config import Config, load_config


def _load_encoder(checkpoint: str | None, model: str | None) -> tuple[Any, Callable, Config | None]:
    """(frozen encoder, eval transform, the checkpoint's Config or None for a registered model)."""
    if checkpoint:
        from service.data.augment import eval_transform
        from service.train.checkpoint import load_encoder_from_checkpoint

        encoder, config = load_encoder_from_checkpoint(checkpoint)
        transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
        return encoder, transform, config
    from service.registry.load import load_encoder

    encoder, transform = load_encoder(model)
    return encoder, transform, None


def _log_to_run(result: dict[str, Any], config: Config, run_id: str) -> None:
    from service.eval.offline import evaluation_metrics
    from service.tracking.logger import MetricLogger
    from service.tracking.uri import resolve_tracking_uri

    logger = MetricLogger(resolve_tracking_uri(config.mlflow), run_id)
    logger.log_metrics(evaluation_metrics(result), step=0)
    logger.flush()


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
    random-baseline architecture come from ``config_path`` + ``overrides``. ``log_to_run`` logs
    the top-1s into that MLflow run. Returns the JSON-able result (+ ``source``, and
    ``baseline_random`` with ``random_baseline``).
    """
    from service.eval.offline import evaluate_beside_random

    if bool(checkpoint) == bool(model):
        raise ValueError("evaluate needs exactly one of checkpoint= or model=")
    encoder, transform, ckpt_config = _load_encoder(checkpoint, model)
    config = ckpt_config or load_config(config_path, overrides)
    result = evaluate_beside_random(
        encoder, transform, train, test, config, random_baseline=random_baseline
    )
    result["source"] = checkpoint or model
    if log_to_run:
        _log_to_run(result, config, log_to_run)
    return result
