"""Ray Data path: ``read_parquet`` → ``map_batches(decode + augment)`` → ``iter_torch_batches``.

The driver builds the lazy dataset (:func:`build_ray_train_dataset`) and hands it to the
``TorchTrainer``; each Ray Train worker iterates its shard with :func:`iter_view_batches`::

    shard = ray.train.get_dataset_shard("train")
    for views, labels in iter_view_batches(shard, batch_size=per_worker_batch, n_views=2):
        ...  # same (list of [b,3,H,W] tensors, [b] labels) as the DataLoader path

Everything streams: Parquet is read block by block and decoded/augmented by Ray tasks ahead of
the trainer, so data larger than memory (or than the object store) trains without change.

Two augmentation backends (``augment.backend``): ``torchvision`` augments per image in the map
tasks and ships float views; ``batched`` only decodes there (:class:`DecodeBatchFn`: uint8
``[b, 3, S, S]``, 4x fewer bytes per view, ``2 x n_views`` fewer per row than float views) and
the Train worker augments whole batches on its device (:func:`iter_image_batches` +
``BatchSimCLRAugment``; images are resized/cropped to ``S x S`` as in
``service.data.decoded``).

Shuffling, every epoch: the 256-row blocks are visited in a new random order
(``randomize_block_order``; it waits for the read to list all blocks, which holds the encoded
bytes in the object store, spilling if needed) and batches are drawn from a local shuffle buffer
of ``shuffle_buffer_rows(batch)`` rows (``iter_torch_batches(local_shuffle_buffer_size=...)``).
A full ``random_shuffle()`` mixes better but moves every row between tasks each epoch; measured
on the bundled 5,000 rows it cost more than it is worth here (see bench/data.py, docs).
Without any shuffle, class-ordered files gave single-class batches, identical every epoch.

Corrupt images and ``data.max_bad_fraction`` in this path: a map task only sees its own batch,
so the ceiling is applied **per map batch**, as a count: a batch fails when it holds more than
``floor(max_bad_fraction * max(rows in the batch, map_batch_size))`` undecodable rows (short tail
batches are judged as if they were full, so one bad row in a 3-row remainder is not "33%"). With
the defaults (1%, 256-row map batches) that is more than 2 bad rows among 256 consecutive rows.
A dataset whose bad rows are spread thinly below the ceiling trains with them skipped; a cluster
of them fails fast.
Skipped rows are logged by the task (forwarded to the driver log, with the bytes' SHA-1 prefix as
the row id) and counted in an ``n_skipped`` column that :func:`iter_view_batches` sums into a
:class:`~service.data.decode.DecodeStats` for the training loop to log.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from service.config import AugmentConfig, Config
from service.data.augment import simclr_transform, split_at_to_image, view_size
from service.data.batch_augment import Pixels
from service.data.captions import is_caption
from service.data.decode import DecodeStats, decode_image
from service.data.errors import CorruptImageError, TooManyBadImagesError
from service.data.parquet import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    limit_indices,
)
from service.data.sources import inspect_source
from service.data.torch_dataset import NO_LABEL

MAP_BATCH_SIZE = 256  # rows per map_batches call: amortises task overhead, bounds memory
SKIPPED_COLUMN = "n_skipped"
PIXELS_COLUMN = "pixels"  # augment.backend=batched: decoded uint8 [3, S, S] per row
SIZES_COLUMN = "sizes"  # ... and each image's (h, w) extent in it (service.data.decoded)
SHUFFLE_BLOCK_ROWS = 32  # rows per block whose order is shuffled every epoch
SHUFFLE_BUFFER_ROWS = 1024  # rows in the local shuffle buffer: 4 blocks; 3 MiB of 32 px uint8


def shuffle_buffer_rows(batch_size: int) -> int:
    """Local shuffle buffer: at least 4 map blocks, and at least 2 batches."""
    return max(SHUFFLE_BUFFER_ROWS, 2 * batch_size)


def view_column(index: int) -> str:
    return f"view{index}"


def read_ray_dataset(
    path: str,
    limit: int | None = None,
    seed: int = 0,
    indices: np.ndarray | None = None,
    text_column: str | None = None,
) -> Any:
    """A lazy ``ray.data.Dataset`` of ``image`` (+ ``label``, + the caption ``text_column`` in
    image–text mode) rows of any registered source (:mod:`service.data.sources`), validated up
    front.

    Files, columns and emptiness are checked (footers, headers) before Ray is touched,
    so a wrong path fails here with a :class:`DataError`, not inside a remote task. ``limit``
    selects the same rows as the PyTorch reader does for the same seed (seeded shuffle); it reads
    those rows eagerly, which is meant for smoke runs; so do explicit row ``indices`` (a
    train/validation split).
    """
    source = inspect_source(path)
    columns = [c for c in (IMAGE_COLUMN, LABEL_COLUMN) if c in source.columns]
    if text_column:
        columns.append(text_column)  # the source's read names it if a file lacks it
    if indices is None:
        indices = limit_indices(source, limit, seed)
    return source.ray_dataset(columns, indices)


def _row_id(blob: Any) -> str:
    """Ray rows have no stable index; the bytes' hash finds the row again (``sha1:…`` prefix)."""
    data = blob if isinstance(blob, bytes | bytearray) else b""
    return f"sha1:{hashlib.sha1(data).hexdigest()[:12]}"


