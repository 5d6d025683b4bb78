"""Image–text evaluation: zero-shot top-1 and retrieval recall@1/5/10 on a split of captioned
images, per epoch on the validation split (:class:`ImageTextMonitor`) and at the end on the test
split beside the same architecture at random init (:func:`evaluate_beside_random_init`).

Metric names: ``zeroshot_top1``, ``i2t_recall_at_{1,5,10}``, ``t2i_recall_at_{1,5,10}``
(``service.eval.retrieval`` says how repeated captions count), prefixed ``val_`` per epoch and
``test_`` / ``random_`` (random init, same test rows) at the end. Zero-shot needs the split's
``label`` and ``text.class_name_column`` columns, retrieval its ``text.column``; a metric whose
columns are missing is left out.

The caller hands in the model and the tokenizer (from a checkpoint, a registry, a worker): this
module never imports ``service.train``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.config import Config
from service.eval.retrieval import caption_groups, retrieval_recall
from service.eval.zeroshot import zeroshot_classifier, zeroshot_top1

MONITOR_MAX_ROWS = 2000  # per-epoch validation cost bound (rows of the validation split)
FINAL_MAX_ROWS = 10000  # final test evaluation bound
# Validation metrics the `champion` alias may compare in image–text mode (preflight registers them)
CHAMPION_METRICS = ("val_zeroshot_top1", "val_i2t_recall_at_5", "val_t2i_recall_at_5")
RECALL_METRICS = tuple(f"val_{d}_recall_at_{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))


@dataclass(frozen=True)
class CaptionedImages:
    """Encoded images of one split with, per row, its caption (``None`` without a caption
    column) and class index into ``class_names`` (``None`` without labels and class names)."""

    images: list[bytes]
    captions: list[str] | None
    labels: torch.Tensor | None
    class_names: list[str]
    # The images decoded once (``keep_pixels``): uint8 [n, 3, S, S] after the eval transform's
    # resize + crop (``augment.eval_pixels``); evaluations then skip decoding. None: decode.
    pixels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)


def _select(indices: np.ndarray | None, num_rows: int, max_rows: int, seed: int) -> np.ndarray:
    rows = np.arange(num_rows) if indices is None else np.asarray(indices)
    if len(rows) > max_rows:  # a seeded random subset: files may be sorted by class
        rows = np.random.default_rng(seed).choice(rows, max_rows, replace=False)
    return np.sort(rows)


def _class_names(source: Any, name_column: str) -> list[tuple[int, str]]:
    from service.data.parquet import LABEL_COLUMN

    table = source.read([LABEL_COLUMN, name_column])  # two small columns, whole file
    labels, names = table.column(LABEL_COLUMN).to_pylist(), table.column(name_column).to_pylist()
    pairs = dict(zip(labels, names, strict=True))
    return sorted((int(k), str(v)) for k, v in pairs.items() if k is not None and v is not None)


def load_captioned_images(
    config: Config,
    path: str,
    indices: np.ndarray | None = None,
    max_rows: int = FINAL_MAX_ROWS,
    keep_pixels: bool = False,
) -> CaptionedImages:
    """Rows ``indices`` of ``path`` (all when None), at most ``max_rows`` of them (seeded).

    Rows whose image does not decode or whose caption is empty are left out, as the readers do.
    ``keep_pixels``: keep the images this check decodes (``CaptionedImages.pixels``).
    """
    from service.data.augment import eval_pixels
    from service.data.captions import is_caption
    from service.data.decode import decode_image
    from service.data.errors import CorruptImageError
    from service.data.parquet import IMAGE_COLUMN, LABEL_COLUMN
    from service.data.sources import inspect_source

    source = inspect_source(path)
    text_column, name_column = config.text.column, config.text.class_name_column
    has_text = bool(text_column) and text_column in source.columns
    named = source.has_label and name_column in source.columns
    columns = [IMAGE_COLUMN] + [text_column] * has_text + [LABEL_COLUMN] * named
    rows = _select(indices, source.num_rows, max_rows, config.train.seed)
    table = source.read(columns, rows)
    keep, pixels = [], {}
    for i, blob in enumerate(table.column(IMAGE_COLUMN).to_pylist()):
        try:
            image = decode_image(blob)
            keep.append(i)
        except CorruptImageError:
            continue
        if keep_pixels:
            pixels[i] = eval_pixels(image, config.data.image_size)
    if has_text:
        texts = table.column(text_column).to_pylist()
        keep = [i for i in keep if is_caption(texts[i])]
    table = table.take(keep)
    size = config.data.image_size
    kept = torch.empty(0, 3, size, size, dtype=torch.uint8)
    if keep_pixels and keep:
        kept = torch.stack([pixels[i] for i in keep])
    labels, class_names = None, []
    if named:
        ids_names = _class_names(source, name_column)
        position = {label: c for c, (label, _) in enumerate(ids_names)}
        class_names = [name for _, name in ids_names]
        labels = torch.tensor([position[y] for y in table.column(LABEL_COLUMN).to_pylist()])
    return CaptionedImages(
        images=table.column(IMAGE_COLUMN).to_pylist(),
        captions=table.column(text_column).to_pylist() if has_text else None,
        labels=labels,
        class_names=class_names,
        pixels=kept if keep_pixels else None,
    )


def _encode_images(
    model: nn.Module, x: torch.Tensor, with_features: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``encode_image(x)`` and, when asked, the backbone features it went through (one
    forward: ``ImageTextModel.encode_image_with_features``)."""
    if not with_features:
        return model.encode_image(x).float().cpu(), None
    images, features = model.encode_image_with_features(x)
    return images.cpu(), features.float().cpu()


