"""Where MLflow data goes (tracking URI resolution) and whether it can get there (reachability).

Resolution order: an explicit URI (a command's ``--tracking-uri``), else ``mlflow.tracking_uri``
in the config, else ``$MLFLOW_TRACKING_URI``, else an embedded SQLite store
``sqlite:///<cwd>/mlruns.db`` (the model registry needs a database backend; the plain file store
cannot hold registered models). Every command and library entry point resolves through
:func:`resolve_tracking_uri` and never hands ``None`` to MLflow, whose own default
(``sqlite:///mlflow.db`` in MLflow 3) is a different store from the one pretraining wrote.

``check_tracking_server`` is called by the driver *before* any training starts, so a typo in the
URI costs seconds, not a wasted run.

    >>> from service.config import MlflowConfig
    >>> resolve_tracking_uri(MlflowConfig(tracking_uri="http://127.0.0.1:5000"))
    'http://127.0.0.1:5000'
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from service.config import MlflowConfig

DEFAULT_DB_NAME = "mlruns.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"

# MLflow reads these at call time; ``fast_fail_http`` lowers them around our own calls so that an
# unreachable server fails in seconds instead of MLflow's default ~7 retries with backoff (minutes).
_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"

_HOW_TO_FIX = (
    "Start the server (deploy/mlflow/start-server.sh), point mlflow.tracking_uri / "
    "$MLFLOW_TRACKING_URI at a running one, or unset both to use the embedded local SQLite store."
)


class TrackingUnavailableError(ConnectionError, ValueError):
    """The configured MLflow tracking server cannot be reached; the message names the URI.

    Raised by the reachability check every command runs before any work, so nothing was done:
    the URI the user configured (flag, config or ``$MLFLOW_TRACKING_URI``) is the input to fix
    or start the server for; ``service.cli`` exits 2 (``bad_input``)."""

    bad_input = True


def resolve_tracking_uri(cfg: MlflowConfig | None = None, *, explicit: str | None = None) -> str:
    """``explicit``, else the config value, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<cwd>/mlruns.db``: the one place that decides which store a command uses."""
    if explicit:
        return str(explicit)
    configured = cfg.tracking_uri if cfg is not None else None
    if configured:
        return str(configured)
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        return from_env
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB_NAME).resolve()}"


def is_http_uri(uri: str) -> bool:
    return urlsplit(uri).scheme in {"http", "https"}


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store: ``file://<db dir>/mlartifacts`` (next to the database), else None.

    A SQLite-backed experiment created without an explicit location would put artifacts under
    ``./mlruns`` relative to whatever the cwd happens to be; pinning it next to the database keeps
    runs and their artifacts together. Servers choose their own artifact root (return None).
    """
    parts = urlsplit(tracking_uri)
    if parts.scheme != "sqlite":
        return None
    db_path = tracking_uri[len("sqlite:///") :]
    if not db_path or db_path == ":memory:":
        return None
    return (Path(db_path).resolve().parent / DEFAULT_ARTIFACT_DIR).as_uri()


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Raise ``TrackingUnavailableError`` quickly if an http(s) tracking server is unreachable.

    One plain HTTP GET of ``/health`` (no MLflow client, hence no MLflow retry loop), bounded by
    ``timeout_s``. Local stores (sqlite://, file paths) only get their directory checked.
    """
    if not is_http_uri(uri):
        _check_local_store(uri)
        return
    import requests

    health = uri.rstrip("/") + "/health"
    try:
        response = requests.get(health, timeout=timeout_s)
    except requests.RequestException as exc:
        raise TrackingUnavailableError(
            f"MLflow tracking server {redact_uri(uri)} is unreachable ({type(exc).__name__}: "
            f"{_short(exc)}). {_HOW_TO_FIX}"
        ) from exc
    if response.status_code == 404:
        # Proxies / older servers without /health: fall back to a cheap API call.
        api = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
        try:
            response = requests.post(api, json={"max_results": 1}, timeout=timeout_s)
        except requests.RequestException as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking server {redact_uri(uri)} is unreachable: {_short(exc)}. "
                f"{_HOW_TO_FIX}"
            ) from exc
    if response.status_code >= 400:
        raise TrackingUnavailableError(
            f"MLflow tracking server {redact_uri(uri)} answered HTTP {response.status_code} "
            f"({response.text[:200]!r}); is this an MLflow server and are credentials set "
            f"(MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)? {_HOW_TO_FIX}"
        )


def _check_local_store(uri: str) -> None:
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:":
            parent = Path(path).resolve().parent
            if not parent.is_dir():
                raise TrackingUnavailableError(
                    f"tracking URI {uri!r}: directory {parent} does not exist; create it or "
                    "choose another mlflow.tracking_uri"
                )
        return
    if parts.scheme in {"", "file"}:
        path = Path(parts.path if parts.scheme == "file" else uri).resolve()
        probe = path if path.exists() else path.parent
        if not os.access(probe, os.W_OK):
            raise TrackingUnavailableError(
                f"tracking URI {uri!r}: {probe} is not writable; choose another mlflow.tracking_uri"
            )


@contextlib.contextmanager
def fast_fail_http(timeout_s: float = 5.0, max_retries: int = 0) -> Iterator[None]:
    """Within the block, MLflow HTTP calls fail after one ``timeout_s`` attempt, no retry loop.

    For callers that own their retry policy (``MetricLogger``). It sets process environment
    variables for the duration of the block, so other threads' MLflow calls see it too; keep the
    block short.
    """
    saved = {name: os.environ.get(name) for name in (_RETRIES_ENV, _TIMEOUT_ENV)}
    os.environ[_RETRIES_ENV] = str(int(max_retries))
    os.environ[_TIMEOUT_ENV] = str(max(1, int(round(timeout_s))))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Temporarily point MLflow's *global* (fluent) tracking and registry URIs at ``uri``.

    Only needed around the few MLflow APIs that take no URI argument (``mlflow.pytorch.log_model``
    with registration, model downloads); everything else uses an explicit ``MlflowClient(uri)``.
    """
    import mlflow

    env_saved = {n: os.environ.get(n) for n in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_saved = tracking_utils._tracking_uri
    registry_saved = registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking_saved)
        registry_utils._registry_uri = registry_saved
        for name, value in env_saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def redact_uri(uri: str) -> str:
    """The URI with any ``user:password@`` removed, for error messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return parts._replace(netloc=host).geturl()


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."
