"""WebDataset tar shards as a data source (``data.train: "shards/{000000..000099}.tar"``).

The format open_clip, LAION and DataComp ship: each tar holds samples whose members share a key
(``000123.jpg``, ``000123.cls``, ``000123.txt``). As a source (:mod:`service.data.sources`) a set
of shards has the columns ``image`` (the ``.jpg``/``.jpeg``/``.png``/``.webp`` member),
``label`` (``.cls``, when every inspected sample has one) and one column per other extension:
a caption in ``.txt`` is the column ``txt`` (``text.column: txt``). Row ids are positions in
shard order, so the seeded validation split and ``data.limit`` select the same rows as they do
for the same data in Parquet; a selection is read by streaming the shards once.

Readers: decode-once and evaluation read rows eagerly (like Parquet); the Ray reader goes
through ``ray.data.read_webdataset``; the PyTorch streaming reader (``stream`` mode) reads each
rank's shards front to back, shard order and a buffer shuffled every epoch, every rank taking
the same number of rows (:func:`service.data.webdataset.take_rows`). Corrupt samples are skipped
and counted like corrupt Parquet rows. The reading and writing itself is
:mod:`service.data.webdataset`; ``contrastive data pack --format webdataset`` writes shards.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from torch.utils.data import IterableDataset

from service.data import webdataset as wds
from service.data.errors import DataError
from service.data.parquet import IMAGE_COLUMN, LABEL_COLUMN
from service.data.plan import with_captions
from service.data.sources import SourceInfo, local_location, register_source

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
STREAM_BUFFER_ROWS = 1024  # the streaming reader's shuffle buffer (rows), as the Ray reader's


def is_shard_pattern(path: str) -> bool:
    """Whether ``path`` names tar shards (a file, glob or brace pattern ending in ``.tar``).

    >>> is_shard_pattern("s3://b/laion/{00000..00099}.tar"), is_shard_pattern("a.parquet")
    (True, False)
    """
    return str(path).rstrip("/").lower().endswith(SHARD_SUFFIXES)


@dataclass(frozen=True)
class ShardSource(SourceInfo):
    """An inspected set of WebDataset shards (the :class:`~service.data.sources.DataSource`
    surface)."""

    shards: list[str]
    format: str = "webdataset"

    def _text_key(self, columns: list[str]) -> str | None:
        extra = [c for c in columns if c not in (IMAGE_COLUMN, LABEL_COLUMN)]
        return extra[0] if extra else None

    def read(self, columns: list[str], indices: np.ndarray | None = None) -> pa.Table:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise DataError(f"{self.path!r} has no column(s) {missing} (columns: {self.columns})")
        text_key = self._text_key(columns)
        if indices is None:
            table = wds.read_table(self.shards, text_key=text_key)
        else:
            table = _read_positions(self.shards, np.asarray(indices, dtype=np.int64), text_key)
        return table.select(columns)

    def ray_dataset(self, columns: list[str], indices: np.ndarray | None = None) -> Any:
        import ray.data

        if indices is not None:  # a selection (split, limit): read here, as Parquet does
            table = self.read(columns, indices)
            step = 256
            return ray.data.from_arrow(
                [table.slice(i, step) for i in range(0, table.num_rows, step)]
            )
        text_key = self._text_key(columns)
        return wds.read_ray_dataset(self.shards, text_key=text_key).select_columns(columns)

    def column_problem(self, column: str) -> str | None:
        if column in self.columns:
            return None
        return (
            f"{self.path!r}: caption key '.{column}' missing from the shards' samples (members: "
            f"{self.columns}); set text.column to the caption's extension (e.g. txt)"
        )

    def nbytes(self) -> int:
        from service.data.webdataset import _place  # noqa: PLC2701 - the module's own resolver

        total = 0
        for shard in self.shards:
            place = _place(shard)
            total += place.filesystem.get_file_info(place.path).size or 0
        return total

    def locations(self) -> list[str]:
        return [s if "://" in s else local_location(s) for s in self.shards]

    def fingerprint(self) -> str:
        import hashlib
        import json
        import posixpath

        parts = [[posixpath.basename(s) for s in self.shards], self.num_rows, self.columns]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def stream_loader(
        self, prepared: Any, config: Any, rank: int, world: int, item: Any
    ) -> tuple[int, Any, Any, Any]:
        """The PyTorch reader's ``stream`` mode for shards (see :class:`ShardStream`)."""
        from service.data.torch_dataset import make_dataloader

        dataset = ShardStream(self, prepared, config, rank, world, item)
        loader = make_dataloader(dataset, batch_size=config.per_worker_batch_size,
                                 shuffle=False, drop_last=True)  # fmt: skip
        return dataset.rows, dataset.epoch_loader(loader), None, loader


