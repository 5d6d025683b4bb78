"""The per-worker readers, one per data mode (:data:`READERS`, chosen by
:func:`service.data.pipeline.prepare`). Each opens this rank's share of the training rows and
returns ``(usable rows, epoch -> iterator of (images or views, labels, captions or None),
sampler, loader)``; what the images are (uint8 to augment, or finished views) is the
augmentation backend's business (:mod:`service.data.augmenters`), not the reader's.

- ``ray``: this worker's Ray Data shard (block order and a local buffer shuffled every epoch).
- ``shared`` / ``decoded``: the decoded rows (the driver's object-store copy, or this rank's
  own), one gather per index batch; ``DistributedSampler`` reshuffles every epoch.
- ``stream``: decode per row in the DataLoader (``DistributedSampler``); WebDataset shards are
  read as a stream (shard order + buffer shuffled every epoch, see :mod:`service.data.shards`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from service.config import Config
from service.data.augmenters import augmenter, n_views
from service.data.plan import LoaderBatch, PreparedData, training_rows, with_captions

Opened = tuple[int, Callable[[int], Iterator[LoaderBatch]], Any, Any]


def _sampler(dataset: Any, config: Config, rank: int, world: int) -> Any:
    from torch.utils.data import DistributedSampler

    return DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.train.seed,
        drop_last=True,
    )  # fmt: skip


def _epochs(loader: Any, sampler: Any) -> Callable[[int], Iterator[LoaderBatch]]:
    def epoch(e: int) -> Iterator[LoaderBatch]:
        sampler.set_epoch(e)
        return with_captions(iter(loader))

    return epoch


def _index_loader(decoded: Any, config: Config, rank: int, world: int, device: Any) -> Opened:
    """Decoded rows → one ``index_select`` per batch (no per-item work, nothing copied to
    DataLoader workers: they index the shared tensor)."""
    from torch.utils.data import BatchSampler, DataLoader

    from service.data.decoded import IndexBatchDataset

    dataset = IndexBatchDataset(decoded)
    sampler = _sampler(dataset, config, rank, world)
    workers = config.data.loader_workers
    loader = DataLoader(
        dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
        sampler=BatchSampler(sampler, config.per_worker_batch_size, drop_last=True),
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    return len(dataset), _epochs(loader, sampler), sampler, loader


def _shared(prepared: PreparedData, config: Config, rank: int, world: int, device: Any) -> Opened:
    """The driver's decoded copy, mapped read-only; refused unless it holds this run's rows."""
    from service.console import say
    from service.data.decoded import load_shared

    decoded = load_shared(prepared.shared, prepared.key)  # type: ignore[arg-type]
    _rows(prepared, config)  # and the prepared rows are the ones this worker's config selects
    if rank == 0:  # the e2e sweep test looks for this line in the job's logs
        say("data", f"shared decoded copy from the driver: {prepared.shared.key.describe()}")  # type: ignore[union-attr]
    return _index_loader(decoded, config, rank, world, device)


def _rows(prepared: PreparedData, config: Config) -> Any:
    """The training rows, checked against the driver's key (same files, rows, size)."""
    from service.data.decoded import decoded_key

    d = config.data
    rows = training_rows(config)
    if decoded_key(d.train, rows, d.image_size, config.text.column) != prepared.key:
        raise ValueError(
            f"this worker selects other training rows than the driver prepared "
            f"({prepared.key.describe()}); the data changed under the run, start it again"
        )
    return rows


def _decoded(prepared: PreparedData, config: Config, rank: int, world: int, device: Any) -> Opened:
    from service.data.decoded import decode_rows

    d = config.data
    rows = _rows(prepared, config)
    decoded = decode_rows(d.train, rows, d.image_size, d.max_bad_fraction, config.text.column)
    return _index_loader(decoded, config, rank, world, device)


def _stream(prepared: PreparedData, config: Config, rank: int, world: int, device: Any) -> Opened:
    """Decode (and with torchvision augment) per row in the DataLoader."""
    from service.data.sources import inspect_source

    item = augmenter(config).item_transform(config)
    source = inspect_source(config.data.train)
    if hasattr(source, "stream_loader"):  # a streaming format: its own iterable reader
        return source.stream_loader(prepared, config, rank, world, item)
    from service.data.torch_dataset import build_train_dataset, make_dataloader

    dataset = build_train_dataset(config, _rows(prepared, config), item_transform=item)
    sampler = _sampler(dataset, config, rank, world)
    loader = make_dataloader(
        dataset, batch_size=config.per_worker_batch_size, shuffle=False, drop_last=True,
        num_workers=config.data.loader_workers, sampler=sampler,
    )  # fmt: skip
    return len(dataset), _epochs(loader, sampler), sampler, loader


def _ray(prepared: PreparedData, config: Config, rank: int, world: int, device: Any) -> Opened:
    """This worker's Ray Data shard; batches land on the augment device when it augments."""
    import ray.train

    from service.data import ray_dataset as rd

    shard, b = ray.train.get_dataset_shard("train"), config.per_worker_batch_size
    target = device if augmenter(config).yields_uint8 else torch.device("cpu")
    column = config.text.column

    def epoch(e: int) -> Iterator[LoaderBatch]:
        if column:
            return rd.iter_captioned_batches(shard, b, column, drop_last=True, device=target)
        if augmenter(config).yields_uint8:
            batches = rd.iter_image_batches(shard, b, drop_last=True, device=target)
        else:
            batches = rd.iter_view_batches(shard, b, n_views(config), drop_last=True)
        return with_captions(batches)

    return prepared.rows, epoch, None, None


READERS: dict[str, Callable[..., Opened]] = {
    "ray": _ray,
    "shared": _shared,
    "decoded": _decoded,
    "stream": _stream,
}
