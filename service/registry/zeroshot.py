"""Zero-shot classification of a Parquet of images with a registered image–text model.

Class names (given, or the distinct values of a column) are put into prompt templates (the run's
``text.templates`` by default), embedded by the text tower and averaged per class
(``service.eval.zeroshot``); every decodable image gets the most similar class. The output keeps
``row_id`` (input row index) and the non-image columns, plus ``predicted``, ``predicted_index``,
``score`` (the winning cosine similarity) and ``scores`` (cosine similarity to every class, in the
order of the summary's ``classes``). When the input says the true class (a class-name column, or
integer labels indexing the given classes), top-1 accuracy is reported.

    >>> summary = zero_shot_parquet("models:/clip-encoder@champion", "images.parquet",
    ...                             "preds.parquet", classes=["cat", "dog"])  # doctest: +SKIP
    >>> summary["top1"], summary["classes"]  # doctest: +SKIP
    (0.87, ['cat', 'dog'])
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import torch

from service.registry.embed import rows_with_ids, vectors_array
from service.registry.errors import RegistryInputError

PREDICTED_COLUMN = "predicted"


def _say(message: str) -> None:
    print(f"[zero-shot] {message}", file=sys.stderr, flush=True)


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per non-empty line, each with ``{}`` where the class name goes."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise RegistryInputError(
            f"{path}: every template line needs '{{}}' for the class name "
            f"(e.g. 'a photo of a {{}}.'); {'none found' if not templates else f'bad: {bad}'}"
        )
    return templates


def _class_names(source: Any, classes: Sequence[str] | None, column: str | None) -> list[str]:
    """The given names, or the distinct non-null values of ``column`` (sorted)."""
    if (classes is None) == (column is None):
        raise RegistryInputError("give exactly one of classes (names) and classes_from_column")
    if classes is not None:
        names = [c.strip() for c in classes if c and c.strip()]
        if len(set(names)) != len(names) or len(names) < 2:
            raise RegistryInputError(
                f"zero-shot needs >= 2 distinct, non-empty class names (e.g. --classes cat,dog), "
                f"got {list(classes)}"
            )
        return names
    if column not in source.columns:
        raise RegistryInputError(
            f"no column {column!r} to take class names from ({source.columns})"
        )
    dataset = pds.dataset(source.files, filesystem=source.filesystem, format="parquet")
    values = pc.unique(dataset.to_table(columns=[column]).column(column)).to_pylist()
    names = sorted(str(v) for v in values if v is not None and str(v).strip())
    if len(names) < 2:
        raise RegistryInputError(f"column {column!r} holds fewer than 2 class names: {names}")
    return names


def _truth(
    batch: pa.RecordBatch,
    rows: list[int],
    names: list[str],
    name_column: str | None,
    label_column: str,
) -> list[int | None]:
    """The true class index of each row (None when unknown or not among ``names``)."""
    index = {n: i for i, n in enumerate(names)}
    if name_column is not None and name_column in batch.schema.names:
        values = batch.column(name_column).to_pylist()
        return [index.get(str(values[r])) if values[r] is not None else None for r in rows]
    if label_column in batch.schema.names and pa.types.is_integer(
        batch.schema.field(label_column).type
    ):
        values = batch.column(label_column).to_pylist()
        return [
            v if v is not None and 0 <= v < len(names) else None for v in (values[r] for r in rows)
        ]
    return [None] * len(rows)


@torch.inference_mode()
def zero_shot_parquet(
    model_uri: str,
    input_parquet: str,
    output_parquet: str | Path,
    *,
    classes: Sequence[str] | None = None,
    classes_from_column: str | None = None,
    templates: Sequence[str] | None = None,
    label_column: str = "label",
    image_column: str = "image",
    batch_size: int = 256,
    tracking_uri: str | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Classify every decodable image of ``input_parquet`` among ``classes`` (or the values of
    ``classes_from_column``) and write the predictions; see the module doc. Returns counts, the
    classes, the templates used and ``top1`` (None without ground truth)."""
    from service.data.decode import decode_image
    from service.data.errors import CorruptImageError, DataError
    from service.data.sources import inspect_source
    from service.eval.zeroshot import zeroshot_classifier
    from service.registry.text import TextEncoder, load_image_text

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = inspect_source(input_parquet)
    if image_column not in source.columns:
        raise DataError(f"{input_parquet!r} has no column {image_column!r} ({source.columns})")
    names = _class_names(source, classes, classes_from_column)
    loaded = load_image_text(model_uri, tracking_uri)
    templates = list(templates or loaded.spec.text_config.get("templates") or ["{}"])
    name_column = classes_from_column or loaded.spec.text_config.get("class_name_column")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = loaded.model.to(device)
    text = TextEncoder(
        model.text_encoder, model.text_head, loaded.tokenizer, loaded.spec.context_length
    )
    class_embeddings = zeroshot_classifier(text.encode, names, templates).to(device)
    preprocess = loaded.preprocess()
    keep = [c for c in source.columns if c != image_column]
    dataset = pds.dataset(source.files, filesystem=source.filesystem, format="parquet")

    output = Path(output_parquet)
    output.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    done = skipped = written = correct = labelled = 0
    started = time.monotonic()
    try:
        for batch in dataset.to_batches(columns=source.columns, batch_size=batch_size):
            images, rows = [], []
            for i, data in enumerate(batch.column(image_column).to_pylist()):
                try:
                    images.append(preprocess(decode_image(data)))
                    rows.append(i)
                except CorruptImageError:
                    skipped += 1
            if rows:
                scores = model.encode_image(torch.stack(images).to(device)) @ class_embeddings.T
                best, predicted = scores.max(dim=1)
                predicted = predicted.cpu().tolist()
                for truth, guess in zip(
                    _truth(batch, rows, names, name_column, label_column), predicted, strict=True
                ):
                    if truth is not None:
                        labelled += 1
                        correct += int(truth == guess)
                table = rows_with_ids(batch.select(keep), rows, done)
                table = table.append_column(
                    PREDICTED_COLUMN, pa.array([names[p] for p in predicted])
                )
                table = table.append_column("predicted_index", pa.array(predicted, pa.int64()))
                table = table.append_column("score", pa.array(best.float().cpu().numpy()))
                table = table.append_column("scores", vectors_array(scores))
                if writer is None:
                    schema = table.schema.with_metadata({"zero_shot_classes": "\n".join(names)})
                    writer = pq.ParquetWriter(output, schema, compression="zstd")
                writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
                written += table.num_rows
            done += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise DataError(f"no decodable image in {input_parquet!r} ({skipped} corrupt of {done})")
    top1 = correct / labelled if labelled else None
    if top1 is not None:
        _say(f"top-1 accuracy {top1:.4f} on {labelled} labelled rows ({len(names)} classes)")
    return {
        "model_uri": model_uri,
        "output": str(output),
        "classes": names,
        "templates": templates,
        "rows_in": done,
        "rows_out": written,
        "skipped_corrupt": skipped,
        "labelled_rows": labelled,
        "top1": top1,
        "seconds": round(time.monotonic() - started, 3),
    }
