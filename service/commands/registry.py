"""``contrastive registry promote``, ``contrastive pull`` and ``contrastive embed``: the MLflow
model registry from the command line."""

from __future__ import annotations

from typing import Any


def promote_command(
    name: str, version: str, alias: str, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Point ``alias`` (e.g. ``champion``) at version ``version`` of registered model ``name``."""
    from service.registry import promote

    promote(name, version, alias, tracking_uri=tracking_uri)
    return {"name": name, "version": version, "alias": alias}


def pull_command(spec: str, out: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Download the encoder ``spec`` (``NAME@ALIAS`` or ``NAME/VERSION``) into ``out``."""
    from service.registry.load import pull

    path = pull(spec, out, tracking_uri=tracking_uri)
    return {"spec": spec, "out": str(path)}


def embed_command(
    model: str,
    input_path: str,
    output_path: str,
    batch_size: int = 256,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """One embedding per decodable image row of ``input_path``, written to ``output_path``."""
    from service.registry.embed import embed_parquet

    return embed_parquet(
        model, input_path, output_path, batch_size=batch_size, tracking_uri=tracking_uri
    )
