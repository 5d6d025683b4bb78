"""Per-step and end-of-epoch bookkeeping: throughput, the kNN monitor, report + checkpoint."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from torch import nn

from service.config import Config
from service.train.checkpoint import save_state, training_state_dict
from service.train.state import TrainState


class EpochMeter:
    """Loss and images/s of one epoch, and of the window since the last step log line."""

    def __init__(self) -> None:
        self.start = self.window_start = time.perf_counter()
        self.loss_sum, self.steps, self.images, self.window_images = 0.0, 0, 0, 0

    def update(self, loss: float, images: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.images += images
        self.window_images += images

    def window_rate(self) -> float:
        """Images/s since the previous call (or the epoch start); starts a new window."""
        now = time.perf_counter()
        rate = self.window_images / max(now - self.window_start, 1e-9)
        self.window_start, self.window_images = now, 0
        return rate

    def epoch_metrics(self, s: TrainState) -> dict[str, Any]:
        return {
            "epoch": s.epoch,
            "global_step": s.global_step,
            "train_loss": self.loss_sum / max(1, self.steps),
            "lr": s.scheduler.get_last_lr()[0],
            "temperature": float(s.criterion.temperature),
            "images_per_s": self.images / max(time.perf_counter() - self.start, 1e-9),
        }


class KnnMonitor:
    """Online kNN top-1 on the validation split (rank 0); memory bank = training rows.

    The validation split is ``data.val`` or the rows held out from ``data.train``
    (``service.data.splits``); neither is ever trained on, and the test split is not used here.
    """

    def __init__(self, config: Config):
        from service.data.augment import eval_transform
        from service.data.splits import train_val_rows

        self.config = config
        self.transform = eval_transform(
            config.data.image_size, config.augment.mean, config.augment.std
        )
        rows = train_val_rows(config)
        self.bank_rows = rows.train_rows(config.eval.knn_max_train)
        self.val_rows = rows.val if not config.data.val else None

    def due(self, epoch: int) -> bool:
        every, last = self.config.eval.knn_every_epochs, self.config.train.epochs - 1
        return epoch == last or (epoch + 1) % every == 0

    def __call__(self, backbone: nn.Module, device: torch.device) -> float:
        from service.eval.features import extract_features
        from service.eval.knn import knn_top1

        d, e = self.config.data, self.config.eval
        bank, bank_labels = extract_features(
            backbone, d.train, self.transform, indices=self.bank_rows, device=device
        )
        val, val_labels = extract_features(
            backbone, d.val or d.train, self.transform, indices=self.val_rows, device=device
        )
        return knn_top1(bank, bank_labels, val, val_labels, e.knn_k, e.knn_temperature)


def report_epoch(s: TrainState, metrics: dict[str, Any]) -> None:
    """``ray.train.report`` the epoch, with a checkpoint when due (rank 0 writes it).

    Final metrics always go with a checkpoint: Train V2 keeps ``Result.metrics`` only then.
    """
    import ray.train

    t = s.config.train
    save = s.epoch == t.epochs - 1 or (s.epoch + 1) % t.checkpoint_every_epochs == 0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if save and s.rank == 0:
            save_state(tmp, training_state_dict(s))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
