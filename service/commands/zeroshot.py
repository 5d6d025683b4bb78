"""``contrastive zero-shot``: classify a Parquet of images with a registered image–text model."""

from __future__ import annotations

import argparse
from typing import Any

from service.commands import args


def add_parser(subparsers: args.Subparsers) -> None:
    """Register ``contrastive zero-shot`` and its arguments."""
    p = subparsers.add_parser(
        "zero-shot", help="classify a Parquet of images by class names (image-text models)"
    )
    args.add_model(p)
    p.add_argument("--input", required=True, help="Parquet with an image column")
    p.add_argument("--output", required=True, help="predictions Parquet to write")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help="comma-separated class names, e.g. cat,dog,ship")
    names.add_argument("--classes-from-column", help="class names: this column's values")
    p.add_argument(
        "--templates", default=None, help="file, one prompt per line with {} (default: the run's)"
    )
    args.add_batch_size(p)
    args.add_tracking_uri(p)
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line → :func:`zero_shot_command`."""
    return args.call(zero_shot_command, a)


def zero_shot_command(
    model: str,
    input_path: str,
    output_path: str,
    *,
    classes: str | None = None,
    classes_from_column: str | None = None,
    templates_path: str | None = None,
    batch_size: int = 256,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """``classes``: comma-separated names (``cat,dog``); or ``classes_from_column``: the distinct
    values of that input column. ``templates_path``: one prompt template per line (default: the
    run's ``text.templates``). Writes predictions + per-class scores to ``output_path``."""
    from service.commands.registry import resolve_store
    from service.registry import read_templates, zero_shot_parquet

    uri, shown = resolve_store(tracking_uri, model=model)
    names = None if classes is None else [c.strip() for c in classes.split(",")]
    templates = read_templates(templates_path) if templates_path else None
    summary = zero_shot_parquet(
        model,
        input_path,
        output_path,
        classes=names,
        classes_from_column=classes_from_column,
        templates=templates,
        batch_size=batch_size,
        tracking_uri=uri,
    )
    return {**summary, "tracking_uri": shown}