@torch.no_grad()
def image_text_metrics(
    model: nn.Module,
    tokenizer: Any,
    data: CaptionedImages,
    config: Config,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    health: bool = False,
) -> dict[str, float]:
    """Zero-shot top-1 (``config.text.templates``) and retrieval recall@1/5/10 of an
    ``ImageTextModel`` (``encode_image`` / ``encode_text``) on ``data``; float32, eval mode.
    ``data.pixels`` (decoded once) or else its encoded images: the same numbers.
    ``health``: also the ``health_*`` row (``service.eval.health.image_text_health``) from the
    same image and caption embeddings, when ``data`` has captions and at least 2 rows and 2
    distinct captions (the model needs ``embed`` + ``head``, as ``ImageTextModel``)."""
    from service.eval.health import image_text_health

    if len(data) == 0:
        raise ValueError("image–text evaluation needs at least one usable row")
    length = config.text.context_length

    def encode_texts(texts: list[str]) -> torch.Tensor:
        chunks = [
            model.encode_text(tokenizer.encode(texts[i : i + batch_size], length).to(device))
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(chunks).float().cpu()

    was_training = model.training
    model.eval()
    try:
        batches = [
            _encode_images(model, batch.to(device), health)
            for batch in _image_batches(data, config, batch_size)
        ]
        images = torch.cat([z for z, _ in batches])
        metrics: dict[str, float] = {}
        if data.labels is not None and data.class_names:
            classes = zeroshot_classifier(encode_texts, data.class_names, config.text.templates)
            metrics["zeroshot_top1"] = zeroshot_top1(images, data.labels, classes)
        if data.captions is not None:
            ids, distinct = caption_groups(data.captions)
            texts = encode_texts(distinct)
            metrics.update(retrieval_recall(images, texts, ids))
            if health and len(images) >= 2 and len(texts) >= 2:  # else no pair to compare
                features = torch.cat([f for _, f in batches])
                metrics.update(image_text_health(features, images, texts, ids))
    finally:
        model.train(was_training)
    return metrics


def _image_batches(
    data: CaptionedImages, config: Config, batch_size: int
) -> Iterator[torch.Tensor]:
    """``data``'s images as normalised float batches: from ``data.pixels`` when decoded once,
    else decoded now (``eval_transform``; the same values)."""
    from service.data.augment import eval_normalize, eval_transform
    from service.data.decode import decode_image

    a = config.augment
    if data.pixels is not None:
        normalize = eval_normalize(a.mean, a.std)
        for i in range(0, len(data), batch_size):
            yield normalize(data.pixels[i : i + batch_size])
        return
    transform = eval_transform(config.data.image_size, a.mean, a.std)
    for i in range(0, len(data), batch_size):
        yield torch.stack([transform(decode_image(b)) for b in data.images[i : i + batch_size]])


def run_tokenizer_path(config: Config) -> Path:
    """``<storage_path>/<run_name>/tokenizer.json``: where the driver saves the run's tokenizer."""
    storage = config.train.storage_path
    base = Path(storage).expanduser().resolve() if "://" not in storage else Path(storage)
    return base / config.train.run_name / "tokenizer.json"


def run_tokenizer(config: Config) -> Any:
    """The run's tokenizer: the file the driver saved, else fitted again (same training
    captions, same vocabulary size: the same tokenizer), e.g. inside a Tune trial."""
    from service.text import Tokenizer, fit_tokenizer

    path = run_tokenizer_path(config)
    return Tokenizer.load(path) if path.is_file() else fit_tokenizer(config)


def _fits_decoded(rows: int, image_size: int) -> bool:
    """Whether ``rows`` decoded images fit the memory available now (the training rows' rule,
    ``decode_once_plan``); one line says so when they do not."""
    from service.console import say
    from service.data.decoded import decode_once_plan

    plan = decode_once_plan(rows, image_size)
    if not plan.decode_once:
        say("train", f"image–text monitor: decoding its rows every epoch ({plan.reason()})")
    return plan.decode_once


class ImageTextMonitor:
    """Per-epoch ``val_zeroshot_top1``, ``val_i2t_recall_at_{1,5,10}``,
    ``val_t2i_recall_at_{1,5,10}`` on the validation split (``data.val``, or the rows held out
    from ``data.train``: ``service.data.splits``), at most :data:`MONITOR_MAX_ROWS` rows (seeded
    subset; also capped by ``eval.knn_max_train`` when set). Rank 0 only; the rows are read once
    and, when they fit (``decode_once_plan``; ``decode_once`` forces it either way), kept decoded
    (uint8), so each epoch costs the forward only; otherwise each epoch decodes them again.
    Also the ``health_*`` row of the same embeddings (image–caption pairs as the positives;
    ``service.eval.health.image_text_health``), under the same names as the kNN monitor's.
    """

    def __init__(
        self, config: Config, tokenizer: Any = None, decode_once: bool | None = None
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.decode_once = decode_once
        self._data: CaptionedImages | None = None

    def due(self, epoch: int) -> bool:
        """After every ``eval.knn_every_epochs`` completed epochs (1-based) and the last one."""
        every, epochs = self.config.eval.knn_every_epochs, self.config.train.epochs
        return epoch >= epochs or epoch % every == 0

    def data(self) -> CaptionedImages:
        if self._data is None:
            from service.data.splits import train_val_rows

            d, cap = self.config.data, MONITOR_MAX_ROWS
            cap = min(cap, self.config.eval.knn_max_train or cap)
            indices = None if d.val else train_val_rows(self.config).val
            keep = self.decode_once
            if keep is None:
                keep = _fits_decoded(cap, d.image_size)
            path = d.val or d.train
            self._data = load_captioned_images(self.config, path, indices, cap, keep)
        return self._data

    def __call__(self, model: nn.Module, device: torch.device | str) -> dict[str, float]:
        if self.tokenizer is None:
            self.tokenizer = run_tokenizer(self.config)
        metrics = image_text_metrics(
            model, self.tokenizer, self.data(), self.config, device, health=True
        )
        # health_* keep the kNN monitor's names (the collapse check and the curves read them)
        return {(k if k.startswith("health_") else f"val_{k}"): v for k, v in metrics.items()}


def monitor_metric_names(config: Config) -> list[str]:
    """What :class:`ImageTextMonitor` reports for ``config`` that a run may be judged on (higher
    is better; its ``health_*`` diagnostics are not listed), :data:`CHAMPION_METRICS` first:
    zero-shot top-1 only when the validation rows are labelled and name their classes
    (``text.class_name_column``), recall@1/5/10 both ways always (text mode needs the caption
    column). Reads the validation source's schema, not its rows.

        >>> from service.config import load_config
        >>> monitor_metric_names(load_config("jobs/configs/clip-smoke-cpu.yaml"))[:3]
        ['val_zeroshot_top1', 'val_i2t_recall_at_5', 'val_t2i_recall_at_5']
    """
    from service.data.errors import DataError
    from service.data.sources import inspect_source

    d = config.data
    try:
        source = inspect_source(d.val or d.train)
        named = source.has_label and config.text.class_name_column in source.columns
    except (DataError, OSError):
        named = True  # unreadable: pre-flight's data check names the file; assume the usual
    reported = (["val_zeroshot_top1"] if named else []) + list(RECALL_METRICS)
    return sorted(reported, key=lambda m: (m not in CHAMPION_METRICS, reported.index(m)))


def evaluate_beside_random_init(
    model: nn.Module,
    tokenizer: Any,
    config: Config,
    build_random: Callable[[], nn.Module],
    *,
    path: str | None = None,
    device: torch.device | str = "cpu",
    max_rows: int = FINAL_MAX_ROWS,
) -> dict[str, float]:
    """``test_*`` metrics of ``model`` on ``path`` (default ``data.test``) and ``random_*``: the
    same rows, tokenizer and protocol on ``build_random()`` seeded with ``train.seed`` (what
    pretraining bought). Empty when there is no test split."""
    path = path or config.data.test
    if not path:
        return {}
    data = load_captioned_images(config, path, max_rows=max_rows)
    print(f"[evaluate] image–text metrics on {len(data)} rows of {path}", file=sys.stderr)
    trained = image_text_metrics(model.to(device), tokenizer, data, config, device)
    torch.manual_seed(config.train.seed)
    random_model = build_random().to(device)
    random = image_text_metrics(random_model, tokenizer, data, config, device)
    return {
        **{f"test_{k}": v for k, v in trained.items()},
        **{f"random_{k}": v for k, v in random.items()},
    }


def image_text_problems(config: Config) -> list[str]:
    """Text mode's rules (``text.column`` set): a champion metric that the run logs; the text
    tower's shape (prompt templates are checked with the rest of the text section in
    ``service.data.checks``). That the loss is a paired one (``symmetric``,
    ``siglip``) is the loss's own rule (``check_loss_config(..., text_mode=True)``).
    Cached-gradient steps (``train.micro_batch_size``) support paired views: no rule."""
    from service.models.image_text import text_model_problems

    t = config.text
    if not t.column:
        champion = config.mlflow.champion_metric
        if champion in CHAMPION_METRICS:
            return [f"mlflow.champion_metric={champion} needs image–text mode (set text.column)"]
        return []
    problems = text_model_problems(config)
    m = config.mlflow
    if m.enabled and m.registered_model_name and m.champion_metric == "knn_top1":
        problems.append(
            "mlflow.champion_metric=knn_top1 is not measured in image–text mode; use "
            f"one of {'|'.join(CHAMPION_METRICS)} or train_loss"
        )
    return problems
