"""MLflow side of a pretraining run on the driver: open the run before training, and after it
log plots / preview / final evaluation and register the backbone with the alias rules."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.config import Config


@dataclass
class Tracking:
    """An MLflow run owned by the driver; workers log into it by id (rank 0 only)."""

    uri: str
    run_id: str

    def end(self, status: str = "FINISHED") -> None:
        from service.tracking.runs import end_run

        end_run(self.run_id, status, tracking_uri=self.uri)

    def logger(self):
        from service.tracking.logger import MetricLogger

        return MetricLogger(self.uri, self.run_id)


def open_tracking(
    config: Config, *, parent_run_id: str | None = None, run_name: str | None = None
) -> Tracking | None:
    """Resolve + check the tracking URI (fails fast when unreachable), then create the run."""
    if not config.mlflow.enabled:
        return None
    from service.tracking.runs import start_pretrain_run
    from service.tracking.uri import check_tracking_server, resolve_tracking_uri

    uri = resolve_tracking_uri(config.mlflow)
    check_tracking_server(uri)
    run_id = start_pretrain_run(
        config,
        uri,
        run_name=run_name or config.train.run_name,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
    )
    return Tracking(uri=uri, run_id=run_id)


def _progress(message: str) -> None:
    print(f"[finalize] {message}", file=sys.stderr, flush=True)


def finalize_run(
    config: Config, tracking: Tracking | None, checkpoint_dir: str | None, workdir: Path
) -> dict[str, Any]:
    """Evaluate the final encoder, log artifacts and register it. Returns summary additions."""
    if tracking is None or checkpoint_dir is None:
        if tracking is not None:
            tracking.end("FINISHED")
        return {}
    from service.data.augment import eval_transform
    from service.data.preview import save_augmentation_preview
    from service.eval.features import extract_features
    from service.registry.register import register_encoder
    from service.tracking.plots import plot_embeddings, plot_training_curves
    from service.train.checkpoint import load_encoder_from_checkpoint, load_state

    logger = tracking.logger()
    state = load_state(checkpoint_dir)
    backbone, _ = load_encoder_from_checkpoint(checkpoint_dir)
    history = state["history"]
    _progress("plotting training curves and augmentation preview")
    logger.log_artifact(plot_training_curves(history, workdir / "training_curves.png"), "plots")
    preview = save_augmentation_preview(
        config.data.train,
        workdir / "augmentation_preview.png",
        config.augment,
        config.data.image_size,
    )
    logger.log_artifact(preview, "plots")

    knn = next((h["knn_top1"] for h in reversed(history) if "knn_top1" in h), None)
    if config.data.test:
        _progress(f"embedding the test split {config.data.test}")
        transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
        features, labels = extract_features(backbone, config.data.test, transform)
        logger.log_artifact(
            plot_embeddings(features.numpy(), labels.numpy(), workdir / "test_embeddings.png"),
            "plots",
        )

    summary: dict[str, Any] = {"run_id": tracking.run_id, "tracking_uri": tracking.uri}
    name = config.mlflow.registered_model_name
    if name:
        _progress(f"registering the backbone as {name!r}")
        size = config.data.image_size
        example = np.zeros((1, 3, size, size), dtype=np.float32)
        metric = knn if knn is not None else -float(history[-1]["train_loss"])
        registered = register_encoder(
            backbone,
            tracking_uri=tracking.uri,
            run_id=tracking.run_id,
            name=name,
            tags=_version_tags(config, knn, backbone),
            input_example=example,
            metric_name=config.mlflow.champion_metric if knn is not None else "neg_train_loss",
            metric_value=float(metric),
            config=config,
        )
        summary.update(
            model_uri=registered["model_uri"],
            version=registered["version"],
            champion=registered["champion"],
        )
    # Flushed after registration: that call waits out a tracking-server outage with MLflow's
    # own retries, so buffered plots/metrics get their best chance to land here.
    report = logger.flush()
    if not getattr(report, "ok", True):
        _progress(f"some MLflow records could not be logged: {report}")
    tracking.end("FINISHED")
    return summary


def _version_tags(config: Config, knn: float | None, backbone: torch.nn.Module) -> dict[str, str]:
    return {
        "dataset": config.data.train,
        "method": config.loss.name,
        "temperature": str(config.loss.temperature),
        "augment_strength": str(config.augment.strength),
        "knn_top1": "" if knn is None else f"{knn:.4f}",
        "embedding_dim": str(getattr(backbone, "out_dim", "")),
        "arch": config.model.arch,
        "input_size": str(config.data.image_size),
        "normalize_mean": ",".join(map(str, config.augment.mean)),
        "normalize_std": ",".join(map(str, config.augment.std)),
    }
