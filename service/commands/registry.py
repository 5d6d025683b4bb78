"""``contrastive registry promote``, ``contrastive pull`` and ``contrastive embed``: the MLflow
model registry from the command line.

Without ``--tracking-uri`` every command uses the store pretraining used: the one
``service.tracking.uri.resolve_tracking_uri`` picks ($MLFLOW_TRACKING_URI, else ``mlruns.db`` in
the current directory), never MLflow's own default. Each result names the store it used.
"""

from __future__ import annotations

from typing import Any


def _store(tracking_uri: str | None) -> tuple[str, str]:
    """(the resolved tracking URI, the same without credentials for the printed result)."""
    from service.tracking.uri import redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(explicit=tracking_uri)
    return uri, redact_uri(uri)


def promote_command(
    name: str, version: str, alias: str, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Point ``alias`` (e.g. ``champion``) at version ``version`` of registered model ``name``."""
    from service.registry import promote

    uri, shown = _store(tracking_uri)
    result = promote(name, version, alias, tracking_uri=uri)
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "previous": result["previous"],
        "tracking_uri": shown,
    }


def pull_command(spec: str, out: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Download the encoder ``spec`` (``NAME@ALIAS`` or ``NAME/VERSION``) into ``out``."""
    from service.registry.load import pull

    uri, shown = _store(tracking_uri)
    path = pull(spec, out, tracking_uri=uri)
    return {"spec": spec, "out": str(path), "tracking_uri": shown}


def embed_command(
    model: str,
    input_path: str,
    output_path: str,
    batch_size: int = 256,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """One embedding per decodable image row of ``input_path``, written to ``output_path``."""
    from service.registry.embed import embed_parquet

    uri, shown = _store(tracking_uri)
    summary = embed_parquet(model, input_path, output_path, batch_size=batch_size, tracking_uri=uri)
    return {**summary, "tracking_uri": shown}