class _DecodingBatchFn:
    """Decode a numpy map batch, dropping corrupt rows under the per-batch ceiling."""

    def __init__(
        self,
        image_size: int,
        max_bad_fraction: float,
        map_batch_size: int,
        text_column: str | None = None,
    ) -> None:
        self.image_size = image_size
        self.max_bad_fraction = max_bad_fraction
        self.map_batch_size = map_batch_size
        self.text_column = text_column

    def _decode(self, batch: dict[str, np.ndarray]) -> tuple[list[Any], dict[str, np.ndarray]]:
        """Decoded images of the kept rows, and their ``label`` and ``n_skipped`` columns.

        Corrupt rows are dropped (labels stay with their own images) and their count is carried
        on the next kept row in ``n_skipped`` (on the last kept row for trailing ones). With a
        ``text_column``, a null or empty caption drops its row the same way, and the kept rows'
        captions travel in that column."""
        blobs = batch[IMAGE_COLUMN]
        texts = batch[self.text_column] if self.text_column else None
        labels = batch.get(LABEL_COLUMN)
        if labels is None:
            labels = np.full(len(blobs), NO_LABEL, dtype=np.int64)
        stats = DecodeStats()
        keep: list[int] = []
        images: list[Any] = []
        for i, blob in enumerate(blobs):
            if texts is not None and not is_caption(texts[i]):
                stats.add_bad(f"{_row_id(blob)} (null or empty caption)")
                continue
            try:
                images.append(decode_image(blob))
            except CorruptImageError as exc:
                stats.add_bad(f"{_row_id(blob)} ({exc})")
                continue
            stats.add_ok()
            keep.append(i)
        where = "Ray Data map batch"
        stats.warn(where)
        allowed = math.floor(self.max_bad_fraction * max(len(blobs), self.map_batch_size) + 1e-9)
        if stats.bad > allowed:
            raise TooManyBadImagesError(
                f"{where}: {stats.summary()}; more than {allowed} bad rows in a batch of "
                f"{self.map_batch_size} (data.max_bad_fraction={self.max_bad_fraction}, applied "
                "per map batch on the Ray path)"
            )
        kept = np.asarray(keep, dtype=np.int64)
        skipped = np.zeros(len(kept), dtype=np.int64)
        if len(kept):
            bad_rows = np.setdiff1d(np.arange(len(blobs)), kept)
            np.add.at(skipped, np.minimum(np.searchsorted(kept, bad_rows), len(kept) - 1), 1)
        columns = {LABEL_COLUMN: np.asarray(labels, dtype=np.int64)[kept], SKIPPED_COLUMN: skipped}
        if texts is not None:
            columns[self.text_column] = np.asarray([texts[i] for i in kept], dtype=object)
        return images, columns


