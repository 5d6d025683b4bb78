"""Frozen-encoder feature extraction over a labelled Parquet dataset."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from service.console import Progress


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    data_path: str,
    transform: Callable,
    *,
    batch_size: int = 256,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    max_bad_fraction: float = 0.01,
    indices: np.ndarray | None = None,
    label: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(features [n, d] float32 on CPU, labels [n] int64)`` for every decodable row
    (of the global row ``indices`` when given, e.g. a held-out validation split).

    Long extractions show progress under ``label`` (images/s and ETA, ``service.console``)."""
    from service.data import ParquetImageDataset, make_dataloader

    dataset = ParquetImageDataset(
        data_path, transform, n_views=None, limit=limit, max_bad_fraction=max_bad_fraction,
        indices=indices,
    )  # fmt: skip
    loader = make_dataloader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    with Progress(len(dataset), label, unit="images") as progress:
        for images, batch_labels in progress.iterate(loader, size=lambda batch: len(batch[1])):
            features.append(encoder(images.to(device)).float().cpu())
            labels.append(batch_labels)
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels)
