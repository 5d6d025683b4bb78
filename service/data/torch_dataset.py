"""Map-style PyTorch dataset over image Parquet + the DataLoader that batches its views.

The PyTorch reader holds the *encoded* image bytes in memory (one Arrow buffer: ~46 MB for
CIFAR-10 train, shared copy-on-write with forked DataLoader workers) and decodes + augments per
item. It suits data that fits in memory; larger data goes through ``service.data.ray_dataset``.

Corrupt rows: every row is decoded once when the dataset is built (~0.2 ms per 32 px JPEG) and
only decodable rows are indexed. Items are then always real (image, label) pairs, batches keep
their exact size (distributed losses need equal per-rank batches), and the corrupt-row ceiling is
a fraction of the whole dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from service.config import Config
from service.data.augment import MultiViewTransform, eval_transform, simclr_transform
from service.data.captions import is_caption
from service.data.decode import DecodeStats, decode_image
from service.data.errors import CorruptImageError
from service.data.parquet import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    LABEL_NAME_COLUMN,
    default_columns,
    limit_indices,
)
from service.data.sources import inspect_source

NO_LABEL = -1  # label of every row when the data has no ``label`` column


class ParquetImageDataset(Dataset):
    """Images (and labels) from Parquet, decoded and transformed per item.

    ``n_views=None`` → items ``(Tensor[3,H,W], label)`` (evaluation / embedding);
    ``n_views=k``   → items ``([Tensor[3,H,W]] * k, label)``, ``k`` independent draws of
    ``transform`` (contrastive training). ``label`` is ``-1`` when the data has no label column.

    ``text_column`` (image–text data): captions are read and checked with the images — a row with
    a null or empty caption is skipped and counted like a corrupt image (and a corrupt image's
    caption goes with it); :attr:`texts` holds the usable rows' captions in item order, and with
    ``return_text=True`` items are ``(image or views, label, caption)``.

    >>> from service.data.augment import eval_transform
    >>> ds = ParquetImageDataset("service/data/bundled/cifar10-test-subset.parquet",
    ...                          eval_transform(32, [0.5] * 3, [0.25] * 3), limit=10)
    >>> image, label = ds[0]
    >>> len(ds), tuple(image.shape), 0 <= label < 10
    (10, (3, 32, 32), True)
    """

    def __init__(
        self,
        path: str,
        transform: Callable[[Any], torch.Tensor],
        n_views: int | None = None,
        limit: int | None = None,
        max_bad_fraction: float = 0.01,
        seed: int = 0,
        indices: np.ndarray | None = None,
        text_column: str | None = None,
        return_text: bool = False,
    ) -> None:
        if return_text and not text_column:
            raise ValueError("return_text=True needs a text_column")
        if n_views is not None and n_views < 1:
            raise ValueError(f"n_views must be >= 1 or None, got {n_views}")
        source = inspect_source(path)
        columns = default_columns(source, text_column)
        if indices is None:  # explicit row ids (e.g. a train/validation split) win over limit
            indices = limit_indices(source, limit, seed)
        table = source.read(columns, indices)

        self.path = str(path)
        self.transform = transform
        self.n_views = n_views
        self._many = MultiViewTransform(transform, n_views) if n_views is not None else None
        # One contiguous buffer: forked DataLoader workers share it without per-object refcounts.
        self._images = table.column(IMAGE_COLUMN).combine_chunks()
        if source.has_label:
            self._labels = table.column(LABEL_COLUMN).to_numpy().astype(np.int64)
        else:
            self._labels = np.full(table.num_rows, NO_LABEL, dtype=np.int64)
        self.class_names = _class_names(table) if source.has_label_name else {}
        self._texts = table.column(text_column).to_pylist() if text_column else None
        self.return_text = return_text

        # Row ids in messages are global 0-based rows over the sorted files, so they can be found.
        file_rows = indices if indices is not None else np.arange(table.num_rows)
        self.stats = DecodeStats()
        good = np.ones(table.num_rows, dtype=bool)
        for i, blob in enumerate(self._images.to_pylist()):
            if self._texts is not None and not is_caption(self._texts[i]):
                good[i] = False
                self.stats.add_bad(f"row {int(file_rows[i])} (null or empty caption)")
                continue
            try:
                decode_image(blob)
                self.stats.add_ok()
            except CorruptImageError as exc:
                good[i] = False
                self.stats.add_bad(f"row {int(file_rows[i])} ({exc})")
        where = f"{self.path!r}"
        self.stats.warn(where)
        self.stats.check(max_bad_fraction, where)
        self._rows = np.flatnonzero(good)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def labels(self) -> np.ndarray:
        """Labels of the usable rows, in item order (``-1`` where unlabelled)."""
        return self._labels[self._rows]

    @property
    def texts(self) -> list[str] | None:
        """Captions of the usable rows, in item order (None without a ``text_column``)."""
        if self._texts is None:
            return None
        return [self._texts[row] for row in self._rows]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        row = int(self._rows[index])
        image = decode_image(self._images[row].as_py())
        label = int(self._labels[row])
        item = self.transform(image) if self._many is None else self._many(image)
        if self.return_text:
            return item, label, self._texts[row]  # type: ignore[index]
        return item, label


def _class_names(table: Any) -> dict[int, str]:
    pairs = (
        table.select([LABEL_COLUMN, LABEL_NAME_COLUMN])
        .group_by([LABEL_COLUMN, LABEL_NAME_COLUMN])
        .aggregate([])
    )
    return dict(
        zip(
            pairs.column(LABEL_COLUMN).to_pylist(),
            pairs.column(LABEL_NAME_COLUMN).to_pylist(),
            strict=True,
        )
    )


def collate_views(batch: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """``[(views, label)] * b`` → ``([Tensor[b,3,H,W]] per view, Tensor[b])``.

    Eval items ``(Tensor, label)`` collate to ``(Tensor[b,3,H,W], Tensor[b])``; captioned items
    ``(x, label, caption)`` to the same plus the list of ``b`` captions.
    """
    if len(batch[0]) == 3:
        x, labels = collate_views([item[:2] for item in batch])
        return x, labels, [item[2] for item in batch]
    first, _ = batch[0]
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    if isinstance(first, torch.Tensor):
        return torch.stack([item for item, _ in batch]), labels
    views = [torch.stack([item[v] for item, _ in batch]) for v in range(len(first))]
    return views, labels


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    num_workers: int = 0,
    sampler: Sampler | None = None,
    pin_memory: bool | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """DataLoader yielding ``(list of view batches, labels)`` (see :func:`collate_views`).

    With a ``sampler`` (e.g. ``DistributedSampler``) shuffling is the sampler's job and
    ``shuffle`` must be False. ``generator`` seeds shuffling and the workers' augmentation RNG;
    give each DDP rank a different one, or every rank draws the same augmentation sequence.
    """
    if sampler is not None and shuffle:
        raise ValueError("shuffle=True conflicts with a sampler: let the sampler shuffle")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_views,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,  # don't re-fork workers (and re-copy) every epoch
        generator=generator,
    )


def build_train_dataset(
    config: Config,
    rows: np.ndarray | None = None,
    item_transform: Callable[[Any], Any] | None = None,
) -> ParquetImageDataset:
    """The contrastive training dataset a ``Config`` describes: ``data.train`` without the
    held-out validation rows, at most ``data.limit`` of them (or the given ``rows``). Items are
    the n SimCLR views, or one ``item_transform`` output (e.g. a uint8 square to augment in
    batches). Image–text mode (``text.column`` set): one view, and items carry the caption
    ``(x, label, caption)``."""
    from service.data.splits import train_val_rows

    if rows is None:
        rows = train_val_rows(config).train_rows(config.data.limit)
    if item_transform is not None:
        transform, n_views = item_transform, None
    else:
        transform = simclr_transform(config.augment, config.data.image_size)
        n_views = 1 if config.text.column else config.augment.n_views
    return ParquetImageDataset(
        config.data.train,
        transform,
        n_views=n_views,
        max_bad_fraction=config.data.max_bad_fraction,
        indices=rows,
        text_column=config.text.column,
        return_text=bool(config.text.column),
    )


def build_eval_dataset(
    config: Config, path: str, limit: int | None = None, with_text: bool = False
) -> ParquetImageDataset:
    """A single-view, deterministic dataset (kNN / linear probe / embedding) over ``path``.
    ``with_text`` (image–text evaluation): rows without a usable ``text.column`` caption are
    skipped and counted, and ``dataset.texts`` holds the captions in item order (items stay
    ``(image, label)``)."""
    return ParquetImageDataset(
        path,
        eval_transform(config.data.image_size, config.augment.mean, config.augment.std),
        n_views=None,
        limit=limit,
        max_bad_fraction=config.data.max_bad_fraction,
        seed=config.train.seed,
        text_column=config.text.column if with_text else None,
    )
