"""Alias policy: which registered version is ``latest-trained`` and which is ``champion``.

Aliases, not stages. Every new version becomes ``latest-trained``. ``champion`` moves to it only
if its metric was measured on the same validation data as the champion's (the same
``validation.fingerprint`` tag, ``service.registry.validation``) and strictly beats it, or when
there is no champion yet. Never automatically: a version whose validation set is too small to
mean anything (fewer than 100 rows, or fewer than 10 per class on average), one whose
validation data is unknown, a NaN metric. A champion measured on other validation data, one
registered before versions recorded theirs, or one that never recorded the metric is kept:
comparing numbers from different data would silently replace it, so that call is left to a
person (``contrastive registry promote``). The decision is written to the run (tag
``registry.champion_decision`` and ``registry/champion_decision.json``) and to the version (tag
``champion_decision``), so "why is v3 the champion?" has an answer in MLflow.

    >>> decide_champion(0.5, 0.4)
    (True, '0.5 > 0.4: beats the champion')
    >>> decide_champion(0.5, 0.5)
    (False, '0.5 <= 0.5: does not beat the champion')
"""

from __future__ import annotations

import getpass
import json
import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from service.registry.errors import RegistryInputError
from service.registry.lookup import ModelRef, resolve_version
from service.registry.validation import ValidationData
from service.tracking.uri import resolve_tracking_uri

LATEST_ALIAS = "latest-trained"
CHAMPION_ALIAS = "champion"
DECISION_ARTIFACT = "registry/champion_decision.json"
METRIC_TAG_PREFIX = "metric."


def metric_tag(metric_name: str) -> str:
    """The model-version tag holding a version's value of ``metric_name`` (``metric.knn_top1``)."""
    return f"{METRIC_TAG_PREFIX}{metric_name}"


def decide_champion(
    new_value: float, champion_value: float | None, higher_is_better: bool = True
) -> tuple[bool, str]:
    """(promote?, reason). Promote only on a strict improvement or when there is no champion."""
    if math.isnan(new_value):
        return False, "new metric is NaN; never promoted automatically"
    if champion_value is None:
        return True, "no champion yet"
    if math.isnan(champion_value):
        return True, "current champion's metric is NaN"
    better = new_value > champion_value if higher_is_better else new_value < champion_value
    op = (">" if higher_is_better else "<") if better else ("<=" if higher_is_better else ">=")
    verdict = "beats" if better else "does not beat"
    return better, f"{new_value:.6g} {op} {champion_value:.6g}: {verdict} the champion"


@dataclass(frozen=True)
class ChampionDecision:
    """Whether a new version takes ``champion``, why, and against which previous champion."""

    champion: bool
    reason: str
    previous_champion: str | None = None
    previous_value: float | None = None
    by_hand: bool = False  # not compared: only a person can decide (``promote``)

    @property
    def verdict(self) -> str:
        return "promoted" if self.champion else "kept-previous"


def judge(
    metric_name: str,
    metric_value: float,
    champion: Any | None,
    higher_is_better: bool = True,
    *,
    validation: ValidationData | None,
) -> ChampionDecision:
    """The decision against ``champion`` (a ModelVersion: ``.version``, ``.tags``; or None) for a
    version whose metric was measured on ``validation`` (None: unknown)."""
    if validation is None:
        reason = "validation data unknown (unreadable at registration); not compared"
        return ChampionDecision(False, reason, _version(champion), by_hand=True)
    too_small = validation.too_small()
    if too_small:
        reason = f"{too_small}; never promoted automatically"
        return ChampionDecision(False, reason, _version(champion), by_hand=True)
    if champion is None:
        return ChampionDecision(*decide_champion(metric_value, None, higher_is_better))
    version, other = str(champion.version), _other_data(champion, validation)
    if other:
        return ChampionDecision(False, f"{other}; not compared", version, by_hand=True)
    raw = champion.tags.get(metric_tag(metric_name))
    if raw is None:
        reason = (
            f"champion v{version} has no {metric_name!r}; kept it (use promote() to decide by hand)"
        )
        return ChampionDecision(False, reason, version)
    previous = float(raw)
    promoted, reason = decide_champion(metric_value, previous, higher_is_better)
    return ChampionDecision(promoted, reason, version, previous)