class MultiViewBatchFn(_DecodingBatchFn):
    """``map_batches`` function: numpy batch ``{"image", ["label"]}`` →
    ``{"view0": float32[b,3,S,S], ..., "label": int64[b], "n_skipped": int64[b]}``.

    Corrupt rows are dropped (labels stay with their own images) and their count is carried on
    the next kept row in ``n_skipped`` (on the last kept row for trailing ones).

    >>> import io, numpy as np; from PIL import Image
    >>> png = io.BytesIO(); Image.new("RGB", (40, 40)).save(png, "PNG")
    >>> fn = MultiViewBatchFn(AugmentConfig(), image_size=32, n_views=2, max_bad_fraction=0.5)
    >>> out = fn({"image": np.array([b"junk", png.getvalue()], dtype=object)})
    >>> out["view0"].shape, out["label"].tolist(), out["n_skipped"].tolist()
    ((1, 3, 32, 32), [-1], [1])
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        image_size: int,
        n_views: int,
        max_bad_fraction: float = 0.01,
        map_batch_size: int = MAP_BATCH_SIZE,
        text_column: str | None = None,
    ) -> None:
        super().__init__(image_size, max_bad_fraction, map_batch_size, text_column)
        # Built here, on the driver, so bad augmentation settings fail before any task runs.
        # Per view only the PIL ops run; to-tensor and Normalize run once on the stacked batch.
        self.pil_ops, self.tensor_ops = split_at_to_image(simclr_transform(cfg, image_size))
        self.view_size = view_size(cfg, image_size)
        self.n_views = n_views

    def _finish(self, views: list[np.ndarray]) -> np.ndarray:
        """``[S, S, 3]`` uint8 views → one normalised ``float32 [b, 3, S, S]`` array."""
        shape = (0, 3, self.view_size, self.view_size)
        if not views:
            return np.zeros(shape, np.float32)
        batch = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2)
        return self.tensor_ops(batch).contiguous().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # torch's default generator starts from the same fixed seed in every process: without
        # reseeding, every Ray worker process would draw the identical augmentation sequence.
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
        images, columns = self._decode(batch)
        per_view: list[list[np.ndarray]] = [[] for _ in range(self.n_views)]
        for image in images:  # views of one image in turn: the per-image transform's draw order
            for v in range(self.n_views):
                per_view[v].append(np.asarray(self.pil_ops(image)))  # [S, S, 3] uint8
        out = {view_column(v): self._finish(views) for v, views in enumerate(per_view)}
        return out | columns


class DecodeBatchFn(_DecodingBatchFn):
    """``map_batches`` function for ``augment.backend=batched``: numpy batch
    ``{"image", ["label"]}`` → ``{"pixels": uint8[b,3,S,S], "label", "n_skipped"}``; the Train
    worker augments (see :func:`iter_image_batches`).

    >>> import io, numpy as np; from PIL import Image
    >>> png = io.BytesIO(); Image.new("RGB", (40, 40)).save(png, "PNG")
    >>> out = DecodeBatchFn(32, max_bad_fraction=0.5)(
    ...     {"image": np.array([b"junk", png.getvalue()], dtype=object)})
    >>> out["pixels"].shape, out["pixels"].dtype, out["n_skipped"].tolist()
    ((1, 3, 32, 32), dtype('uint8'), [1])
    """

    def __init__(
        self,
        image_size: int,
        max_bad_fraction: float = 0.01,
        map_batch_size: int = MAP_BATCH_SIZE,
        text_column: str | None = None,
    ) -> None:
        super().__init__(image_size, max_bad_fraction, map_batch_size, text_column)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from service.data.decoded import fit_uint8

        images, columns = self._decode(batch)
        pixels = np.zeros((len(images), 3, self.image_size, self.image_size), np.uint8)
        sizes = np.zeros((len(images), 2), np.int64)
        for i, image in enumerate(images):
            slot, sizes[i] = fit_uint8(image, self.image_size)
            pixels[i] = slot.numpy()
        return {PIXELS_COLUMN: pixels, SIZES_COLUMN: sizes} | columns


def make_multiview_batch_fn(
    cfg: AugmentConfig,
    image_size: int,
    n_views: int,
    max_bad_fraction: float = 0.01,
    map_batch_size: int = MAP_BATCH_SIZE,
) -> MultiViewBatchFn:
    """The decode + augment function for ``Dataset.map_batches(fn, batch_format="numpy")``."""
    return MultiViewBatchFn(cfg, image_size, n_views, max_bad_fraction, map_batch_size)


def augment_ray_dataset(
    ds: Any,
    cfg: AugmentConfig,
    image_size: int,
    n_views: int,
    max_bad_fraction: float = 0.01,
    map_batch_size: int = MAP_BATCH_SIZE,
    num_cpus: float = 1.0,
    shuffle: bool = True,
    text_column: str | None = None,
) -> Any:
    """Append the decode (+ multi-view augmentation with ``cfg.backend=torchvision``) stage
    (stateless Ray tasks) to ``ds``; ``shuffle`` visits its blocks in a new order every epoch.

    Blocks are first split to ``map_batch_size`` rows: a Parquet row group is one block, and one
    block is one task, so a file written as a single row group would otherwise be decoded on one
    CPU (and block-order shuffling would have one block to move). ``text_column``: the captions
    travel with their rows (see :func:`iter_captioned_batches`).
    """
    from service.data.augmenters import AUGMENTERS

    fn: Any
    if AUGMENTERS[cfg.backend].yields_uint8:  # the trainer augments: decode only
        fn = DecodeBatchFn(image_size, max_bad_fraction, map_batch_size, text_column)
    else:
        fn = MultiViewBatchFn(
            cfg, image_size, n_views, max_bad_fraction, map_batch_size, text_column
        )
    if shuffle:  # small blocks in a new order every execution (epoch); a map batch joins
        # MAP_BATCH_SIZE // SHUFFLE_BLOCK_ROWS of them from all over the data, so even a
        # class-sorted file gives mixed batches (256-row blocks left 2-3 classes per block).
        ds = ds.repartition(target_num_rows_per_block=min(SHUFFLE_BLOCK_ROWS, map_batch_size))
        ds = ds.randomize_block_order()
    else:
        ds = ds.repartition(target_num_rows_per_block=map_batch_size)
    return ds.map_batches(fn, batch_size=map_batch_size, batch_format="numpy", num_cpus=num_cpus)


def build_ray_train_dataset(config: Config) -> Any:
    """The lazy, decoded (and with ``augment.backend=torchvision`` augmented) training dataset a
    ``Config`` describes (for ``TorchTrainer``), block order shuffled every epoch. Image–text mode
    (``text.column`` set): one view per row, captions carried along."""
    from service.data.augmenters import n_views
    from service.data.splits import train_val_rows

    split, limit = train_val_rows(config), config.data.limit
    # Every row trains: stream the files lazily; otherwise the selected rows are read eagerly
    # (pre-flight refuses that for large data: hold out a file with data.val instead).
    rows = None if split.keeps_every_row(limit) else split.train_rows(limit)
    text_column = config.text.column
    ds = read_ray_dataset(config.data.train, indices=rows, text_column=text_column)
    return augment_ray_dataset(
        ds,
        config.augment,
        config.data.image_size,
        n_views(config),
        max_bad_fraction=config.data.max_bad_fraction,
        text_column=text_column,
    )


def _iter_batches(
    shard_or_dataset: Any,
    batch_size: int,
    drop_last: bool,
    stats: DecodeStats | None,
    device: str | torch.device,
    prefetch_batches: int,
    shuffle: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """``iter_torch_batches`` through a local shuffle buffer (new order every call), counting
    rows delivered and corrupt rows skipped upstream into ``stats``."""
    for batch in shard_or_dataset.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        device=device,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer_rows(batch_size) if shuffle else None,
    ):
        if stats is not None:
            skipped = int(batch[SKIPPED_COLUMN].sum()) if SKIPPED_COLUMN in batch else 0
            stats.add_ok(len(batch[LABEL_COLUMN]))
            if skipped:
                stats.add_bad(n=skipped)
        yield batch


def _require(batch: dict[str, torch.Tensor], columns: list[str], hint: str) -> None:
    missing = [c for c in columns if c not in batch]
    if missing:
        raise ValueError(f"batch has no column(s) {missing} (columns: {sorted(batch)}); {hint}")


def iter_view_batches(
    shard_or_dataset: Any,
    batch_size: int,
    n_views: int,
    drop_last: bool = True,
    stats: DecodeStats | None = None,
    device: str | torch.device = "cpu",
    prefetch_batches: int = 1,
    shuffle: bool = True,
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Yield ``([Tensor[b,3,S,S]] * n_views, Tensor[b])`` from an augmented dataset or shard
    (``augment.backend=torchvision``).

    ``drop_last=True`` keeps every batch exactly ``batch_size`` (DDP ranks must gather equal
    batches). ``stats``, if given, accumulates rows delivered and corrupt rows skipped upstream.
    Tensors are on ``device`` (CPU by default, as from the DataLoader; with ``stats`` and a GPU
    device, counting the skipped rows costs one small device sync per batch). ``shuffle`` draws
    batches from a local shuffle buffer (a new order every call).
    """
    columns = [view_column(v) for v in range(n_views)]
    hint = f"was the dataset built with n_views={n_views} and augment.backend=torchvision?"
    for batch in _iter_batches(
        shard_or_dataset, batch_size, drop_last, stats, device, prefetch_batches, shuffle
    ):
        _require(batch, columns, hint)
        yield [batch[c] for c in columns], batch[LABEL_COLUMN]


