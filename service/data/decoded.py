"""Decode once: training rows → one uint8 tensor ``[N, 3, S, S]`` in shared memory.

With ``augment.backend=batched`` the PyTorch reader decodes every training row once, up front,
into a single tensor that DataLoader workers read without copies (``share_memory_()``: forked
or spawned workers map the same pages). Each step then gathers an index batch (``[b, 3, S, S]``
uint8, 4x fewer bytes than float views) and augments it on the model's device
(:class:`~service.data.batch_augment.BatchSimCLRAugment`). Per-image Python work happens once
per row, not once per row, view and epoch.

Image size: every row is stored at ``S x S`` with ``S = data.image_size``. Rows already that
size (CIFAR at 32 px) are stored pixel for pixel as :func:`~service.data.decode.decode_image`
returns them; other rows are resized (shorter side to ``S``, PIL bilinear with antialiasing)
and centre-cropped to a square, which lets images of different sizes share one tensor and bounds
its bytes before anything is decoded. The price, against the per-image ``torchvision`` backend:
random crops are taken from the central square at ``S`` px, not from the full-resolution image,
so small crops of large images are upsampled from fewer pixels. For CIFAR-size data (the case
this path is for) nothing changes.

Corrupt rows are skipped, counted in :class:`~service.data.decode.DecodeStats` and held to
``data.max_bad_fraction`` exactly as ``ParquetImageDataset`` does (a fraction of the whole split;
row ids are global rows of the Parquet files).

Whether to decode once is decided from the exact size (``N * 3 * S * S`` bytes, one copy per rank
on the node) against available memory (:func:`decode_once_plan`); data that does not fit streams
through ``ParquetImageDataset`` instead, still batched on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from service.data.captions import is_caption
from service.data.decode import DecodeStats, decode_image
from service.data.errors import CorruptImageError
from service.data.parquet import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    default_columns,
    inspect_parquet,
    read_rows,
)
from service.data.torch_dataset import NO_LABEL

# Decode once only if all ranks' copies take at most this share of the memory available now:
# the rest is for the model, the loader's batches, Ray's object store and other processes.
DECODE_MEMORY_FRACTION = 0.5


def to_uint8_square(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image → ``uint8 [3, size, size]``: unchanged when already ``size x size``, else the
    shorter side resized to ``size`` and centre-cropped (see the module docstring).

    >>> to_uint8_square(Image.new("RGB", (40, 30), (9, 8, 7)), 16)[:, 0, 0].tolist()
    [9, 8, 7]
    """
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decoded_bytes(rows: int, size: int) -> int:
    """Bytes of ``rows`` decoded ``uint8 [3, size, size]`` images."""
    return rows * 3 * size * size


def available_memory() -> int:
    """Bytes of memory available to new allocations now (``psutil``; ``/proc/meminfo``)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with ray
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024


@dataclass(frozen=True)
class DecodePlan:
    """Whether to decode once, and the numbers behind it (for the log line)."""

    decode_once: bool
    estimated_bytes: int  # all copies on this node
    available_bytes: int
    fraction: float

    def reason(self) -> str:
        verdict = "<=" if self.decode_once else ">"
        return (
            f"estimated {self.estimated_bytes / 2**20:.1f} MiB decoded {verdict} "
            f"{self.fraction:.0%} of {self.available_bytes / 2**20:.0f} MiB available memory"
        )


def decode_once_plan(
    rows: int,
    size: int,
    copies: int = 1,
    available: int | None = None,
    fraction: float = DECODE_MEMORY_FRACTION,
) -> DecodePlan:
    """Decode once when ``copies`` decoded copies fit in ``fraction`` of available memory.

    >>> decode_once_plan(50_000, 32, copies=2, available=2**30).decode_once  # 293 MiB vs 512
    True
    >>> decode_once_plan(1_281_167, 224, available=64 * 2**30).decode_once  # ImageNet: 180 GiB
    False
    """
    estimated = decoded_bytes(rows, size) * max(1, copies)
    available = available_memory() if available is None else available
    return DecodePlan(estimated <= fraction * available, estimated, available, fraction)


@dataclass
class DecodedImages:
    """Decoded training rows: ``images`` uint8 ``[N, 3, S, S]`` in shared memory, ``labels``
    int64 ``[N]`` (``-1`` where unlabelled), the decode outcome, and in image–text mode the
    captions of the same rows (``texts``, aligned with ``images``)."""

    images: torch.Tensor
    labels: torch.Tensor
    stats: DecodeStats
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)


def decode_rows(
    path: str,
    indices: np.ndarray | None,
    size: int,
    max_bad_fraction: float = 0.01,
    text_column: str | None = None,
) -> DecodedImages:
    """Decode rows ``indices`` of ``path`` (all when None) into one shared uint8 tensor; with
    ``text_column``, keep each kept row's caption (a null or empty caption drops its row, counted
    like a corrupt image, and a corrupt image drops its caption).

    Raises :class:`~service.data.errors.TooManyBadImagesError` above ``max_bad_fraction``.

    >>> d = decode_rows("service/data/bundled/cifar10-test-subset.parquet", np.arange(4), 32)
    >>> tuple(d.images.shape), d.images.dtype, d.images.is_shared(), d.stats.total
    ((4, 3, 32, 32), torch.uint8, True, 4)
    """
    source = inspect_parquet(path)
    table = read_rows(source, default_columns(source, text_column), indices)
    n = table.num_rows
    captions = table.column(text_column).to_pylist() if text_column else None
    images = torch.empty((n, 3, size, size), dtype=torch.uint8).share_memory_()
    if source.has_label:
        all_labels = table.column(LABEL_COLUMN).to_numpy().astype(np.int64)
    else:
        all_labels = np.full(n, NO_LABEL, dtype=np.int64)
    file_rows = indices if indices is not None else np.arange(n)
    stats = DecodeStats()
    kept: list[int] = []
    for i, blob in enumerate(table.column(IMAGE_COLUMN).to_pylist()):
        if captions is not None and not is_caption(captions[i]):
            stats.add_bad(f"row {int(file_rows[i])} (null or empty caption)")
            continue
        try:
            image = decode_image(blob)
        except CorruptImageError as exc:
            stats.add_bad(f"row {int(file_rows[i])} ({exc})")
            continue
        images[len(kept)] = to_uint8_square(image, size)
        kept.append(i)
        stats.add_ok()
    where = f"{str(path)!r}"
    stats.warn(where)
    stats.check(max_bad_fraction, where)
    labels = torch.from_numpy(all_labels[np.asarray(kept, dtype=np.int64)])
    texts = [captions[i] for i in kept] if captions is not None else None
    # A view of the shared storage: the (few) skipped rows' slots stay unused at the end.
    return DecodedImages(images[: len(kept)], labels, stats, texts)


class IndexBatchDataset(Dataset):
    """``dataset[list of row indices]`` → ``(uint8 [b, 3, S, S], int64 [b])`` (image–text mode:
    ``(images, labels, list of b captions)``): one gather per batch. Use with
    ``DataLoader(batch_size=None, sampler=BatchSampler(...))``; workers index the shared tensor,
    nothing is copied to them."""

    def __init__(self, decoded: DecodedImages) -> None:
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.decoded)

    def __getitem__(self, rows: list[int]) -> tuple[Any, ...]:
        index = torch.as_tensor(rows, dtype=torch.long)
        images, labels = self.decoded.images.index_select(0, index), self.decoded.labels[index]
        if self.decoded.texts is None:
            return images, labels
        return images, labels, [self.decoded.texts[r] for r in rows]
