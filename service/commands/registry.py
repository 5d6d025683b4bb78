"""``contrastive registry list``/``promote``, ``contrastive pull`` and ``contrastive embed``: the
MLflow model registry from the command line.

Without ``--tracking-uri`` every command uses the store pretraining used: the one
``service.tracking.uri.resolve_tracking_uri`` picks ($MLFLOW_TRACKING_URI, else ``mlruns.db`` in
the current directory), never MLflow's own default. Each result names the store it used. A store
the command needs is checked first (one HTTP request): an unreachable server fails in seconds
with exit code 2, not after MLflow's minutes of retries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.commands import args


def add_parser(subparsers: args.Subparsers) -> None:
    """Register ``contrastive registry promote``/``list``, ``pull`` and ``embed``."""
    registry = args.add_group(subparsers, "registry", "MLflow model registry", run)
    p = registry.add_parser("promote", help="point an alias (e.g. champion) at a model version")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", required=True)
    args.add_tracking_uri(p)
    p = registry.add_parser("list", help="registered models: versions, aliases, metric, run")
    p.add_argument("name", nargs="?", default=None, help="one registered model (default: all)")
    args.add_tracking_uri(p)

    p = subparsers.add_parser("pull", help="download a registered encoder for offline use")
    p.add_argument("spec", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--out", required=True)
    args.add_tracking_uri(p)
    p.set_defaults(run=run)

    p = subparsers.add_parser("embed", help="one embedding per image row of a Parquet file")
    args.add_model(p)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    args.add_batch_size(p)
    args.add_tracking_uri(p)
    p.add_argument(
        "--text-column",
        default=None,
        help="embed this text column with the text tower (image-text models; L2-normalised)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="L2-normalise image embeddings (default: the backbone's raw features)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to embed on with an actor pool (default: this process, no Ray)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="embed with a Ray actor pool on an embedded local Ray (implied by --address); "
        "--output is then a directory of Parquet shards, resumable",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="actors (default: one per GPU, else one per --cpus-per-actor CPUs)",
    )
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument(
        "--shard-rows",
        type=int,
        default=4096,
        help="rows per output shard, the unit of resume (distributed only)",
    )
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed ``registry``/``pull``/``embed`` command line → its handler."""
    if a.command == "registry":
        handler = promote_command if a.registry_cmd == "promote" else list_command
    else:
        handler = pull_command if a.command == "pull" else embed_command
    return args.call(handler, a)


def resolve_store(tracking_uri: str | None, *, model: str | None = None) -> tuple[str, str]:
    """(the resolved tracking URI, the same without credentials for the printed result), the
    store checked reachable unless ``model`` is a local (pulled) folder that needs none."""
    from service.tracking.uri import check_tracking_server, redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(explicit=tracking_uri)
    if model is None or uses_registry(model):
        check_tracking_server(uri)
    return uri, redact_uri(uri)


def uses_registry(model: str) -> bool:
    """Whether ``--model`` names a registered version (``models:/…``, ``NAME@ALIAS``, …) rather
    than a local folder (a ``contrastive pull`` output), as ``model_directory`` decides."""
    local = Path(model[len("file://") :] if model.startswith("file://") else model)
    return model.startswith("models:/") or not local.is_dir()


def promote_command(
    name: str, version: str, alias: str, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Point ``alias`` (e.g. ``champion``) at version ``version`` of registered model ``name``."""
    from service.registry import promote

    uri, shown = resolve_store(tracking_uri)
    result = promote(name, version, alias, tracking_uri=uri)
    previous = result["previous"]
    was = "was not set before" if previous is None else f"previously v{previous}"
    print(f"{name}@{alias} -> v{result['version']} ({was})", file=sys.stderr, flush=True)
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "previous": result["previous"],
        "tracking_uri": shown,
    }


def list_command(name: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Print every version of ``name`` (or of all registered models) as a table on stdout:
    aliases, champion metric and value, run id, creation time, towers. Returns the rows."""
    from mlflow import MlflowClient

    from service.registry.listing import format_table, list_versions

    uri, shown = resolve_store(tracking_uri)
    rows = list_versions(MlflowClient(uri), name)
    print(format_table(rows) if rows else f"no registered models in {shown}", flush=True)
    return {"versions": [r.to_dict() for r in rows], "tracking_uri": shown}


def pull_command(spec: str, out: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Download the encoder ``spec`` (``NAME@ALIAS`` or ``NAME/VERSION``) into ``out``."""
    from service.registry.load import pull

    uri, shown = resolve_store(tracking_uri)
    path = pull(spec, out, tracking_uri=uri)
    return {"spec": spec, "out": str(path), "tracking_uri": shown}


def embed_command(
    model: str,
    input_path: str,
    output_path: str,
    batch_size: int = 256,
    tracking_uri: str | None = None,
    *,
    text_column: str | None = None,
    normalize: bool = False,
    address: str | None = None,
    distributed: bool = False,
    concurrency: int | None = None,
    cpus_per_actor: float = 1.0,
    shard_rows: int = 4096,
) -> dict[str, Any]:
    """One embedding per decodable image row of ``input_path`` (or per text of ``text_column``,
    with an image–text model), written to ``output_path`` with its input ``row_id``. With
    ``address`` or ``distributed`` (an embedded Ray, or the cluster of ``$RAY_ADDRESS`` under
    ``ray job submit``) on a Ray actor pool into a resumable directory of shards
    (``service.registry.embed_ray``)."""
    from service.registry.embed import embed_parquet
    from service.registry.errors import RegistryInputError

    uri, shown = resolve_store(tracking_uri, model=model)
    if address or distributed:
        if text_column:
            raise RegistryInputError(
                "--text-column embeds locally only: drop --address/--distributed"
            )
        from service.registry.embed_ray import plan_embedding, run_embedding
        from service.train.driver import connect_ray

        plan = plan_embedding(model, input_path, output_path, uri, normalize=normalize,
                              shard_rows=shard_rows)  # fmt: skip
        connect_ray(address)  # after the plan: a refused rerun starts no Ray
        summary = run_embedding(
            plan, batch_size, concurrency=concurrency, cpus_per_actor=cpus_per_actor
        )
        return {**summary, "tracking_uri": shown}
    summary = embed_parquet(
        model,
        input_path,
        output_path,
        batch_size=batch_size,
        tracking_uri=uri,
        text_column=text_column,
        normalize=normalize,
    )
    return {**summary, "tracking_uri": shown}
