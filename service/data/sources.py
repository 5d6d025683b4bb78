"""Data sources, registered by name: what a ``data.train`` / ``data.val`` / ``data.test`` path is.

Every reader, check and evaluation in the service reads rows through :func:`inspect_source`, so a
new storage format is one module that registers itself here and nothing else changes. A source is
an inspected, validated set of files with the same small surface whatever the format
(:class:`DataSource`): how many rows, which columns, and how to read rows (eagerly by global row
id, or lazily as a Ray dataset). Row ids are global positions in the source's file order, so the
seeded train/validation split (:mod:`service.data.splits`), ``data.limit`` and the decode-once
keys mean the same thing for every format.

Shipped sources: ``parquet`` (a file, directory, glob or URI of Parquet files,
:mod:`service.data.parquet`) and ``webdataset`` (tar shards, ``shards/{000000..000099}.tar``,
:mod:`service.data.shards`). The first registered source whose ``matches(path)`` is true owns a
path; Parquet is the fallback. The formats register when :mod:`service.data` is imported (any
import of a ``service.data`` module imports the package first).

    >>> inspect_source("service/data/bundled/cifar10-test-subset.parquet").format
    'parquet'
    >>> source_format("shards/{000000..000009}.tar")
    'webdataset'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa


class DataSource(Protocol):
    """An inspected set of image files (see the module docstring)."""

    format: str
    path: str  # as the user gave it, for messages
    num_rows: int
    columns: list[str]
    has_label: bool

    @property
    def has_label_name(self) -> bool: ...

    def read(self, columns: list[str], indices: np.ndarray | None = None) -> pa.Table:
        """``columns`` of all rows, or of global row ``indices`` (in that order)."""
        ...

    def ray_dataset(self, columns: list[str], indices: np.ndarray | None = None) -> Any:
        """A lazy ``ray.data.Dataset`` of ``columns`` (all rows streamed, or the ``indices``)."""
        ...

    def column_problem(self, column: str) -> str | None:
        """None when every file has ``column`` as strings (a caption column); else why not."""
        ...

    def nbytes(self) -> int:
        """Bytes of the files (what reading everything costs)."""
        ...

    def fingerprint(self) -> str:
        """What identifies the data wherever it is mounted or uploaded (``ray job submit``
        copies the checkout per job): file names, row counts, columns; a resumed run compares
        it. Cheap: footers or headers only."""
        ...

    def locations(self) -> list[str]:
        """Where each file is, one string per file that is the same for the same file however
        it was named: a local path with links resolved, or the file's URI (pre-flight compares
        the splits' files with it)."""
        ...


@dataclass(frozen=True)
class SourceInfo:
    """What every source knows after inspection (the formats' dataclasses extend it)."""

    path: str  # as the user gave it, for messages
    num_rows: int
    columns: list[str]
    has_label: bool

    @property
    def has_label_name(self) -> bool:
        return "label_name" in self.columns


@dataclass(frozen=True)
class SourceFormat:
    """A registered format: which paths it owns and how to inspect one."""

    name: str
    matches: Callable[[str], bool]
    inspect: Callable[[str], DataSource]


SOURCE_FORMATS: dict[str, SourceFormat] = {}


def register_source(
    name: str, matches: Callable[[str], bool], inspect: Callable[[str], Any]
) -> None:
    """Register a source format (the modules of :mod:`service.data` call this on import)."""
    SOURCE_FORMATS[name] = SourceFormat(name, matches, inspect)


def source_format(path: str) -> str:
    """The name of the format that owns ``path`` (Parquet unless another claims it)."""
    for name, fmt in SOURCE_FORMATS.items():
        if name != "parquet" and fmt.matches(str(path)):
            return name
    return "parquet"


def local_location(path: str) -> str:
    """A local file's one name: absolute, links resolved (``locations`` of local sources)."""
    return os.path.realpath(os.path.expanduser(path))


def inspect_source(path: str) -> DataSource:
    """Resolve and validate ``path`` with the format that owns it (cheap: headers, footers);
    raises :class:`~service.data.errors.DataError` naming the path and what to do."""
    return SOURCE_FORMATS[source_format(path)].inspect(str(path))
