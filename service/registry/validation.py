"""What a version's champion metric was measured on: a fingerprint of those rows and their count.

The ``champion`` rule (``aliases``) compares two versions only when their metric was measured on
the same rows (the same fingerprint), and never promotes a version whose validation set is too
small to mean anything: fewer than ``MIN_VALIDATION_ROWS`` rows, or, when the rows are labelled,
fewer than ``MIN_ROWS_PER_CLASS`` rows per class on average (a kNN top-1 of 1.0 on 4 images says
nothing). The rows are ``data.val``, or the rows held out of ``data.train`` (the source's
fingerprint plus the selection: ``data.val_fraction``, ``train.seed``, ``data.limit``); a metric
named ``train_*`` (``train_loss``) is measured on the training rows instead. Image–text metrics
are measured on a seeded subset of at most ``MONITOR_MAX_ROWS`` (and ``eval.knn_max_train``)
validation rows; that cap is part of the selection.

    >>> toy = ValidationData("0123abcd", rows=4, classes=2, description="4 rows of toy.parquet")
    >>> toy.too_small()
    'validation set too small to mean anything (4 rows of toy.parquet; needs 100 rows or more)'
    >>> ValidationData.from_tags(toy.tags()) == toy
    True
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from service.config import Config

MIN_VALIDATION_ROWS = 100
MIN_ROWS_PER_CLASS = 10
FINGERPRINT_TAG = "validation.fingerprint"
ROWS_TAG = "validation.rows"
CLASSES_TAG = "validation.classes"
DESCRIPTION_TAG = "validation.data"


@dataclass(frozen=True)
class ValidationData:
    """The rows a champion metric was measured on: ``fingerprint`` (equal means the same rows),
    ``rows``, ``classes`` (distinct labels; None when unlabelled) and a ``description`` for
    people."""

    fingerprint: str
    rows: int
    classes: int | None
    description: str

    def too_small(self) -> str | None:
        """Why this set is too small to rank versions by, or None when it is large enough."""
        if self.rows < MIN_VALIDATION_ROWS:
            need = f"needs {MIN_VALIDATION_ROWS} rows or more"
        elif self.classes and self.rows < MIN_ROWS_PER_CLASS * self.classes:
            need = f"{self.classes} classes need {MIN_ROWS_PER_CLASS} rows per class or more"
        else:
            return None
        return f"validation set too small to mean anything ({self.description}; {need})"

    def tags(self) -> dict[str, str]:
        """The model-version tags that record it."""
        return {
            FINGERPRINT_TAG: self.fingerprint,
            ROWS_TAG: str(self.rows),
            CLASSES_TAG: "" if self.classes is None else str(self.classes),
            DESCRIPTION_TAG: self.description,
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> ValidationData | None:
        """What a version recorded; None for a version registered before this was recorded."""
        if not tags.get(FINGERPRINT_TAG):
            return None
        classes = tags.get(CLASSES_TAG) or None
        return cls(
            fingerprint=tags[FINGERPRINT_TAG],
            rows=int(tags.get(ROWS_TAG) or 0),
            classes=None if classes is None else int(classes),
            description=tags.get(DESCRIPTION_TAG, "?"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validation_data(config: Config, metric_name: str) -> ValidationData:
    """The rows ``metric_name`` of a run of ``config`` was measured on (file footers and the
    label column only; raises the source's errors when the data cannot be read)."""
    from service.data.sources import inspect_source
    from service.data.splits import train_val_rows

    d = config.data
    on_train = metric_name.startswith("train")
    held = on_train or not d.val  # rows of data.train, drawn by the seeded split
    path = d.train if held else d.val
    source = inspect_source(path)
    selection: dict[str, Any] = {"split": "train" if on_train else "validation"}
    rows = None
    if held:  # the draw is part of what was measured
        split = train_val_rows(config)
        rows = split.train_rows(d.limit) if on_train else split.val
        fraction = 0.0 if d.val else d.val_fraction
        selection.update(val_fraction=fraction, seed=config.train.seed, limit=d.limit)
    count = source.num_rows if rows is None else len(rows)
    cap = _monitor_cap(config, on_train)
    if cap is not None and cap < count:
        selection.update(max_rows=cap, seed=config.train.seed)
        count = cap
    payload = json.dumps({"source": source.fingerprint(), **selection}, sort_keys=True)
    return ValidationData(
        fingerprint=hashlib.sha256(payload.encode()).hexdigest()[:16],
        rows=count,
        classes=_classes(source, rows),
        description=_describe(path, count, selection),
    )


def _monitor_cap(config: Config, on_train: bool) -> int | None:
    """At most this many validation rows are evaluated (the image–text monitor), else None."""
    if on_train or not config.text.column:
        return None
    from service.eval.image_text import MONITOR_MAX_ROWS

    return min(MONITOR_MAX_ROWS, config.eval.knn_max_train or MONITOR_MAX_ROWS)


def _classes(source: Any, rows: Any) -> int | None:
    """Distinct labels among ``rows`` of ``source`` (all rows when None); None when unlabelled."""
    from service.data.parquet import LABEL_COLUMN

    if not source.has_label:
        return None
    labels = source.read([LABEL_COLUMN], rows).column(LABEL_COLUMN)
    return len(set(labels.to_pylist()) - {None})


def _describe(path: str, rows: int, selection: dict[str, Any]) -> str:
    """``500 rows held out of train.parquet (val_fraction 0.1, seed 0)``, ``4 rows of v.parquet``.

    >>> _describe("/d/v.parquet", 4, {"split": "validation"})
    '4 rows of v.parquet'
    """
    name = PurePosixPath(path.rstrip("/")).name or path
    keys = [k for k in ("val_fraction", "seed", "limit", "max_rows") if k in selection]
    how = ", ".join(f"{k} {selection[k]}" for k in keys if selection[k] is not None)
    if selection["split"] == "train":
        return f"{rows} training rows of {name}" + (f" ({how})" if how else "")
    if "val_fraction" in selection:
        return f"{rows} rows held out of {name} ({how})"
    return f"{rows} rows of {name}" + (f" ({how})" if how else "")
