"""Find and validate image Parquet data: a file, a directory, a glob, or an ``s3://``/``gs://`` URI.

Every reader goes through :func:`inspect_parquet`, so "path does not exist", "no Parquet files",
"no ``image`` column" and "empty dataset" are reported the same way (a :class:`DataError` naming
the path or file) before any decoding or any Ray task starts.

The format: ``image`` (binary, encoded image bytes as stored), optional ``label`` (integer) and
optional ``label_name`` (string). Other columns are ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from service.data.errors import DataError
from service.data.sources import SourceInfo, local_location, register_source

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
LABEL_NAME_COLUMN = "label_name"
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class ParquetSource(SourceInfo):
    """A validated set of Parquet files: where they are and what they hold.

    >>> src = inspect_parquet("service/data/bundled/cifar10-test-subset.parquet")
    >>> src.num_rows, src.has_label
    (1000, True)
    """

    filesystem: pafs.FileSystem
    files: list[str]  # paths inside ``filesystem``
    format: str = "parquet"

    def read(self, columns: list[str], indices: np.ndarray | None = None) -> pa.Table:
        return _read_rows(self, columns, indices)

    def ray_dataset(self, columns: list[str], indices: np.ndarray | None = None) -> Any:
        return _ray_dataset(self, columns, indices)

    def column_problem(self, column: str) -> str | None:
        return text_column_problem(self, column)

    def nbytes(self) -> int:
        return sum(info.size or 0 for info in self.filesystem.get_file_info(self.files))

    def locations(self) -> list[str]:
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            return [local_location(file) for file in self.files]
        return [f"{self.filesystem.type_name}://{file}" for file in self.files]

    def fingerprint(self) -> str:
        parts = []
        for file in self.files:
            with self.filesystem.open_input_file(file) as handle:
                meta = pq.ParquetFile(handle).metadata
                schema = str(meta.schema.to_arrow_schema())
                parts.append([posixpath.basename(file), meta.num_rows, schema])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _split_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (OSError, pa.ArrowInvalid, ValueError) as exc:
            raise DataError(f"cannot open data URI {path!r}: {exc}") from exc
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _is_data_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    # Spark/Hadoop leave _SUCCESS, .crc and _metadata files next to the data: not data.
    return name.endswith(PARQUET_SUFFIXES) and not name.startswith(("_", "."))


def _glob_match(path: str, pattern: str) -> bool:
    """Segment-aware glob: ``*`` stays inside one directory level, ``**`` spans any number."""

    def match(p: list[str], q: list[str]) -> bool:
        if not q:
            return not p
        if q[0] == "**":
            return any(match(p[i:], q[1:]) for i in range(len(p) + 1))
        return bool(p) and fnmatchcase(p[0], q[0]) and match(p[1:], q[1:])

    return match(path.strip("/").split("/"), pattern.strip("/").split("/"))


def _list_files(fs: pafs.FileSystem, base: str, path: str) -> list[str]:
    try:
        if any(c in base for c in _GLOB_CHARS):
            parts = base.split("/")
            fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
            root = "/".join(parts[:fixed]) or "/"
            if fs.get_file_info(root).type != pafs.FileType.Directory:
                raise DataError(f"data path {path!r} does not exist (no directory {root!r})")
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            files = [i.path for i in infos if i.is_file and _glob_match(i.path, base)]
            if not files:
                raise DataError(f"no files match the data glob {path!r}")
            return sorted(files)
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data path {path!r} does not exist")
        if info.type == pafs.FileType.File:
            return [base]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        files = sorted(i.path for i in infos if i.is_file and _is_data_file(i.path))
        if not files:
            raise DataError(
                f"no Parquet files found in directory {path!r} (looked for "
                f"{'/'.join('*' + s for s in PARQUET_SUFFIXES)}, recursively)"
            )
        return files
    except OSError as exc:  # permissions, network, credentials
        raise DataError(f"cannot list data path {path!r}: {exc}") from exc


def resolve_parquet_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """Resolve a file, directory (recursive), glob or URI to ``(filesystem, sorted file paths)``.

    URIs (``s3://bucket/prefix/``, ``gs://...``, ``file://...``) go through
    ``pyarrow.fs.FileSystem.from_uri``, so remote storage needs no code change, only credentials.
    """
    fs, base = _split_filesystem(str(path))
    return fs, _list_files(fs, base, str(path))


def _read_schema(fs: pafs.FileSystem, file: str) -> tuple[pa.Schema, int]:
    try:
        with fs.open_input_file(file) as handle:
            parquet = pq.ParquetFile(handle)
            return parquet.schema_arrow, parquet.metadata.num_rows
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{file!r} is not a readable Parquet file: {exc}") from exc


def _check_schema(file: str, schema: pa.Schema) -> None:
    names = schema.names
    if IMAGE_COLUMN not in names:
        raise DataError(
            f"{file!r} has no {IMAGE_COLUMN!r} column (columns: {names}); expected encoded image "
            f"bytes in {IMAGE_COLUMN!r} (see `contrastive data pack` to build such a file)"
        )
    image_type = schema.field(IMAGE_COLUMN).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise DataError(f"{file!r}: column {IMAGE_COLUMN!r} is {image_type}, expected binary")
    if LABEL_COLUMN in names and not pa.types.is_integer(schema.field(LABEL_COLUMN).type):
        raise DataError(
            f"{file!r}: column {LABEL_COLUMN!r} is {schema.field(LABEL_COLUMN).type}, "
            "expected integers"
        )


def inspect_parquet(path: str) -> ParquetSource:
    """Resolve ``path`` and validate every file's footer (cheap: no row data is read)."""
    fs, files = resolve_parquet_files(path)
    # Footers of remote files are one round-trip each: read them concurrently.
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        footers = list(pool.map(lambda f: _read_schema(fs, f), files))
    for file, (schema, _) in zip(files, footers, strict=True):
        _check_schema(file, schema)
    with_label = [LABEL_COLUMN in schema.names for schema, _ in footers]
    if any(with_label) and not all(with_label):
        missing = [f for f, has in zip(files, with_label, strict=True) if not has]
        raise DataError(f"{path!r}: files without the {LABEL_COLUMN!r} other files have: {missing}")
    num_rows = sum(rows for _, rows in footers)
    if num_rows == 0:
        raise DataError(f"data path {path!r} is empty: {len(files)} Parquet file(s), 0 rows")
    return ParquetSource(
        path=str(path),
        filesystem=fs,
        files=files,
        num_rows=num_rows,
        columns=list(footers[0][0].names),
        has_label=all(with_label),
    )


def default_columns(source: ParquetSource, text_column: str | None = None) -> list[str]:
    """The columns the readers use: ``image`` plus ``label``/``label_name`` when present, plus
    the caption column ``text_column`` in image–text mode (it must exist)."""
    columns = [c for c in (IMAGE_COLUMN, LABEL_COLUMN, LABEL_NAME_COLUMN) if c in source.columns]
    if text_column and text_column not in columns:
        columns.append(text_column)
    return columns


def text_column_problem(source: ParquetSource, column: str) -> str | None:
    """``None`` when every file has ``column`` as strings; else what is wrong (for messages)."""
    if column not in source.columns:
        return (
            f"{source.path!r} has no caption column {column!r} (columns: {source.columns}); "
            f"set text.column to the caption column, or add one (`contrastive data captions`, "
            f"`contrastive data pack --captions`)"
        )
    for file in source.files:
        schema, _ = _read_schema(source.filesystem, file)
        if column not in schema.names:
            return f"{file!r} has no caption column {column!r} (columns: {schema.names})"
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            return f"{file!r}: caption column {column!r} is {kind}, expected strings"
    return None


def sample_indices(num_rows: int, limit: int, seed: int) -> np.ndarray:
    """Row ids of "the first ``limit`` rows after a seeded shuffle" (``data.limit`` semantics)."""
    return np.random.default_rng(seed).permutation(num_rows)[:limit]


def _read_rows(
    source: ParquetSource, columns: list[str], indices: np.ndarray | None = None
) -> pa.Table:
    """Read ``columns`` of all rows, or of the global row ``indices`` (in that order)."""
    missing = [c for c in columns if c not in source.columns]
    if missing:
        raise DataError(f"{source.path!r} has no column(s) {missing} (columns: {source.columns})")
    dataset = pds.dataset(source.files, filesystem=source.filesystem, format="parquet")
    try:
        if indices is None:
            return dataset.to_table(columns=columns)
        return dataset.take(pa.array(indices), columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"failed reading {source.path!r}: {exc}") from exc


def limit_indices(source: ParquetSource, limit: int | None, seed: int) -> np.ndarray | None:
    """Row ids selected by ``data.limit`` (``None``: all rows, in file order)."""
    if limit is None:
        return None
    if limit < 1:
        raise DataError(f"data.limit must be >= 1 or null, got {limit}")
    if limit >= source.num_rows:
        return None
    return sample_indices(source.num_rows, limit, seed)


def read_image_table(
    path: str,
    columns: list[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> pa.Table:
    """Read validated image data into memory as one Arrow table.

    ``columns`` defaults to ``image`` (+ ``label``, ``label_name`` when present). ``limit`` keeps
    ``limit`` rows chosen by a seeded shuffle, not the file's head: data files are often sorted by
    class, and the first N rows of CIFAR-10 are all airplanes.

    >>> read_image_table("service/data/bundled/cifar10-test-subset.parquet", limit=4).num_rows
    4
    """
    from service.data.sources import inspect_source

    source = inspect_source(path)  # any registered format
    columns = list(columns) if columns is not None else default_columns(source)
    return source.read(columns, limit_indices(source, limit, seed))


RAY_BLOCK_ROWS = 256  # rows per Ray block of eagerly selected rows (one map batch)


def _ray_dataset(source: ParquetSource, columns: list[str], indices: np.ndarray | None) -> Any:
    """All rows streamed with ``read_parquet``, or the selected ``indices`` read here (eager)."""
    import ray.data

    if indices is not None:
        table = _read_rows(source, columns, indices)
        step = RAY_BLOCK_ROWS
        return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    # No repartition here: it would make ``count()`` execute the read instead of summing footers.
    return ray.data.read_parquet(
        source.files, filesystem=source.filesystem, file_extensions=None
    ).select_columns(columns)


register_source("parquet", lambda path: True, inspect_parquet)
