"""Batch inference: one embedding per row of a Parquet dataset, written to a new Parquet.

Streams record batches (memory stays bounded by ``batch_size``), keeps every non-image column
(ids, labels, ...) for the rows it embeds plus ``row_id`` (the row's index in the input, so
rows can be matched back when corrupt ones are skipped), and skips corrupt images, counting them.

Image embeddings are the backbone's raw features, **not** L2-normalised, unless
``normalize=True``. Text embeddings (``text_column=...``, image–text models only) come from the
text tower and its projection, and are always L2-normalised (the joint space of zero-shot).

    >>> embed_parquet("models:/contrastive-encoder@champion", "in.parquet", "out.parquet")
    ... # doctest: +SKIP
    {'rows_in': 1000, 'rows_out': 1000, 'skipped_corrupt': 0, 'embedding_dim': 512, ...}
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from service.registry.load import load_encoder

EMBEDDING_COLUMN = "embedding"
ROW_ID_COLUMN = "row_id"

# values of one batch → (indices of the rows that could be embedded, their features [n, d])
BatchEncoder = Callable[[list[Any]], tuple[list[int], torch.Tensor | None]]


def _progress(done: int, total: int, skipped: int, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-9)
    print(
        f"[embed] {done}/{total} rows ({skipped} corrupt skipped, {rate:.0f} rows/s)",
        file=sys.stderr,
        flush=True,
    )


def _image_batch_encoder(
    model_uri: str, tracking_uri: str | None, device: torch.device
) -> BatchEncoder:
    from service.data.decode import decode_image
    from service.data.errors import CorruptImageError

    encoder, preprocess = load_encoder(model_uri, tracking_uri)
    encoder = encoder.to(device)

    def encode(values: list[Any]) -> tuple[list[int], torch.Tensor | None]:
        images, rows = [], []
        for i, data in enumerate(values):
            try:
                images.append(preprocess(decode_image(data)))
                rows.append(i)
            except CorruptImageError:
                pass
        if not rows:
            return rows, None
        return rows, encoder(torch.stack(images).to(device))

    return encode


def _text_batch_encoder(
    model_uri: str, tracking_uri: str | None, device: torch.device
) -> BatchEncoder:
    from service.registry.text import load_text_encoder

    encoder = load_text_encoder(model_uri, tracking_uri).to(device)

    def encode(values: list[Any]) -> tuple[list[int], torch.Tensor | None]:
        rows = [i for i, text in enumerate(values) if isinstance(text, str)]  # nulls skipped
        if not rows:
            return rows, None
        return rows, encoder.encode([values[i] for i in rows])

    return encode


def pinned_model_version(model: str, tracking_uri: str | None) -> str:
    """``models:/NAME/V`` for a registered model (an alias resolved now), or for a pulled
    folder the version it records (``registry.json``), else its weights' hash."""
    from service.registry.load import REGISTRY_INFO_FILE
    from service.registry.lookup import MODELS_SCHEME, parse_model_ref, resolve_version

    local = Path(model[len("file://") :] if model.startswith("file://") else model)
    if not model.startswith(MODELS_SCHEME) and local.is_dir():
        info = local / REGISTRY_INFO_FILE
        if info.exists():
            return json.loads(info.read_text())["model_uri"]
        from service.registry.spec import find_weights_copy

        weights = find_weights_copy(local)[1]
        return f"{local.resolve()}#sha256:{hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}"
    from mlflow import MlflowClient

    from service.tracking.uri import resolve_tracking_uri

    ref = parse_model_ref(model)
    version = resolve_version(MlflowClient(resolve_tracking_uri(explicit=tracking_uri)), ref)
    return f"{MODELS_SCHEME}{ref.name}/{version.version}"


def model_metadata(model_uri: str, version: str) -> dict[bytes, bytes]:
    """The embeddings' Parquet schema metadata naming the model that made them (read by
    ``contrastive index build``)."""
    return {
        b"contrastive.model_uri": model_uri.encode(),
        b"contrastive.model_version": version.encode(),
    }


