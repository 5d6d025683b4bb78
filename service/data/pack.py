"""Pack an image folder (``class_name/*.jpg``) into the service's Parquet format.

Output columns: ``image`` (the file's bytes as stored: no re-encoding, no quality loss),
``label`` (int64, index of the class directory in sorted name order, like torchvision's
``ImageFolder``) and ``label_name``.

With a captions file (``captions=``, CSV or JSONL of file name and caption, see
:func:`~service.data.captions.read_captions_file`) a ``text`` column is added for image–text
training. The folder may then also be flat (no class directories: the captioned files, no label
columns). Images without a caption, and captions naming no file, are left out and reported.

Rows are written in a seeded random order (``seed``; the
same folder and seed give the same file): a reader that takes rows in file order, or shuffles
only blocks or a bounded buffer (the Ray reader), then never sees long single-class runs. Files
that do not decode are left out and listed in the summary, so a packed dataset starts clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.data.captions import TEXT_COLUMN, is_caption, read_captions_file
from service.data.decode import decode_image
from service.data.errors import CorruptImageError, DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("label_name", pa.string())])
_FLUSH_BYTES = 64 * 2**20  # one row group per ~64 MB: bounded memory for any folder size
_MAX_LISTED = 20


def _class_files(src: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{str(src)!r} has no class sub-directories (expected {src}/CLASS/*.jpg)")
    found = {
        c.name: sorted(
            f for f in c.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        for c in classes
    }
    empty = [name for name, files in found.items() if not files]
    if empty:
        raise DataError(
            f"class directories without images in {str(src)!r}: {empty} (image suffixes: "
            f"{sorted(IMAGE_SUFFIXES)}); remove them or add images, labels would have gaps"
        )
    return found


def _shuffled(found: dict[str, list[Path]], seed: int) -> list[tuple[int, str, Path]]:
    """Every ``(label, class name, file)``, in a seeded random order."""
    items = [(label, name, f) for label, (name, files) in enumerate(found.items()) for f in files]
    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


def _has_class_dirs(src: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in src.iterdir())


def _flat_items(src: Path, seed: int) -> list[tuple[int | None, str | None, Path]]:
    """The images directly in ``src`` (no class directories), in a seeded random order."""
    files = sorted(f for f in src.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images in {str(src)!r} (image suffixes: {sorted(IMAGE_SUFFIXES)})")
    return [(None, None, files[i]) for i in np.random.default_rng(seed).permutation(len(files))]


def _schema(labelled: bool, captioned: bool) -> pa.Schema:
    fields = [f for f in SCHEMA if labelled or f.name == "image"]
    return pa.schema(fields + ([pa.field(TEXT_COLUMN, pa.string())] if captioned else []))


@dataclass
class _Packed:
    """What packing kept and left out (for the summary)."""

    per_class: dict[str, int]
    unreadable: list[str] = field(default_factory=list)
    uncaptioned: list[str] = field(default_factory=list)
    total: int = 0


def _rows(
    items: list[Any], src: Path, caption_map: dict[str, str] | None, labelled: bool, packed: _Packed
) -> Iterator[dict[str, Any]]:
    """The decodable (and captioned, with a captions file) images as rows; the rest counted."""
    for label, name, file in items:
        relative = file.relative_to(src).as_posix()
        caption = caption_map.get(relative) if caption_map is not None else None
        if caption_map is not None and not is_caption(caption):
            packed.uncaptioned.append(relative)
            continue
        data = file.read_bytes()
        try:
            decode_image(data)
        except CorruptImageError as exc:
            packed.unreadable.append(f"{file.relative_to(src)} ({exc})")
            continue
        row: dict[str, Any] = {"image": data}
        if labelled:
            row |= {"label": label, "label_name": name}
            packed.per_class[name] += 1
        if caption_map is not None:
            row[TEXT_COLUMN] = caption
        packed.total += 1
        yield row


def _write_parquet(out: Path, schema: pa.Schema, rows: Iterator[dict[str, Any]]) -> None:
    """Rows → ``out``, one row group per ~64 MB of image bytes (bounded memory)."""
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        pending: list[dict[str, Any]] = []
        size = 0
        for row in rows:
            pending.append(row)
            size += len(row["image"])
            if size >= _FLUSH_BYTES:
                writer.write_table(pa.Table.from_pylist(pending, schema=schema))
                pending, size = [], 0
        if pending:
            writer.write_table(pa.Table.from_pylist(pending, schema=schema))


def pack_image_folder(
    src_dir: str | Path,
    out_parquet: str | Path,
    seed: int = 0,
    captions: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``src_dir/CLASS/*.{jpg,png,...}`` to ``out_parquet`` in a seeded random row order;
    return a JSON-able summary. ``captions``: a CSV/JSONL captions file (paths relative to
    ``src_dir``) → a ``text`` column; ``src_dir`` may then be a flat folder of images.

    >>> import tempfile; from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for name in ("cat", "dog"):
    ...     (root / name).mkdir()
    ...     Image.new("RGB", (8, 8)).save(root / name / "0.png")
    >>> pack_image_folder(root, root / "out.parquet")["per_class"]
    {'cat': 1, 'dog': 1}
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise DataError(f"image folder {str(src)!r} does not exist or is not a directory")
    caption_map = read_captions_file(captions) if captions is not None else None
    labelled = caption_map is None or _has_class_dirs(src)
    found = _class_files(src) if labelled else {}
    items = _shuffled(found, seed) if labelled else _flat_items(src, seed)
    out = Path(out_parquet)
    out.parent.mkdir(parents=True, exist_ok=True)
    packed = _Packed(per_class=dict.fromkeys(found, 0))
    schema = _schema(labelled, caption_map is not None)
    _write_parquet(out, schema, _rows(items, src, caption_map, labelled, packed))
    if packed.total == 0:
        out.unlink(missing_ok=True)
        raise DataError(
            f"no decodable{' captioned' if caption_map is not None else ''} images in "
            f"{str(src)!r}: {(packed.unreadable or packed.uncaptioned)[:_MAX_LISTED]}"
        )
    return _summary(out, packed, src, items, caption_map)


def _summary(
    out: Path, packed: _Packed, src: Path, items: list[Any], caption_map: dict[str, str] | None
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "out": str(out),
        "rows": packed.total,
        "classes": list(packed.per_class),
        "per_class": packed.per_class,
        "bytes": out.stat().st_size,
        "unreadable": len(packed.unreadable),
        "unreadable_files": sorted(packed.unreadable)[:_MAX_LISTED],
    }
    if caption_map is not None:
        kept = {file.relative_to(src).as_posix() for _, _, file in items}
        orphans = sorted(set(caption_map) - kept)
        summary |= {
            "captioned": True,
            "uncaptioned": len(packed.uncaptioned),
            "uncaptioned_files": sorted(packed.uncaptioned)[:_MAX_LISTED],
            "captions_without_image": len(orphans),
            "captions_without_image_files": orphans[:_MAX_LISTED],
        }
    return summary


def pack_shards(
    src: str | Path,
    out_dir: str,
    *,
    rows_per_shard: int = 1000,
    seed: int = 0,
    captions: str | Path | None = None,
) -> dict[str, Any]:
    """Write WebDataset shards ``out_dir/shard-000000.tar``, ... from an image folder (packed as
    :func:`pack_image_folder` does) or from image data any source reads (a Parquet file, ...):
    ``.jpg``/``.png`` + ``.cls`` (+ ``.txt`` captions) per sample, rows in the source's order.
    Returns the summary with the brace ``pattern`` to put in ``data.train``."""
    import tempfile

    from service.data.parquet import default_columns
    from service.data.sources import inspect_source
    from service.data.webdataset import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        if Path(src).is_dir() and not any(Path(src).rglob("*.parquet")):
            src = pack_image_folder(src, Path(tmp) / "packed.parquet", seed, captions)["out"]
        source = inspect_source(str(src))
        text = TEXT_COLUMN if TEXT_COLUMN in source.columns else None
        table = source.read(default_columns(source, text))
    shards = write_shards(table, out_dir, rows_per_shard=rows_per_shard, text_column=text)
    last = len(shards) - 1
    return {
        "out": out_dir,
        "format": "webdataset",
        "shards": len(shards),
        "rows": table.num_rows,
        "pattern": f"{out_dir.rstrip('/')}/shard-{{000000..{last:06d}}}.tar",
        "captions": "txt (text.column: txt)" if text else None,
    }
