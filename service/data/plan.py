"""What :func:`service.data.pipeline.prepare` decides on the driver and every reader reads: the
data mode, the training rows and their key (:class:`PreparedData`), and the batch shapes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from service.data.decoded import DecodedKey, SharedDecoded
from service.data.decoded import training_rows as training_rows  # the one selection, re-exported

LoaderBatch = tuple[Any, torch.Tensor, list[str] | None]  # (uint8 or views, labels, captions)
MODES = ("ray", "shared", "decoded", "stream")


def steps_per_epoch(rows: int, global_batch_size: int) -> int:
    """Full global batches per epoch; the last partial batch is dropped on every rank.

    ``DistributedSampler(drop_last=True)`` + a ``drop_last`` loader give floor(floor(N/W)/b),
    which equals floor(N / (W·b)); the Ray Data reader is cut to the same count.
    """
    return rows // global_batch_size


@dataclass(frozen=True)
class PreparedData:
    """What the driver decided about a run's training data (pickled into every worker)."""

    mode: str  # one of MODES
    rows: int  # training rows selected (before undecodable ones are skipped)
    key: DecodedKey  # which rows: the fingerprint a shared copy must match
    reason: str  # why this mode, for the log
    shared: SharedDecoded | None = None
    # Driver only: the Ray datasets the trainer shards (``TorchTrainer(datasets=...)``).
    datasets: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def for_workers(self) -> PreparedData:
        """This, without the driver-only datasets (workers get their shard from Ray Train)."""
        return replace(self, datasets={})


def with_captions(batches: Any) -> Iterator[LoaderBatch]:
    """Loader batches ``(x, labels)`` or ``(x, labels, captions)`` → always three items."""
    for batch in batches:
        yield batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