@torch.inference_mode()
def embed_parquet(
    model_uri: str,
    input_parquet: str,
    output_parquet: str | Path,
    batch_size: int = 256,
    tracking_uri: str | None = None,
    *,
    image_column: str = "image",
    text_column: str | None = None,
    normalize: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Embed every decodable image of ``input_parquet`` (file, directory, glob or URI) with the
    encoder at ``model_uri`` (or, with ``text_column``, every non-null text with the model's
    text tower); write ``row_id`` + the non-image columns + ``embedding`` (fixed-size list of
    float32) to ``output_parquet``. ``normalize`` L2-normalises image embeddings (text ones
    always are). Returns counts, the embedding dim and the output path."""
    from service.data.errors import DataError
    from service.data.sources import inspect_source

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # A text-only Parquet is fine for the text tower; images need the full image-file checks.
    source = _any_parquet(input_parquet) if text_column else inspect_source(input_parquet)
    column = text_column or image_column
    if column not in source.columns:
        raise DataError(f"{input_parquet!r} has no column {column!r} ({source.columns})")
    if ROW_ID_COLUMN in source.columns or EMBEDDING_COLUMN in source.columns:
        raise DataError(
            f"{input_parquet!r} already has a {ROW_ID_COLUMN!r} or {EMBEDDING_COLUMN!r} column; "
            "the output adds both: rename it first"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    make = _text_batch_encoder if text_column else _image_batch_encoder
    encode = make(model_uri, tracking_uri, device)
    keep = [c for c in source.columns if c != image_column]
    dataset = pds.dataset(source.files, filesystem=source.filesystem, format="parquet")

    output = Path(output_parquet)
    output.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    done = skipped = written = 0
    dim = 0
    first_bad: list[int] = []
    started = last_report = time.monotonic()
    try:
        for batch in dataset.to_batches(columns=source.columns, batch_size=batch_size):
            rows, features = encode(batch.column(column).to_pylist())
            bad = sorted(set(range(batch.num_rows)) - set(rows))
            skipped += len(bad)
            first_bad += [done + i for i in bad[: max(0, 10 - len(first_bad))]]
            if features is not None:
                if normalize:
                    features = F.normalize(features.float(), dim=1)
                table = _output_table(batch.select(keep), rows, done, features)
                dim = features.shape[1]
                if writer is None:
                    version = pinned_model_version(model_uri, tracking_uri)
                    schema = table.schema.with_metadata(model_metadata(model_uri, version))
                    writer = pq.ParquetWriter(output, schema, compression="zstd")
                table = table.replace_schema_metadata(writer.schema.metadata)
                writer.write_table(table)
                written += table.num_rows
            done += batch.num_rows
            if time.monotonic() - last_report > 5 or done == source.num_rows:
                _progress(done, source.num_rows, skipped, started)
                last_report = time.monotonic()
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        what = "text" if text_column else "decodable image"
        raise ValueError(
            f"no {what} in {input_parquet!r} ({skipped} skipped of {done}); nothing written"
        )
    return {
        "model_uri": model_uri,
        "output": str(output),
        "column": column,
        "tower": "text" if text_column else "image",
        "normalized": bool(normalize or text_column),
        "rows_in": done,
        "rows_out": written,
        "skipped_corrupt": skipped,
        "first_corrupt_rows": first_bad,
        "embedding_dim": dim,
        "seconds": round(time.monotonic() - started, 3),
    }


def _any_parquet(path: str) -> Any:
    """Files, filesystem, columns and row count of any Parquet data set (no image column
    needed)."""
    from types import SimpleNamespace

    from service.data.parquet import resolve_parquet_files

    filesystem, files = resolve_parquet_files(path)
    dataset = pds.dataset(files, filesystem=filesystem, format="parquet")
    return SimpleNamespace(
        files=files,
        filesystem=filesystem,
        columns=list(dataset.schema.names),
        num_rows=dataset.count_rows(),
    )


def _output_table(
    batch: pa.RecordBatch, rows: list[int], offset: int, features: torch.Tensor
) -> pa.Table:
    """``row_id`` (index in the whole input), the kept columns of ``rows``, ``embedding``."""
    return rows_with_ids(batch, rows, offset).append_column(
        EMBEDDING_COLUMN, vectors_array(features)
    )


def rows_with_ids(batch: pa.RecordBatch, rows: list[int], offset: int) -> pa.Table:
    """``rows`` of ``batch`` with a first column ``row_id`` = ``offset`` + index in the batch."""
    table = pa.Table.from_batches([batch]).take(pa.array(rows, pa.int64()))
    ids = pa.array(np.asarray(rows, dtype=np.int64) + offset, pa.int64())
    return table.add_column(0, ROW_ID_COLUMN, ids)


def vectors_array(features: torch.Tensor) -> pa.FixedSizeListArray:
    """``[n, d]`` → a Parquet-ready fixed-size list of float32 per row."""
    values = features.float().cpu().numpy().astype(np.float32, copy=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
