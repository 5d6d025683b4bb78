"""Driver-side MLflow run lifecycle: create the pretraining run, log the resolved config, end it.

Everything goes through an explicit ``MlflowClient(tracking_uri)`` (no fluent global run), so the
driver, Ray workers and Tune trials can each talk to the right run without shared state.

    >>> from service.config import Config
    >>> run_id = start_pretrain_run(Config(), "sqlite:////tmp/doc-mlruns.db")  # doctest: +SKIP
    >>> end_run(run_id, "FINISHED", tracking_uri="sqlite:////tmp/doc-mlruns.db")  # doctest: +SKIP

Secrets: params and the config artifact pass through ``redact_secrets`` / ``redact_tree``, which
mask any value equal to (or, for long secrets, containing) the value of an environment variable
whose *name* looks like a secret (PASSWORD, SECRET, TOKEN, KEY, CREDENTIAL, ...), and strip
``user:password@`` from URLs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import yaml

from service.config import REPO_ROOT, Config
from service.tracking.uri import default_artifact_location, redact_uri, resolve_tracking_uri

REDACTED = "***REDACTED***"
CONFIG_ARTIFACT = "config/resolved_config.yaml"

_SECRET_NAME_PARTS = (
    "PASSWORD",
    "PASSWD",
    "PASSPHRASE",
    "SECRET",
    "TOKEN",
    "KEY",
    "CREDENTIAL",
    "AUTH",
    "PRIVATE",
    "SIGNATURE",
    "COOKIE",
    "SESSION",
)
# Values too common to be a secret; masking every "true" param would only confuse readers.
_NOT_SECRETS = {"", "true", "false", "none", "null", "yes", "no"}
_MIN_SECRET_LEN = 4  # exact-match masking from 4 characters
_MIN_SUBSTRING_SECRET_LEN = 8  # "value contains the secret" masking only for longer secrets

# MLflow limits (mlflow.utils.validation): 6000 chars per param value, 100 params per log_batch.
MAX_PARAM_VALUE_LEN = 6000
PARAMS_PER_BATCH = 100

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")


class RunStatusError(ValueError):
    """An unknown MLflow run status was passed to ``end_run``."""


def looks_secret(env_name: str) -> bool:
    """True for environment variable names like ``AWS_SECRET_ACCESS_KEY`` or ``HF_TOKEN``."""
    upper = env_name.upper()
    return any(part in upper for part in _SECRET_NAME_PARTS)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first (for substring masking)."""
    env = os.environ if environ is None else environ
    found = {
        value
        for name, value in env.items()
        if looks_secret(name)
        and len(value) >= _MIN_SECRET_LEN
        and value.strip().lower() not in _NOT_SECRETS
    }
    return sorted(found, key=len, reverse=True)


def _redact_value(value: Any, secrets: list[str]) -> Any:
    if value is None or isinstance(value, bool):
        return value
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if text in secrets or any(len(s) >= _MIN_SUBSTRING_SECRET_LEN and s in text for s in secrets):
        return REDACTED
    if isinstance(value, str) and "://" in value and "@" in value:
        return redact_uri(value)
    return value