def iter_image_batches(
    shard_or_dataset: Any,
    batch_size: int,
    drop_last: bool = True,
    stats: DecodeStats | None = None,
    device: str | torch.device = "cpu",
    prefetch_batches: int = 1,
    shuffle: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 Tensor[b,3,S,S], Tensor[b])`` from a dataset or shard decoded with
    ``augment.backend=batched``, for ``BatchSimCLRAugment`` on ``device``; the other arguments
    as in :func:`iter_view_batches`."""
    hint = "was the dataset built with augment.backend=batched?"
    for batch in _iter_batches(
        shard_or_dataset, batch_size, drop_last, stats, device, prefetch_batches, shuffle
    ):
        _require(batch, [PIXELS_COLUMN, SIZES_COLUMN], hint)
        yield Pixels(batch[PIXELS_COLUMN], batch[SIZES_COLUMN]), batch[LABEL_COLUMN]


def iter_captioned_batches(
    shard_or_dataset: Any,
    batch_size: int,
    text_column: str,
    drop_last: bool = True,
    stats: DecodeStats | None = None,
    device: str | torch.device = "cpu",
    prefetch_batches: int = 1,
    shuffle: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Image–text mode: yield ``(images, labels [b], captions: list of b str)`` from a dataset
    or shard built with ``text_column``; ``images`` are the decoded uint8 ``[b,3,S,S]``
    (``augment.backend=batched``) or the one float view (``torchvision``). Arguments as in
    :func:`iter_view_batches`.

    ``iter_torch_batches`` cannot carry strings, so batches come as numpy and only the numeric
    columns become tensors (on ``device``)."""
    for batch in shard_or_dataset.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer_rows(batch_size) if shuffle else None,
    ):
        image_column = PIXELS_COLUMN if PIXELS_COLUMN in batch else view_column(0)
        _require(batch, [image_column, text_column], f"was the dataset built with {text_column=}?")
        if stats is not None:
            skipped = int(batch[SKIPPED_COLUMN].sum()) if SKIPPED_COLUMN in batch else 0
            stats.add_ok(len(batch[LABEL_COLUMN]))
            if skipped:
                stats.add_bad(n=skipped)
        images: Any = _tensor(batch[image_column]).to(device)
        if SIZES_COLUMN in batch:  # decoded only: the trainer augments within each extent
            images = Pixels(images, _tensor(np.asarray(batch[SIZES_COLUMN], dtype=np.int64)))
        labels = _tensor(np.asarray(batch[LABEL_COLUMN], dtype=np.int64)).to(device)
        yield images, labels, [str(t) for t in batch[text_column]]


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array`` (copied when read-only, e.g. zero-copy from the object store)."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())