def _read_positions(shards: list[str], indices: np.ndarray, text_key: str | None) -> pa.Table:
    """Rows at global positions ``indices`` (in that order), streaming the shards once."""
    wanted = np.unique(indices)
    wanted_set = set(wanted.tolist())
    position = itertools.count()
    # read_table asks ``keep`` once per sample, in shard order: the call count is the position.
    table = wds.read_table(shards, text_key=text_key, keep=lambda _: next(position) in wanted_set)
    if table.num_rows != len(wanted):
        raise DataError(f"row ids beyond the {next(position)} samples of the shards")
    return table.take(pa.array(np.searchsorted(wanted, indices)))


def inspect_shard_source(path: str) -> ShardSource:
    """Expand the pattern, look at the first samples, count every shard's samples (headers)."""
    info = wds.inspect_shards(path)
    if not info.rows:
        raise DataError(f"data path {path!r} is empty: {len(info.shards)} shard(s), 0 samples")
    if not info.with_image:
        raise DataError(
            f"{path!r}: no image member in the first {info.inspected} samples (expected one of "
            f"{'/'.join('.' + e for e in wds.IMAGE_EXTENSIONS)}, found "
            f"{'/'.join('.' + e for e in info.extensions)})"
        )
    others = [e for e in info.extensions if e not in (*wds.IMAGE_EXTENSIONS, wds.LABEL_EXTENSION)]
    columns = [IMAGE_COLUMN] + [LABEL_COLUMN] * info.has_label + others
    return ShardSource(path, info.rows, columns, info.has_label, shards=info.shards)


class ShardStream(IterableDataset):
    """A ``torch`` ``IterableDataset``-style stream of this rank's items for one epoch: the
    training rows (by key; all when nothing is held out), shard order and a buffer shuffled per
    epoch, exactly ``rows // world`` rows per rank; corrupt samples skipped and counted."""

    def __init__(self, source: ShardSource, prepared: Any, config: Any, rank: int, world: int,
                 item: Any) -> None:  # fmt: skip
        super().__init__()
        self.source, self.config, self.rank, self.world, self.item = (
            source,
            config,
            rank,
            world,
            item,
        )
        self.rows = prepared.rows
        self.keep = _training_keys(source, config, prepared.rows)
        self.epoch = 0

    def epoch_loader(self, loader: Any) -> Any:
        def epoch(e: int) -> Any:
            self.epoch = e
            return with_captions(iter(loader))

        return epoch

    def __iter__(self) -> Any:
        from service.data.decode import DecodeStats, decode_image
        from service.data.errors import CorruptImageError

        text = self.config.text.column
        stats = DecodeStats()
        # Margin for skipped samples: the loader stops after steps_per_epoch batches anyway.
        n = self.rows // self.world + self.config.per_worker_batch_size
        rows = wds.take_rows(
            self.source.shards, n, epoch=self.epoch, rank=self.rank, world=self.world,
            seed=self.config.train.seed, shuffle_buffer=STREAM_BUFFER_ROWS, text_key=text,
            keep=self.keep,
        )  # fmt: skip
        for row in rows:
            try:
                image = decode_image(row[IMAGE_COLUMN])
            except CorruptImageError as exc:
                stats.add_bad(f"sample {row['key']!r} ({exc})")
                stats.check(self.config.data.max_bad_fraction, repr(self.source.path))
                continue
            stats.add_ok()
            out = (self.item(image), row[LABEL_COLUMN])
            yield out + (row[text],) if text else out


def _training_keys(source: ShardSource, config: Any, rows: int) -> Any:
    """``keep(key)`` for the training rows, or None when every sample trains."""
    from service.data.splits import train_val_rows

    if rows == source.num_rows:
        return None
    train = train_val_rows(config).train_rows(config.data.limit)
    keys = [s["__key__"] for shard in source.shards for s in wds.iter_samples(shard)]
    return {keys[int(i)] for i in train}.__contains__


register_source("webdataset", is_shard_pattern, inspect_shard_source)