def _version(champion: Any | None) -> str | None:
    """A version as text (a SQLite store hands back ints, a server strings)."""
    return None if champion is None else str(champion.version)


def _other_data(champion: Any, validation: ValidationData) -> str | None:
    """Why ``champion``'s metric is not comparable with one measured on ``validation``."""
    theirs = ValidationData.from_tags(champion.tags)
    if theirs is None:
        return (
            f"champion v{champion.version} has no validation fingerprint (registered before "
            "versions recorded their validation data): treated as measured on other "
            "validation data"
        )
    if theirs.fingerprint == validation.fingerprint:
        return None
    return (
        f"champion measured on other validation data (v{champion.version}: "
        f"{theirs.description}; this version: {validation.description})"
    )


def current_champion(client: Any, name: str) -> Any | None:
    """The ModelVersion ``champion`` points to, or None when the alias is not set."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except Exception as exc:
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" or "alias" in str(exc):
            return None
        raise


def apply_alias_policy(
    client: Any,
    name: str,
    version: str,
    *,
    run_id: str,
    metric_name: str,
    metric_value: float,
    higher_is_better: bool = True,
    validation: ValidationData | None,
) -> ChampionDecision:
    """Move ``latest-trained`` to ``version``, maybe ``champion`` too, and record the decision
    (``validation``: what the metric was measured on, None when unknown)."""
    champion = current_champion(client, name)
    decision = judge(metric_name, metric_value, champion, higher_is_better, validation=validation)
    if decision.by_hand:
        hint = f"promote by hand with `contrastive registry promote {name} {version} --alias "
        decision = replace(decision, reason=f"{decision.reason}; {hint}{CHAMPION_ALIAS}`")
    client.set_registered_model_alias(name, LATEST_ALIAS, version)
    if decision.champion:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    summary = f"{decision.verdict}: {decision.reason}"
    client.set_model_version_tag(name, version, "champion_decision", summary)
    client.set_tag(run_id, "registry.champion_decision", summary)
    record = {
        "model": name,
        "version": version,
        "metric_name": metric_name,
        "metric_value": metric_value,
        "higher_is_better": higher_is_better,
        "previous_champion": decision.previous_champion,
        "previous_champion_value": decision.previous_value,
        "validation": None if validation is None else validation.to_dict(),
        "previous_champion_validation": _recorded(champion),
        "champion": decision.champion,
        "reason": decision.reason,
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    client.log_text(run_id, json.dumps(record, indent=2) + "\n", DECISION_ARTIFACT)
    return decision


def _recorded(champion: Any | None) -> dict[str, Any] | None:
    recorded = None if champion is None else ValidationData.from_tags(champion.tags)
    return None if recorded is None else recorded.to_dict()


def promote(name: str, version: str | int, alias: str, tracking_uri: str | None = None) -> dict:
    """Point ``alias`` (e.g. ``champion``) at ``version`` by hand; records who and when.

    Without ``tracking_uri``, the store is the one pretraining used (``resolve_tracking_uri``).
    Returns ``{"alias", "version", "previous"}`` where ``previous`` is the version the alias
    pointed to before (or None).
    """
    from mlflow import MlflowClient

    client = MlflowClient(resolve_tracking_uri(explicit=tracking_uri))
    target = resolve_version(client, ModelRef(name, version=str(version)))
    if not alias or alias == "latest" or (alias[0] in "vV" and alias[1:].isdigit()):
        raise RegistryInputError(f"alias {alias!r} is reserved by MLflow (latest, v<N>) or empty")
    registered = client.get_registered_model(name)
    previous = registered.aliases.get(alias)  # an int from a SQLite store, a str over HTTP
    client.set_registered_model_alias(name, alias, target.version)
    stamp = f"{getpass.getuser()} at {datetime.now(UTC).isoformat(timespec='seconds')}"
    client.set_model_version_tag(name, target.version, f"promoted.{alias}", stamp)
    return {
        "alias": alias,
        "version": str(target.version),
        "previous": None if previous is None else str(previous),
    }
