"""Augmentation preview: a PNG grid to eyeball what the training views look like.

Rows are images; the first column is the original (resized and centre-cropped to the training
size), the others are independent augmented views, un-normalised for display. Small images are
enlarged with nearest-neighbour sampling so 32 px pixels stay visible. The views come from the
backend the config trains with (``augment.backend``): the per-image torchvision pipeline, or
``BatchSimCLRAugment`` on the decoded uint8 squares the batched readers deliver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms import v2

from service.config import AugmentConfig
from service.data.augment import MultiViewTransform, denormalize, simclr_transform
from service.data.batch_augment import BatchSimCLRAugment
from service.data.decode import decode_image
from service.data.decoded import fit_item
from service.data.errors import CorruptImageError, DataError
from service.data.parquet import LABEL_COLUMN, LABEL_NAME_COLUMN, read_image_table

_MIN_TILE = 96  # px on screen per image
_PAD = 4
_HEADER = 22
_LABEL_WIDTH = 96


def _to_pil(view: torch.Tensor, cfg: AugmentConfig) -> Image.Image:
    pixels = denormalize(view, cfg.mean, cfg.std).mul(255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")


def _views(
    cfg: AugmentConfig, image_size: int, n_views: int, seed: int, images: list[Image.Image]
) -> list[list[torch.Tensor]]:
    """``n_views`` seeded views of each image, from ``cfg.backend``."""
    if not images:
        return []
    if cfg.backend == "batched":
        slots, extents = zip(*(fit_item(image, image_size) for image in images), strict=True)
        augment = BatchSimCLRAugment(cfg, image_size, n_views=n_views, seed=seed)
        per_view = augment(torch.stack(slots), torch.stack(extents))
        return [[view[i] for view in per_view] for i in range(len(images))]
    views_of = MultiViewTransform(simclr_transform(cfg, image_size), n_views)
    with torch.random.fork_rng(devices=[]):  # seeded views without disturbing the caller's RNG
        torch.manual_seed(seed)
        return [views_of(image) for image in images]


def save_augmentation_preview(
    data_path: str,
    out_png: str | Path,
    cfg: AugmentConfig,
    image_size: int,
    n_images: int = 8,
    n_views: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a grid of ``n_images`` random images x (original + ``n_views`` views) to a PNG.

    ``n_views`` defaults to ``cfg.n_views``. Images are a seeded random sample of the data and
    the views are drawn from a seeded generator by ``cfg.backend``, so the same arguments give
    the same picture.

    >>> import tempfile
    >>> out = save_augmentation_preview("service/data/bundled/cifar10-test-subset.parquet",
    ...     Path(tempfile.mkdtemp()) / "p.png", AugmentConfig(), 32, n_images=2)
    >>> out.suffix
    '.png'
    """
    n_views = cfg.n_views if n_views is None else n_views
    if n_images < 1 or n_views < 1:
        raise DataError(f"need n_images >= 1 and n_views >= 1, got {n_images} and {n_views}")
    table = read_image_table(data_path, limit=n_images, seed=seed)
    decoded = _decoded_rows(table)
    views = _views(cfg, image_size, n_views, seed, [image for _, image in decoded])
    original = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    tile = max(image_size, _MIN_TILE)
    rows: list[tuple[str, list[Image.Image]]] = []
    for (caption, image), image_views in zip(decoded, views, strict=True):
        tiles = [original(image)] + [_to_pil(v, cfg) for v in image_views]
        rows.append((caption, [t.resize((tile, tile), Image.Resampling.NEAREST) for t in tiles]))
    if not rows:
        raise DataError(f"none of the {table.num_rows} sampled images in {data_path!r} decode")
    canvas = _grid(rows, n_views, tile, cfg, image_size)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out


def _decoded_rows(table: Any) -> list[tuple[str, Image.Image]]:
    """``(caption, image)`` of the decodable rows; the caption is the class name, the label or
    the row number (the preview shows images, not errors: readers report corrupt rows)."""
    columns = table.schema.names
    names = table.column(LABEL_NAME_COLUMN).to_pylist() if LABEL_NAME_COLUMN in columns else None
    labels = table.column(LABEL_COLUMN).to_pylist() if LABEL_COLUMN in columns else None
    decoded = []
    for i, blob in enumerate(table.column("image").to_pylist()):
        caption = names[i] if names else (f"label {labels[i]}" if labels else f"image {i}")
        try:
            decoded.append((caption, decode_image(blob)))
        except CorruptImageError:
            continue
    return decoded


def _grid(
    rows: list[tuple[str, list[Image.Image]]],
    n_views: int,
    tile: int,
    cfg: AugmentConfig,
    image_size: int,
) -> Image.Image:
    """The tiles in a labelled grid with the settings as a footer."""
    font = ImageFont.load_default(size=14)
    footer = [
        f"strength={cfg.strength}  min_scale={cfg.min_scale}  size={image_size}",
        f"jitter_p={cfg.jitter_p}  grayscale_p={cfg.grayscale_p}  blur={cfg.blur}",
        f"backend={cfg.backend}",
    ]
    grid_width = _LABEL_WIDTH + (1 + n_views) * (tile + _PAD) + _PAD
    width = max(grid_width, *(int(font.getlength(line)) + 2 * _PAD for line in footer))
    grid_bottom = _HEADER + len(rows) * (tile + _PAD) + _PAD
    canvas = Image.new("RGB", (width, grid_bottom + len(footer) * _HEADER), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(["original"] + [f"view {v + 1}" for v in range(n_views)]):
        draw.text((_LABEL_WIDTH + _PAD + c * (tile + _PAD), 3), title, fill=(0, 0, 0), font=font)
    for r, (caption, tiles) in enumerate(rows):
        y = _HEADER + _PAD + r * (tile + _PAD)
        draw.text((_PAD, y + tile // 2 - 8), caption[:12], fill=(0, 0, 0), font=font)
        for c, t in enumerate(tiles):
            canvas.paste(t, (_LABEL_WIDTH + _PAD + c * (tile + _PAD), y))
    for i, line in enumerate(footer):
        draw.text((_PAD, grid_bottom + i * _HEADER + 2), line, fill=(90, 90, 90), font=font)
    return canvas
