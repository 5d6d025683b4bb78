"""What is registered: every version of a model (or of all models) with its aliases and key tags,
for ``contrastive registry list``.

    >>> row = VersionRow("enc", "2", ["champion"], "knn_top1", "0.41234", "0123456789abcdef",
    ...                  "2026-01-02T03:04:05+00:00", "image")
    >>> print(format_table([row]))
    model  version  aliases   metric    value   run_id        created              towers
    enc    2        champion  knn_top1  0.4123  0123456789ab  2026-01-02 03:04:05  image
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.registry.aliases import metric_tag
from service.registry.lookup import resolve_registered_model

TOWERS_TAG = "towers"  # "image" or "image+text" (set by register_encoder)


@dataclass(frozen=True)
class VersionRow:
    """One registered version as ``registry list`` shows it: aliases and the key tags."""

    name: str
    version: str
    aliases: list[str]
    metric_name: str
    metric_value: str
    run_id: str
    created: str  # ISO 8601, UTC, seconds
    towers: str

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _all_registered_models(client: Any) -> list[Any]:
    models, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        models += list(page)
        token = page.token
        if not token:
            return sorted(models, key=lambda m: m.name)


def _row(model_name: str, mv: Any, aliases: list[str]) -> VersionRow:
    tags = dict(mv.tags)
    metric = tags.get("champion_metric", "")
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC)
    return VersionRow(
        name=model_name,
        version=str(mv.version),
        aliases=aliases,
        metric_name=metric,
        metric_value=tags.get(metric_tag(metric), "") if metric else "",
        run_id=mv.run_id or "",
        created=created.isoformat(timespec="seconds"),
        towers=tags.get(TOWERS_TAG, "image"),
    )


def list_versions(client: Any, name: str | None = None) -> list[VersionRow]:
    """Every version of ``name`` (or of every registered model), by model, newest first.

    An unknown ``name`` raises ``RegistryLookupError`` listing the registered models."""
    models = (
        [resolve_registered_model(client, name)]
        if name is not None
        else _all_registered_models(client)
    )
    rows = []
    for model in models:
        by_version: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():  # an int in SQLite, a str over HTTP
            by_version.setdefault(str(version), []).append(alias)
        quoted = model.name.replace("'", "\\'")
        versions = client.search_model_versions(f"name = '{quoted}'")
        for mv in sorted(versions, key=lambda v: -int(v.version)):
            rows.append(_row(model.name, mv, sorted(by_version.get(str(mv.version), []))))
    return rows


_HEADERS = ("model", "version", "aliases", "metric", "value", "run_id", "created", "towers")


def format_table(rows: list[VersionRow]) -> str:
    """A plain-text table, one line per version (run ids shortened to 12 characters)."""
    cells = [
        (
            r.name,
            r.version,
            ",".join(r.aliases) or "-",
            r.metric_name or "-",
            _short_value(r.metric_value),
            r.run_id[:12] or "-",
            r.created.replace("T", " ").removesuffix("+00:00"),
            r.towers,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HEADERS)]
    lines = [_HEADERS, *cells]
    text = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)
    return "\n".join(line.rstrip() for line in text)


def _short_value(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value or "-"
