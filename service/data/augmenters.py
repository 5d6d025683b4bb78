"""Augmentation backends, registered by name (``augment.backend``): where views are made.

A backend answers three questions for the readers, so no reader branches on its name:

- ``item_transform``: what the PyTorch streaming reader does per row (the views themselves, or
  only a decoded uint8 square to augment later in a batch);
- ``yields_uint8``: whether the Ray Data map tasks only decode (the views are made later) or
  also augment;
- ``batch_fn``: what the training process does to each loader batch on its device (nothing, or
  :class:`~service.data.batch_augment.BatchSimCLRAugment`).

Shipped: ``batched`` (decoded uint8 batches, augmented at once on ``data.augment_device``, a
fixed sequence of batched ops, on CUDA replayed from a CUDA graph; the default) and
``torchvision`` (the per-image PIL pipeline, the reference).

    >>> sorted(AUGMENTERS)
    ['batched', 'torchvision']
    >>> AUGMENTERS["batched"].yields_uint8, AUGMENTERS["torchvision"].yields_uint8
    (True, False)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from service.config import Config

Views = list[torch.Tensor]  # n_views float tensors [b, 3, H, W]


def augment_seed(config: Config, rank: int) -> int:
    """One augmentation seed per rank (ranks must not draw the same views), from train.seed."""
    return int(np.random.SeedSequence([config.train.seed, rank]).generate_state(1)[0])


def n_views(config: Config) -> int:
    """Views per row: ``augment.n_views``, or one in image–text mode (the caption pairs it)."""
    return 1 if config.text.column else config.augment.n_views


@dataclass(frozen=True)
class Augmenter:
    """One ``augment.backend`` (see the module docstring)."""

    name: str
    yields_uint8: bool  # loaders deliver decoded uint8 [b, 3, S, S]; batch_fn makes the views
    item_transform: Callable[[Config], Callable[[Any], Any]]
    batch_fn: Callable[[Config, int, torch.device], Callable[[Any], Views]]


def _uint8_item(config: Config) -> Callable[[Any], Any]:
    from service.data.decoded import fit_item

    return partial(fit_item, size=config.data.image_size)  # (pixels, its (h, w) extent)


def _views_item(config: Config) -> Callable[[Any], Any]:
    from service.data.augment import MultiViewTransform, simclr_transform

    return MultiViewTransform(
        simclr_transform(config.augment, config.data.image_size), n_views(config)
    )


def _batched_fn(config: Config, rank: int, device: torch.device) -> Callable[[Any], Views]:
    from service.data.batch_augment import BatchSimCLRAugment

    augment = BatchSimCLRAugment(
        config.augment, config.data.image_size, seed=augment_seed(config, rank),
        n_views=n_views(config),
    )  # fmt: skip

    def views(x: Any) -> Views:  # Pixels, or a collated [pixels, sizes], or bare pixels
        images, sizes = x if isinstance(x, tuple | list) else (x, None)
        return augment(images.to(device, non_blocking=True), sizes)

    return views


def _views_fn(config: Config, rank: int, device: torch.device) -> Callable[[Any], Views]:
    # The loader made the views; image–text mode's Ray reader hands the one view as a tensor.
    return lambda views: views if isinstance(views, list) else [views]


AUGMENTERS: dict[str, Augmenter] = {
    "batched": Augmenter("batched", True, _uint8_item, _batched_fn),
    "torchvision": Augmenter("torchvision", False, _views_item, _views_fn),
}


def augmenter(config: Config) -> Augmenter:
    """The backend ``augment.backend`` names (checked by the config's choice field)."""
    return AUGMENTERS[config.augment.backend]
