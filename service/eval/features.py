"""Frozen-encoder feature extraction over a labelled Parquet dataset."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from service.console import Progress


def input_memory_format(encoder: nn.Module) -> torch.memory_format:
    """``channels_last`` when the encoder's first conv weight is stored that way (trained with
    ``model.channels_last``): feeding contiguous images to such a network makes every conv
    convert its input (~1.6x slower on CPU).

    >>> conv = nn.Conv2d(3, 8, 3)
    >>> input_memory_format(conv), input_memory_format(conv.to(memory_format=torch.channels_last))
    (torch.contiguous_format, torch.channels_last)
    """
    weight = next((p for p in encoder.parameters() if p.dim() == 4), None)
    if weight is not None and weight.is_contiguous(memory_format=torch.channels_last):
        if not weight.is_contiguous():  # a 1x1 weight is both; only a real layout counts
            return torch.channels_last
    return torch.contiguous_format


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
    memory_format = input_memory_format(encoder)
    features, labels = [], []
    with Progress(len(dataset), label, unit="images") as progress:
        for images, batch_labels in progress.iterate(loader, size=lambda batch: len(batch[1])):
            images = images.to(device).contiguous(memory_format=memory_format)
            features.append(encoder(images).float().cpu())
            labels.append(batch_labels)
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels)
