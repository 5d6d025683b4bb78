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


@torch.no_grad()
def pixel_features(
    encoder: nn.Module,
    pixels: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    label: str = "features",
) -> torch.Tensor:
    """Features ``[n, d]`` (float32, CPU) of images already decoded: uint8 ``pixels``
    ``[n, 3, S, S]`` (``service.data.augment.eval_pixels``), ``normalize`` per batch
    (``eval_normalize``). The same numbers as :func:`extract_features` over the same rows and
    batches, without decoding."""
    was_training = encoder.training
    encoder.eval()
    memory_format = input_memory_format(encoder)
    features = []
    starts = range(0, len(pixels), batch_size)
    with Progress(len(pixels), label, unit="images") as progress:
        for i in progress.iterate(starts, size=lambda i: len(pixels[i : i + batch_size])):
            images = normalize(pixels[i : i + batch_size]).to(device)
            features.append(encoder(images.contiguous(memory_format=memory_format)).float().cpu())
    encoder.train(was_training)
    return torch.cat(features) if features else torch.empty(0)


class EvalRows:
    """Rows ``indices`` of ``path`` (all when None) that an evaluation embeds again and again
    (the validation monitor, every epoch): with ``decode_once`` they are decoded at the first
    call into uint8 ``[n, 3, S, S]`` (the eval transform's resize + crop,
    ``service.data.decoded.eval_item``) and kept, so each later call only normalises and runs
    the forward; without it every call decodes them (:func:`extract_features`). Both give the
    same features. ``decodes`` counts the decoding passes."""

    def __init__(
        self,
        path: str,
        indices: np.ndarray | None,
        image_size: int,
        mean: list[float],
        std: list[float],
        *,
        decode_once: bool,
        label: str = "features",
    ) -> None:
        from service.data.augment import eval_normalize, eval_transform

        self.path, self.indices, self.image_size = path, indices, image_size
        self.transform = eval_transform(image_size, mean, std)
        self.normalize = eval_normalize(mean, std)
        self.decode_once, self.label = decode_once, label
        self.pixels: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.decodes = 0

    def features(
        self, encoder: nn.Module, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [n, d] float32 CPU, labels [n] int64)`` of ``encoder`` on the rows."""
        if not self.decode_once:
            self.decodes += 1
            return extract_features(
                encoder, self.path, self.transform, indices=self.indices, device=device,
                label=self.label,
            )  # fmt: skip
        if self.pixels is None:
            from service.data.decoded import decode_rows, eval_item

            decoded = decode_rows(self.path, self.indices, self.image_size, fit=eval_item)
            self.pixels, self.labels = decoded.images, decoded.labels
            self.decodes += 1
        x = pixel_features(encoder, self.pixels, self.normalize, device=device, label=self.label)
        return x, self.labels  # type: ignore[return-value]
