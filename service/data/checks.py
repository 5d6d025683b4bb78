"""Pre-flight checks the data module owns: its config sections' rules, and the data itself.

Run on the driver before MLflow or Ray start (``service.train.preflight``), so a wrong path, a
missing column or undecodable images cost seconds and leave nothing behind:

    >>> from service.config import Config
    >>> data_problems(Config())  # the bundled subset is fine
    []
"""

from __future__ import annotations

import posixpath

import numpy as np

from service.config import Config, DataConfig, TextConfig
from service.data.augment import (  # the augment section's rules live with its transforms
    augment_config_problems as augment_config_problems,  # re-exported: preflight gathers here
)
from service.data.captions import is_caption
from service.data.decode import decode_image
from service.data.errors import DataError
from service.data.parquet import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    LABEL_NAME_COLUMN,
)
from service.data.sources import DataSource, inspect_source, local_location

SAMPLE_ROWS = 32  # rows decoded per split: enough to catch a wrong encoding, cheap on S3
EAGER_SELECTION_MAX_BYTES = 4 * 2**30  # the Ray reader reads selected rows on the driver


def data_config_problems(d: DataConfig) -> list[str]:
    """What is wrong with the ``data`` section (empty when nothing)."""
    problems = []
    if d.image_size < 8:
        problems.append(f"data.image_size must be >= 8, got {d.image_size}")
    if d.loader_workers < 0:
        problems.append(f"data.loader_workers must be >= 0, got {d.loader_workers}")
    if not 0 <= d.val_fraction < 1:
        problems.append(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if not 0 <= d.max_bad_fraction <= 1:
        problems.append(f"data.max_bad_fraction must be in [0, 1], got {d.max_bad_fraction}")
    return problems


MIN_CONTEXT_LENGTH = 4  # a few tokens of caption plus the end-of-text token
MIN_VOCAB_SIZE = 258  # the byte-level alphabet (256) plus pad and end-of-text (service.text)


def text_config_problems(t: TextConfig) -> list[str]:
    """What is wrong with the ``text`` section's data side: column, tokenizer sizes, class names,
    prompt templates (empty when nothing; only checked when ``text.column`` is set: image-only
    runs ignore the section). The text tower's shape is the model's rule
    (``service.models.image_text.text_model_problems``)."""
    if t.column is None:
        return []
    problems = []
    if not isinstance(t.column, str) or not t.column.strip():
        problems.append(f"text.column must be a column name or null, got {t.column!r}")
    for key, value, low in (
        ("text.context_length", t.context_length, MIN_CONTEXT_LENGTH),
        ("text.vocab_size", t.vocab_size, MIN_VOCAB_SIZE),
    ):
        if value < low:
            problems.append(f"{key} must be >= {low}, got {value}")
    if not t.class_name_column:
        problems.append("text.class_name_column must name the class-name column (zero-shot)")
    templates = t.templates if isinstance(t.templates, list) else [t.templates]
    bad = [x for x in templates if not isinstance(x, str) or x.count("{}") != 1]
    if not templates or bad:
        problems.append(
            f"text.templates must be a non-empty list of prompts with one '{{}}' each for the "
            f"class name, e.g. 'a photo of a {{}}.'; bad: {bad or 'empty list'}"
        )
    return problems


def _text_problems(source: DataSource, key: str, config: Config) -> list[str]:
    """Image–text mode: the caption column is there as strings in every file, the first rows'
    captions are mostly usable, and labelled validation/test data has class names (zero-shot)."""
    t, d = config.text, config.data
    problem = source.column_problem(t.column)  # type: ignore[arg-type]
    if problem:
        return [f"{key}: {problem}"]
    rows = min(SAMPLE_ROWS, source.num_rows)
    texts = source.read([t.column], np.arange(rows)).column(t.column).to_pylist()
    empty = sum(not is_caption(x) for x in texts)
    problems = []
    if empty and (empty == rows or (empty / rows > d.max_bad_fraction and empty > 1)):
        problems.append(
            f"{key}={source.path!r}: {empty} of the first {rows} captions in {t.column!r} are "
            f"null or empty, more than data.max_bad_fraction={d.max_bad_fraction}"
        )
    if key != "data.train" and source.has_label and t.class_name_column not in source.columns:
        problems.append(
            f"{key}={source.path!r} has labels but no {t.class_name_column!r} column "
            f"(text.class_name_column), which zero-shot evaluation needs for its prompts"
        )
    return problems


def _sample_problem(source: DataSource, key: str, max_bad_fraction: float) -> str | None:
    """Decode the first rows; all failing, or more than the allowed fraction, is a problem."""
    rows = min(SAMPLE_ROWS, source.num_rows)
    images = source.read([IMAGE_COLUMN], np.arange(rows)).column(IMAGE_COLUMN).to_pylist()
    bad = 0
    for blob in images:
        try:
            decode_image(blob)
        except DataError:
            bad += 1
    if bad == rows:
        return (
            f"{key}={source.path!r}: none of the first {rows} images decode; is the "
            f"{IMAGE_COLUMN!r} column encoded image bytes (JPEG/PNG/...)? "
            f"See `contrastive data pack`"
        )
    if bad / rows > max_bad_fraction and bad > 1:
        return (
            f"{key}={source.path!r}: {bad} of the first {rows} images do not decode, more than "
            f"data.max_bad_fraction={max_bad_fraction}; fix the data or raise the fraction"
        )
    return None


def _split_problems(config: Config) -> list[str]:
    """Enough training rows, after the held-out validation rows and ``data.limit``, for one
    global batch (else a worker would find an empty epoch)."""
    from service.data.splits import train_val_rows

    d, split = config.data, train_val_rows(config)
    rows, batch = len(split.train_rows(d.limit)), config.train.global_batch_size
    problems = []
    if rows < batch:
        problems.append(
            f"data.train: {rows} training rows (after holding out data.val_fraction="
            f"{d.val_fraction} and data.limit={d.limit}) are fewer than one "
            f"global batch of {batch}; lower train.global_batch_size or add data"
        )
    if d.reader == "ray" and not split.keeps_every_row(d.limit):
        size = _files_bytes(d.train)
        if size > EAGER_SELECTION_MAX_BYTES:
            problems.append(
                f"data.train is {size / 2**30:.1f} GiB: holding rows out (data.val_fraction) or "
                f"data.limit would make the Ray reader select rows eagerly on the driver; "
                f"set data.val to a held-out Parquet file (and data.val_fraction: 0) to stream"
            )
    return problems


def _files_bytes(path: str) -> int:
    return inspect_source(path).nbytes()


def _missing_label(key: str, path: str, config: Config, loss_needs: bool) -> str:
    if key == "data.train" and loss_needs:
        return (
            f"data.train={path!r} has no {LABEL_COLUMN!r} column, which loss.name="
            f"{config.loss.name!r} trains on; add labels or choose a self-supervised loss "
            f"(ntxent, moco, ...)"
        )
    return (
        f"{key}={path!r} has no {LABEL_COLUMN!r} column, which kNN monitoring and "
        f"evaluation need; add labels or set data.val/data.test to null"
    )


def data_problems(config: Config, *, train_needs_labels: bool = False) -> list[str]:
    """Paths exist, Parquet columns and types, a sample of rows decodes, and labels are there
    where kNN (``data.val``, with the training split as the memory bank), ``data.test`` and a
    loss that trains on labels (``train_needs_labels``: SupCon, triplet, pairwise) need them;
    no validation file is a training file, and the bundled test split is not used beside
    training data of other classes. Reads file footers and a few rows only (and, beside the
    bundled test split, the training labels)."""
    d = config.data
    train_label = d.has_val or train_needs_labels
    needs_label = {"data.train": train_label, "data.val": True, "data.test": True}
    problems, sources = [], {}
    for key, path in (("data.train", d.train), ("data.val", d.val), ("data.test", d.test)):
        if not path:
            continue
        try:
            source = sources[key] = inspect_source(path)
            problem = _sample_problem(source, key, d.max_bad_fraction)
        except (DataError, OSError) as exc:
            problems.append(f"{key}: {exc}")
            continue
        if problem:
            problems.append(problem)
        if config.text.column:
            problems += _text_problems(source, key, config)
        if key == "data.train":
            problems += _split_problems(config)
        if needs_label[key] and not source.has_label:
            problems.append(_missing_label(key, path, config, train_needs_labels))
    return problems + _pairing_problems(config, sources)


def _pairing_problems(config: Config, sources: dict[str, DataSource]) -> list[str]:
    """What is wrong between the splits: validation files that are training files, and the
    bundled test split beside training data of other classes (docs/training.md)."""
    train, val, test = (sources.get(f"data.{k}") for k in ("train", "val", "test"))
    if train is None:  # its own problem is reported
        return []
    problems = []
    shared = sorted(set(val.locations()) & set(train.locations())) if val else []
    if shared:
        problems.append(
            f"data.val={config.data.val!r} is training data: {len(shared)} of its files "
            f"({_few([posixpath.basename(f) for f in shared])}) are in data.train="
            f"{config.data.train!r}, so the kNN monitor would count each validation image as "
            f"its own neighbour; hold rows out instead (--set data.val=null with "
            f"data.val_fraction > 0) or name files that are not in data.train"
        )
    if test is not None and is_bundled_test(config.data.test):
        problem = _bundled_test_problem(config, train, test)
        problems += [problem] if problem else []
    return problems


def is_bundled_test(path: str | None) -> bool:
    """Whether ``path`` is the bundled CIFAR-10 test subset (``data.test``'s default).

    >>> is_bundled_test(DataConfig().test), is_bundled_test("s3://bucket/test/")
    (True, False)
    """
    default = DataConfig().test
    return bool(path and default and "://" not in path) and (
        local_location(path) == local_location(default)  # type: ignore[arg-type]
    )


def _bundled_test_problem(config: Config, train: DataSource, test: DataSource) -> str | None:
    """The bundled test split goes with training data of CIFAR-10's classes under CIFAR-10's
    label ids (the bundled subset, the full CIFAR-10, a copy); beside other data its kNN, probe
    and embedding plot would be numbers about unrelated images, so it is never used silently."""
    classes = _class_map(train)
    if classes is not None and classes == _class_map(test):
        return None
    why = (
        "has no class names (a 'label_name' column), so nothing says it is CIFAR-10"
        if classes is None
        else f"has other classes ({_few([f'{k}={v}' for k, v in sorted(classes)])})"
    )
    return (
        f"data.test={config.data.test!r} is the bundled CIFAR-10 test subset, and data.train="
        f"{config.data.train!r} {why}: its test numbers would be about unrelated images; name "
        f"your test split (--set data.test=<your test split>) or train without one "
        f"(--set data.test=null)"
    )


def _class_map(source: DataSource) -> frozenset[tuple[int, str]] | None:
    """The (label, label_name) pairs of every row; None without both columns."""
    if not (source.has_label and source.has_label_name):
        return None
    table = source.read([LABEL_COLUMN, LABEL_NAME_COLUMN])
    pairs = table.group_by([LABEL_COLUMN, LABEL_NAME_COLUMN]).aggregate([])
    return frozenset(zip(*(pairs.column(c).to_pylist() for c in pairs.column_names), strict=True))


def _few(items: list[str], shown: int = 3) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
