"""Batch inference: one embedding per image row of a Parquet dataset, written to a new Parquet.

Streams record batches (memory stays bounded by ``batch_size``), keeps every non-image column
(ids, labels, ...) for the rows it embeds, and skips corrupt images, counting them.

    >>> embed_parquet("models:/contrastive-encoder@champion", "in.parquet", "out.parquet")
    ... # doctest: +SKIP
    {'rows_in': 1000, 'rows_out': 1000, 'skipped_corrupt': 0, 'embedding_dim': 512, ...}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import torch

from service.registry.load import load_encoder

EMBEDDING_COLUMN = "embedding"


def _progress(done: int, total: int, skipped: int, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-9)
    print(
        f"[embed] {done}/{total} rows ({skipped} corrupt skipped, {rate:.0f} rows/s)",
        file=sys.stderr,
        flush=True,
    )


@torch.inference_mode()
def embed_parquet(
    model_uri: str,
    input_parquet: str,
    output_parquet: str | Path,
    batch_size: int = 256,
    tracking_uri: str | None = None,
    *,
    image_column: str = "image",
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Embed every decodable image of ``input_parquet`` (file, directory, glob or URI) with the
    encoder at ``model_uri``; write the non-image columns + ``embedding`` (fixed-size list of
    float32) to ``output_parquet``. Returns counts, the embedding dim and the output path."""
    from service.data.decode import decode_image
    from service.data.errors import CorruptImageError
    from service.data.parquet import inspect_parquet

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = inspect_parquet(input_parquet)
    if image_column not in source.columns:
        raise ValueError(f"{input_parquet!r} has no column {image_column!r} ({source.columns})")
    encoder, preprocess = load_encoder(model_uri, tracking_uri)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder.to(device)
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
            images, rows = [], []
            for i, data in enumerate(batch.column(image_column).to_pylist()):
                try:
                    images.append(preprocess(decode_image(data)))
                    rows.append(i)
                except CorruptImageError:
                    skipped += 1
                    if len(first_bad) < 10:
                        first_bad.append(done + i)
            done += batch.num_rows
            if rows:
                features = encoder(torch.stack(images).to(device)).float().cpu().numpy()
                dim = features.shape[1]
                table = pa.Table.from_batches([batch.select(keep)]).take(pa.array(rows))
                flat = pa.array(features.astype(np.float32, copy=False).reshape(-1))
                table = table.append_column(
                    EMBEDDING_COLUMN, pa.FixedSizeListArray.from_arrays(flat, dim)
                )
                if writer is None:
                    writer = pq.ParquetWriter(output, table.schema, compression="zstd")
                writer.write_table(table)
                written += table.num_rows
            if time.monotonic() - last_report > 5 or done == source.num_rows:
                _progress(done, source.num_rows, skipped, started)
                last_report = time.monotonic()
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(
            f"no decodable image in {input_parquet!r} ({skipped} corrupt of {done}); "
            "nothing written"
        )
    return {
        "model_uri": model_uri,
        "output": str(output),
        "rows_in": done,
        "rows_out": written,
        "skipped_corrupt": skipped,
        "first_corrupt_rows": first_bad,
        "embedding_dim": dim,
        "seconds": round(time.monotonic() - started, 3),
    }
