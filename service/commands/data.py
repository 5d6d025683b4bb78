"""``contrastive data pack``, ``data captions`` and ``data preview``: dataset tools.

Errors are ``DataError`` / ``ConfigError`` (both ``ValueError``) with a message naming the
offending path or value.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from service.commands import args
from service.commands.config import load_checked_config


def add_parser(subparsers: args.Subparsers) -> None:
    """Register ``contrastive data`` and its subcommands ``pack``, ``captions``, ``preview``."""
    sub = args.add_group(subparsers, "data", "dataset tools", run)
    p = sub.add_parser("pack", help="pack a folder of class_name/*.jpg images into Parquet")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument(
        "--captions",
        default=None,
        help="CSV or JSONL of (file, caption), paths relative to SRC: adds a text column",
    )
    p.add_argument(
        "--format",
        choices=("parquet", "webdataset"),
        default="parquet",
        help="parquet: OUT is a .parquet file; webdataset: OUT is a folder of tar shards (SRC "
        "may also be a Parquet file to convert)",
    )
    p.add_argument("--shard-rows", type=int, default=1000, help="samples per WebDataset shard")
    p = sub.add_parser("captions", help="add a text column built from label_name (templates)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--templates", default=None, help="file: one template with {} per line")
    p.add_argument("--seed", type=int, default=0, help="seeds the template drawn for each row")
    p = sub.add_parser("preview", help="PNG grid of images and their augmented views")
    p.add_argument("data")
    p.add_argument("out")
    args.add_config(p)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed ``data`` command line → its handler."""
    handlers = {"pack": pack_command, "captions": captions_command, "preview": preview_command}
    return args.call(handlers[a.data_cmd], a)


def pack_command(
    src: str,
    out: str,
    captions: str | None = None,
    format: str = "parquet",
    shard_rows: int = 1000,
) -> dict[str, Any]:
    """``contrastive data pack SRC OUT.parquet [--captions FILE]``: image folder → Parquet
    (with a ``text`` column from a CSV/JSONL captions file); ``--format webdataset``: → tar
    shards in the folder OUT (SRC an image folder or a Parquet file); returns the summary."""
    from service.data.pack import pack_image_folder, pack_shards

    if format == "webdataset":
        return pack_shards(src, out, rows_per_shard=shard_rows, captions=captions)
    return pack_image_folder(src, out, captions=captions)


def captions_command(
    src: str, out: str, templates: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """``contrastive data captions IN.parquet OUT.parquet [--templates FILE] [--seed N]``: a copy
    of IN with a ``text`` column built from ``label_name`` with varied templates (seeded)."""
    from service.data.captions import caption_parquet, read_templates

    return caption_parquet(src, out, read_templates(templates) if templates else None, seed)


def preview_command(
    data: str,
    out: str,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    n_images: int = 8,
    n_views: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``contrastive data preview DATA OUT.png``: the config's augmentations on DATA, as a PNG.

    ``--set augment.strength=0.5`` style overrides apply, so a Tune trial's settings can be
    previewed exactly.
    """
    from service.data.preview import save_augmentation_preview

    config = load_checked_config(config_path, overrides or [])
    path = save_augmentation_preview(
        data,
        out,
        config.augment,
        config.data.image_size,
        n_images=n_images,
        n_views=n_views,
        seed=seed,
    )
    return {
        "out": str(Path(path)),
        "data": data,
        "n_images": n_images,
        "n_views": n_views if n_views is not None else config.augment.n_views,
        "image_size": config.data.image_size,
        "augment": {
            "strength": config.augment.strength,
            "min_scale": config.augment.min_scale,
            "jitter_p": config.augment.jitter_p,
            "grayscale_p": config.augment.grayscale_p,
            "blur": config.augment.blur,
        },
    }