def redact_secrets(
    params: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Copy of ``params`` with secret-looking values masked as ``***REDACTED***``.

    >>> redact_secrets({"a": "hunter2!", "b": 1}, environ={"DB_PASSWORD": "hunter2!"})
    {'a': '***REDACTED***', 'b': 1}
    """
    secrets = secret_values(environ)
    return {key: _redact_value(value, secrets) for key, value in params.items()}


def redact_tree(tree: Any, environ: Mapping[str, str] | None = None) -> Any:
    """``redact_secrets`` for nested dicts/lists (the config artifact)."""
    secrets = secret_values(environ)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return _redact_value(node, secrets)

    return walk(tree)


def stringify_params(params: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params are strings (<= 6000 chars): lists/dicts become JSON, long ones truncated."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, str):
            text = value
        elif isinstance(value, dict | list | tuple):
            text = json.dumps(value, sort_keys=True, default=str)
        else:
            text = str(value)
        if len(text) > MAX_PARAM_VALUE_LEN:
            marker = f"...[truncated; full value in {CONFIG_ARTIFACT}]"
            text = text[: MAX_PARAM_VALUE_LEN - len(marker)] + marker
        out[key] = text
    return out


def git_commit(cwd: str | os.PathLike[str] = REPO_ROOT) -> tuple[str, bool] | None:
    """(commit sha, dirty) of the checkout containing ``cwd``, or None outside git / no commits."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip(), bool(dirty.stdout.strip())


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not-installed"


def run_tags(config: Config) -> dict[str, str]:
    """Reproducibility tags: code version, library versions, the parallel layout, the method."""
    tags = {
        "method": config.loss.name,
        "arch": config.model.arch,
        "world_size": str(config.train.num_workers),
        "global_batch_size": str(config.train.global_batch_size),
        "per_worker_batch_size": str(config.per_worker_batch_size),
        "version.torch": _version("torch"),
        "version.ray": _version("ray"),
        "version.mlflow": _version("mlflow"),
        "version.python": platform.python_version(),
        "version.contrastive_service": _version("contrastive-service"),
    }
    commit = git_commit()
    if commit is not None:
        tags["mlflow.source.git.commit"] = commit[0]
        tags["git.dirty"] = str(commit[1]).lower()
    return tags


def get_or_create_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """Experiment id for ``name``, creating it (with a pinned local artifact dir for SQLite)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted; restore it in the UI / "
                f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` "
                "or choose another mlflow.experiment"
            )
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=default_artifact_location(tracking_uri)
        )
    except Exception:
        # Another driver (e.g. a parallel Tune trial) created it between our get and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_pretrain_run(
    config: Config,
    tracking_uri: str,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    nested: bool = False,
) -> str:
    """Create the run in ``config.mlflow.experiment``, log params/tags/config; return its id.

    ``parent_run_id`` (or ``nested=True`` with an active fluent run, e.g. inside Ray Tune's
    MLflow integration) makes it a child run in the MLflow UI.
    """
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    if nested and parent_run_id is None:
        import mlflow

        active = mlflow.active_run()
        if active is None:
            raise ValueError("nested=True needs parent_run_id or an active MLflow run; got neither")
        parent_run_id = active.info.run_id

    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, config.mlflow.experiment, tracking_uri)
    tags = run_tags(config)
    if parent_run_id is not None:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(
        experiment_id,
        run_name=_redact_value(run_name or config.train.run_name, secret_values()),
        tags=redact_secrets(tags),
    )
    run_id = run.info.run_id
    try:
        log_params(client, run_id, config.flat())
        resolved = yaml.safe_dump(redact_tree(config.to_dict()), sort_keys=False)
        client.log_text(run_id, resolved, CONFIG_ARTIFACT)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Redact, stringify and batch-log params (MLflow takes at most 100 per request)."""
    from mlflow.entities import Param

    items = sorted(stringify_params(redact_secrets(params)).items())
    for start in range(0, len(items), PARAMS_PER_BATCH):
        chunk = items[start : start + PARAMS_PER_BATCH]
        client.log_batch(run_id, params=[Param(key, value) for key, value in chunk])


def end_run(run_id: str, status: str = "FINISHED", *, tracking_uri: str | None = None) -> None:
    """Mark the run terminated with ``status`` (FINISHED | FAILED | KILLED); without
    ``tracking_uri``, in the store :func:`resolve_tracking_uri` picks."""
    from mlflow import MlflowClient

    status = status.upper()
    if status not in RUN_STATUSES:
        raise RunStatusError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
    MlflowClient(resolve_tracking_uri(explicit=tracking_uri)).set_terminated(run_id, status=status)
