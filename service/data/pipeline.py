"""The training-data path behind two calls: :func:`prepare` on the driver, :func:`open_batches` on
each worker. Everything about *how* rows reach the loss is decided here, once.

``prepare(config, world=W)`` (driver, before the trainer starts; no worker needed):

- selects the training rows (``data.train`` minus the held-out validation rows, ``data.limit``)
  of whichever source owns the path (:mod:`service.data.sources`) and keys them
  (:class:`~service.data.decoded.DecodedKey`: files, row ids, image size, captions);
- picks the mode, with the reason logged: ``ray`` (``data.reader=ray``: a lazy Ray dataset the
  trainer shards), ``shared`` (decode once here, one read-only copy in Ray's object store for
  every rank), ``decoded`` (each rank decodes the rows into memory), or ``stream`` (decode per
  row in the loader: the rows do not fit, or the backend augments per image).

``open_batches(prepared, config, rank, world, device)`` (each worker) opens the reader the mode
names and the augmentation backend (:mod:`service.data.augmenters`) and returns a
:class:`TrainData`: ``steps_per_epoch`` (the same on every rank) and ``epoch(e)``, which yields
exactly that many ``(views, labels, captions or None)``, views on ``device``.

    >>> from service.config import load_config
    >>> config = load_config(overrides={"data.limit": 64, "train.global_batch_size": 32})
    >>> prepared = prepare(config, world=2)
    >>> prepared.mode, prepared.rows
    ('decoded', 64)
    >>> data = open_batches(prepared, config, rank=0, world=2, device=torch.device("cpu"))
    >>> views, labels, captions = next(iter(data.epoch(0)))
    >>> data.steps_per_epoch, len(views), tuple(views[0].shape), captions
    (2, 2, (16, 3, 32, 32), None)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from service.config import Config
from service.data.augmenters import Views, augmenter, n_views
from service.data.decoded import SharedDecoded, decode_once_plan, decoded_key
from service.data.plan import (
    MODES,
    LoaderBatch,
    PreparedData,
    steps_per_epoch,
    training_rows,
)
from service.data.readers import READERS

log = logging.getLogger("service.data")

TrainBatch = tuple[Views, torch.Tensor, list[str] | None]


def prepare(
    config: Config, *, world: int = 1, shared: SharedDecoded | None = None, share: bool = True
) -> PreparedData:
    """Decide the run's data path once, on the driver (see the module docstring).

    ``shared``: a decoded copy the caller already holds (the Tune driver, for all its trials);
    ``share=False`` never puts a copy in the object store (tests, single-process tools)."""
    d = config.data
    rows = training_rows(config)
    key = decoded_key(d.train, rows, d.image_size, config.text.column)
    if d.reader == "ray":
        from service.data.ray_dataset import build_ray_train_dataset

        datasets = {"train": build_ray_train_dataset(config)}
        return PreparedData("ray", len(rows), key, "Ray Data shards, decoded in map tasks", None,
                            datasets)  # fmt: skip
    if not augmenter(config).yields_uint8:
        return PreparedData("stream", len(rows), key, "decode and augment per image (torchvision)")
    if shared is None and share and world > 1:
        shared = _share(config)
    if shared is not None:
        return PreparedData("shared", len(rows), key, f"decoded once for all ranks: "
                            f"{shared.key.describe()}", shared)  # fmt: skip
    plan = decode_once_plan(len(rows), d.image_size, copies=world)
    if plan.decode_once:
        return PreparedData("decoded", len(rows), key, f"decode once into memory, {plan.reason()} "
                            f"(one copy per rank: {world})")  # fmt: skip
    return PreparedData("stream", len(rows), key, f"streaming (decode per item, batched augment), "
                        f"{plan.reason()}")  # fmt: skip


def _share(config: Config) -> SharedDecoded | None:
    """The object-store copy, when Ray is up and it applies and fits (else None, logged)."""
    import ray

    if not ray.is_initialized():  # never start a Ray instance just for this
        return None
    from service.console import say
    from service.data.decoded import share_training_rows

    copy, why = share_training_rows(config)
    if copy is None:
        say("data", why)
    return copy


@dataclass
class TrainData:
    """One worker's training batches (see :func:`open_batches`). ``sampler``/``loader`` are the
    PyTorch reader's (None with Ray Data shards)."""

    steps_per_epoch: int
    source: Callable[[int], Iterator[LoaderBatch]]
    augment: Callable[[Any], Views]
    sampler: Any = None
    loader: Any = None

    def epoch(self, epoch: int) -> Iterator[TrainBatch]:
        """Exactly ``steps_per_epoch`` batches (Ray shards may differ by a batch across ranks)."""
        batches = self.source(epoch)
        for _, (data, labels, captions) in zip(range(self.steps_per_epoch), batches, strict=False):
            yield self.augment(data), labels, captions


def open_batches(
    prepared: PreparedData, config: Config, rank: int, world: int, device: torch.device
) -> TrainData:
    """This rank's :class:`TrainData` for the mode ``prepared`` names (on the worker)."""
    if prepared.mode not in READERS:
        raise ValueError(f"unknown data mode {prepared.mode!r}; expected one of {MODES}")
    log.info("data: %s", prepared.reason)
    rows, source, sampler, loader = READERS[prepared.mode](prepared, config, rank, world, device)
    steps = steps_per_epoch(rows, config.train.global_batch_size)
    if steps < 1:
        raise ValueError(
            f"the training data ({rows} usable rows) yields no full global batch of "
            f"{config.train.global_batch_size} per epoch; lower train.global_batch_size or add data"
        )
    augment = augmenter(config).batch_fn(config, rank, device)
    return TrainData(steps, source, augment, sampler, loader)


__all__ = ["MODES", "PreparedData", "TrainData", "n_views", "open_batches", "prepare",
           "steps_per_epoch"]  # fmt: skip
