"""Pack an image folder (``class_name/*.jpg``) into the service's Parquet format.

Output columns: ``image`` (the file's bytes as stored: no re-encoding, no quality loss),
``label`` (int64, index of the class directory in sorted name order, like torchvision's
``ImageFolder``) and ``label_name``. Rows are written in a seeded random order (``seed``; the
same folder and seed give the same file): a reader that takes rows in file order, or shuffles
only blocks or a bounded buffer (the Ray reader), then never sees long single-class runs. Files
that do not decode are left out and listed in the summary, so a packed dataset starts clean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def pack_image_folder(
    src_dir: str | Path, out_parquet: str | Path, seed: int = 0
) -> dict[str, Any]:
    """Write ``src_dir/CLASS/*.{jpg,png,...}`` to ``out_parquet`` in a seeded random row order;
    return a JSON-able summary.

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
    out = Path(out_parquet)
    out.parent.mkdir(parents=True, exist_ok=True)
    found = _class_files(src)
    per_class: dict[str, int] = dict.fromkeys(found, 0)
    unreadable: list[str] = []
    rows = {"image": [], "label": [], "label_name": []}
    pending_bytes = 0
    with pq.ParquetWriter(out, SCHEMA, compression="zstd") as writer:

        def flush() -> None:
            nonlocal pending_bytes
            if rows["image"]:
                writer.write_table(pa.table(rows, schema=SCHEMA))
                for column in rows.values():
                    column.clear()
                pending_bytes = 0

        for label, name, file in _shuffled(found, seed):
            data = file.read_bytes()
            try:
                decode_image(data)
            except CorruptImageError as exc:
                unreadable.append(f"{file.relative_to(src)} ({exc})")
                continue
            rows["image"].append(data)
            rows["label"].append(label)
            rows["label_name"].append(name)
            per_class[name] += 1
            pending_bytes += len(data)
            if pending_bytes >= _FLUSH_BYTES:
                flush()
        flush()
    total = sum(per_class.values())
    if total == 0:
        out.unlink(missing_ok=True)
        raise DataError(f"no decodable images in {str(src)!r}: {unreadable[:_MAX_LISTED]}")
    return {
        "out": str(out),
        "rows": total,
        "classes": list(per_class),
        "per_class": per_class,
        "bytes": out.stat().st_size,
        "unreadable": len(unreadable),
        "unreadable_files": sorted(unreadable)[:_MAX_LISTED],
    }
