"""``contrastive index build`` and ``contrastive search``: nearest-neighbour search over the
output of ``contrastive embed`` (``service.search``; docs/registry.md, "Search").

The query is embedded with the registered model the index was built from (its manifest), or
``--model``; the store is the one every command resolves (``--tracking-uri``, else
$MLFLOW_TRACKING_URI, else ``mlruns.db`` here), checked reachable first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.commands import args
from service.commands.registry import resolve_store


def add_parser(subparsers: args.Subparsers) -> None:
    """Register ``contrastive index build`` and ``contrastive search``."""
    index = args.add_group(subparsers, "index", "nearest-neighbour indexes over embeddings", run)
    p = index.add_parser("build", help="faiss index over `contrastive embed` output")
    p.add_argument("--embeddings", required=True, help="embedding Parquet: file, dir or glob")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--metric", choices=("cosine", "ip"), default="cosine")
    p.add_argument(
        "--exact-below",
        type=int,
        default=100_000,
        help="exact (brute-force) index below this many vectors, IVF-Flat from there on",
    )
    p.add_argument("--model", default=None, help="the model that made the embeddings")
    p.add_argument(
        "--project",
        choices=("none", "joint"),
        default="none",
        help="joint: map backbone features into the image-text space of --model (text queries)",
    )
    args.add_tracking_uri(p)

    p = subparsers.add_parser("search", help="top-k rows of an index for an image or a text")
    p.add_argument("--index", required=True, help="index folder (`contrastive index build`)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", default=None, help="image file to search with")
    query.add_argument("--text", default=None, help="text to search with (image-text models)")
    p.add_argument("--model", default=None, help="default: the model the index was built from")
    p.add_argument("-k", type=int, default=10, help="results to return (default 10)")
    args.add_tracking_uri(p)
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed ``index build``/``search`` command line → its handler."""
    return args.call(index_build_command if a.command == "index" else search_command, a)


def index_build_command(
    embeddings: str,
    out: str,
    metric: str = "cosine",
    exact_below: int = 100_000,
    model: str | None = None,
    project: str = "none",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Build and save the index of ``embeddings`` in ``out``; its manifest."""
    import dataclasses

    from service.search import SearchInputError, build_index_from_parquet, project_to_joint

    projector = None
    if project == "joint":
        if model is None:
            raise SearchInputError("--project joint needs --model (an image-text model)")
        uri, _ = resolve_store(tracking_uri, model=model)
        projector = project_to_joint(model, uri)
    manifest = build_index_from_parquet(
        embeddings, out, metric=metric, exact_below=exact_below, model_uri=model, project=projector
    )
    return {"out": out, **dataclasses.asdict(manifest)}


def search_command(
    index: str,
    image: str | None = None,
    text: str | None = None,
    model: str | None = None,
    k: int = 10,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Embed the query, print the top ``k`` rows as a table on stderr, return them."""
    from service.search import format_results, search_index
    from service.search.index import Manifest

    model = model or Manifest.load(Path(index)).model_uri
    uri, shown = (None, None) if model is None else resolve_store(tracking_uri, model=model)
    result = search_index(index, image=image, text=text, model=model, k=k, tracking_uri=uri)
    print(format_results(result["results"]), file=sys.stderr, flush=True)
    return {**result, "tracking_uri": shown}
