"""Captions: the text column of image–text data, from templates or from a captions file.

Three jobs, one module:

- **Valid captions** (:func:`is_caption`): a non-empty string after stripping. Both readers drop a
  row whose caption is null or empty exactly like a row whose image does not decode (counted in
  the same :class:`~service.data.decode.DecodeStats`, held to ``data.max_bad_fraction``), and a
  corrupt image drops its caption with it, so images, captions and labels stay aligned.
- **Captions from class names** (:func:`caption_table`, ``contrastive data captions``): a
  labelled data set without captions gets a ``text`` column built from ``label_name`` with varied
  templates, drawn per row with a seeded generator. This is how the bundled
  ``cifar10-*-captions.parquet`` files are made; zero-shot on the same classes is then close to
  supervised classification (docs/image_text_data.md).
- **Captions files** (:func:`read_captions_file`, ``contrastive data pack --captions``): CSV or
  JSONL of (file name, caption), for a folder of images.

>>> fill_template("a photo of a {}.", "airplane"), fill_template("the {}.", "cat")
('a photo of an airplane.', 'the cat.')
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.config import Config
from service.data.errors import DataError

TEXT_COLUMN = "text"  # the column `data captions` and `data pack --captions` write
CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a blurry picture of the {}.",
    "a close-up photo of a {}.",
    "a low-resolution image of a {}.",
    "a small {} in the picture.",
    "there is a {} in this image.",
    "a cropped photo of the {}.",
    "a pixelated photo of a {}.",
    "an image showing a {}.",
    "a bright photo of a {}.",
)
FILE_KEYS = ("file", "file_name", "filename", "path", "image")
CAPTION_KEYS = ("caption", "text")


def is_caption(value: Any) -> bool:
    """A usable caption: a string with something other than whitespace in it."""
    return isinstance(value, str) and bool(value.strip())


def fill_template(template: str, name: str) -> str:
    """``template`` with ``{}`` → ``name``; "a {}" becomes "an {}" before a vowel."""
    if name[:1].lower() in "aeiou":
        template = re.sub(r"\ba \{\}", "an {}", template)
    return template.replace("{}", name)


def read_templates(path: str | Path) -> list[str]:
    """One template per non-empty line, each with one ``{}`` for the class name."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise DataError(
            f"templates file {str(path)!r}: need one template per line, each with exactly one "
            f"'{{}}' for the class name; bad: {bad[:5] or 'no templates'}"
        )
    return templates


def caption_table(
    table: pa.Table,
    templates: Sequence[str] = CAPTION_TEMPLATES,
    seed: int = 0,
    name_column: str = "label_name",
    text_column: str = TEXT_COLUMN,
) -> pa.Table:
    """``table`` plus (or with a replaced) ``text_column``: one template per row, drawn with a
    seeded generator, filled with the row's ``name_column``.

    >>> t = caption_table(pa.table({"label_name": ["cat", "ship"]}), ["a {}.", "the {}!"], seed=1)
    >>> t.column("text").to_pylist()
    ['a cat.', 'the ship!']
    """
    if name_column not in table.column_names:
        raise DataError(
            f"no {name_column!r} column to build captions from (columns: {table.column_names})"
        )
    names = table.column(name_column).to_pylist()
    if not all(is_caption(n) for n in names):
        raise DataError(f"{name_column!r} has null or empty values: every row needs a class name")
    choice = np.random.default_rng(seed).integers(len(templates), size=len(names))
    texts = [fill_template(templates[c], n) for c, n in zip(choice, names, strict=True)]
    if text_column in table.column_names:
        table = table.drop_columns([text_column])
    return table.append_column(pa.field(text_column, pa.string()), pa.array(texts, pa.string()))


def caption_parquet(
    src: str | Path,
    out: str | Path,
    templates: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``contrastive data captions IN OUT``: a copy of ``src`` with a templated ``text`` column
    (rows and their order unchanged); returns a JSON-able summary."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise DataError(f"{str(src)!r} is not a Parquet file")
    templates = list(templates or CAPTION_TEMPLATES)
    table = caption_table(pq.read_table(src), templates, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out, compression="zstd")
    texts = table.column(TEXT_COLUMN).to_pylist()
    return {
        "out": str(out),
        "rows": table.num_rows,
        "templates": len(templates),
        "distinct_captions": len(set(texts)),
        "examples": texts[:3],
    }


def _key(row: dict[str, Any], keys: Sequence[str], what: str, where: str) -> Any:
    for key in keys:
        if key in row:
            return row[key]
    raise DataError(f"{where}: no {what} field (one of {list(keys)}) in {sorted(row)}")


def _csv_rows(path: Path) -> list[tuple[str, Any]]:
    with path.open(newline="") as handle:
        rows = [r for r in csv.reader(handle) if r]
    if rows and {c.strip().lower() for c in rows[0]} & {*FILE_KEYS, *CAPTION_KEYS}:
        header = [c.strip().lower() for c in rows[0]]
        records = [dict(zip(header, r, strict=False)) for r in rows[1:]]
        where = f"captions file {str(path)!r}"
        return [
            (_key(r, FILE_KEYS, "file", where), _key(r, CAPTION_KEYS, "caption", where))
            for r in records
        ]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2]
    if bad:
        raise DataError(f"captions file {str(path)!r}: lines {bad[:5]} lack a caption column")
    return [(r[0], r[1]) for r in rows]


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"captions file {str(path)!r} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object like {{'file': ..., 'caption': ...}}")
        file = _key(record, FILE_KEYS, "file", where)
        out.append((file, _key(record, CAPTION_KEYS, "caption", where)))
    return out


def read_captions_file(path: str | Path) -> dict[str, Any]:
    """``{relative file path: caption}`` from a CSV (``file,caption`` header optional) or a
    JSONL file (``{"file": ..., "caption": ...}`` per line; ``.jsonl``/``.json`` suffix).
    Paths are relative to the image folder, ``/``-separated; a file listed twice is an error.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "c.csv"
    >>> _ = p.write_text("file,caption\\ncat/0.png,a small cat\\n")
    >>> read_captions_file(p)
    {'cat/0.png': 'a small cat'}
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"captions file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    rows = _jsonl_rows(path) if suffix in (".jsonl", ".json", ".ndjson") else _csv_rows(path)
    captions: dict[str, Any] = {}
    for file, caption in rows:
        key = Path(str(file).strip()).as_posix().removeprefix("./")
        if key in captions:
            raise DataError(f"captions file {str(path)!r} lists {key!r} twice")
        captions[key] = caption
    if not captions:
        raise DataError(f"captions file {str(path)!r} has no (file, caption) rows")
    return captions


def training_captions(config: Config) -> list[str]:
    """The valid captions (``text.column``) of the rows that train: ``data.train`` minus the
    held-out validation rows, at most ``data.limit`` (what ``fit_tokenizer`` fits on)."""
    from service.data.sources import inspect_source
    from service.data.splits import train_val_rows

    column = config.text.column
    if not column:
        raise DataError("text.column is not set: there are no captions to read")
    rows = train_val_rows(config).train_rows(config.data.limit)
    table = inspect_source(config.data.train).read([column], rows)
    return [t for t in table.column(column).to_pylist() if is_caption(t)]
