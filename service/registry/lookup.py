"""Resolve ``NAME@ALIAS`` / ``NAME/VERSION`` / ``models:/...`` to a model version, with errors that
list what exists, and download a version's files (``model_directory``: a version or a pulled
directory as a local folder, what the image encoder and the image–text loaders both read).

    >>> parse_model_ref("models:/contrastive-encoder@champion")
    ModelRef(name='contrastive-encoder', version=None, alias='champion')
    >>> parse_model_ref("contrastive-encoder/3").uri
    'models:/contrastive-encoder/3'
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.registry.errors import RegistryLookupError
from service.tracking.uri import resolve_tracking_uri, use_tracking_uri

MODELS_SCHEME = "models:/"
_PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass(frozen=True)
class ModelRef:
    """A registered model plus exactly one of version / alias."""

    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        if self.alias is not None:
            return f"{MODELS_SCHEME}{self.name}@{self.alias}"
        return f"{MODELS_SCHEME}{self.name}/{self.version}"


def parse_model_ref(text: str) -> ModelRef:
    """``[models:/]NAME@ALIAS`` or ``[models:/]NAME/VERSION`` → ``ModelRef``."""
    body = text[len(MODELS_SCHEME) :] if text.startswith(MODELS_SCHEME) else text
    name, at, alias = body.rpartition("@")
    if at and name and alias:
        return ModelRef(name=name, alias=alias)
    name, slash, version = body.rpartition("/")
    if slash and name and version.isdigit():
        return ModelRef(name=name, version=version)
    raise RegistryLookupError(
        f"cannot parse model reference {text!r}: use NAME@ALIAS (e.g. contrastive-encoder@champion)"
        ", NAME/VERSION (e.g. contrastive-encoder/3) or the same with a models:/ prefix"
    )


def _is_missing(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _describe(client: Any, name: str) -> str:
    """'aliases: champion → v2, latest-trained → v3; versions: 1, 2, 3' for error messages."""
    registered = client.get_registered_model(name)
    aliases = ", ".join(f"{a} → v{v}" for a, v in sorted(registered.aliases.items())) or "none"
    versions = sorted(
        int(mv.version) for mv in client.search_model_versions(f"name = '{_quote(name)}'")
    )
    return f"aliases: {aliases}; versions: {', '.join(map(str, versions)) or 'none'}"


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def resolve_registered_model(client: Any, name: str) -> Any:
    """The ``RegisteredModel`` ``name``; ``RegistryLookupError`` listing the models otherwise."""
    try:
        return client.get_registered_model(name)
    except Exception as exc:
        if not _is_missing(exc):
            raise
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RegistryLookupError(
            f"no registered model named {name!r}; registered models: {names or 'none'}"
        ) from exc


def resolve_version(client: Any, ref: ModelRef) -> Any:
    """The ``ModelVersion`` for ``ref``; ``RegistryLookupError`` listing what exists otherwise."""
    resolve_registered_model(client, ref.name)
    try:
        if ref.alias is not None:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except Exception as exc:
        if not _is_missing(exc) and "alias" not in str(exc).lower():
            raise
        what = f"alias {ref.alias!r}" if ref.alias is not None else f"version {ref.version!r}"
        raise RegistryLookupError(
            f"registered model {ref.name!r} has no {what}; {_describe(client, ref.name)}"
        ) from exc


def download_version(tracking_uri: str, name: str, version: str, dst: str | Path) -> Path:
    """Download model version files (MLmodel, pickled model, weights-only copy) into ``dst``."""
    import mlflow

    Path(dst).mkdir(parents=True, exist_ok=True)
    saved = os.environ.get(_PROGRESS_ENV)
    os.environ[_PROGRESS_ENV] = "false"  # tqdm bars per file would flood job logs
    try:
        with use_tracking_uri(tracking_uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{MODELS_SCHEME}{name}/{version}", dst_path=str(dst)
            )
    finally:
        if saved is None:
            os.environ.pop(_PROGRESS_ENV, None)
        else:
            os.environ[_PROGRESS_ENV] = saved
    return Path(local)


@contextmanager
def model_directory(model_uri: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """A local directory holding the files of ``model_uri``: a pulled (or downloaded MLflow
    model) directory as is, or a registered version downloaded into a temporary directory that
    is removed on exit. Without ``tracking_uri``, the store pretraining used."""
    local = Path(model_uri[len("file://") :] if model_uri.startswith("file://") else model_uri)
    if not model_uri.startswith(MODELS_SCHEME) and local.is_dir():
        yield local
        return
    from mlflow import MlflowClient

    ref = parse_model_ref(model_uri)
    uri = resolve_tracking_uri(explicit=tracking_uri)
    version = resolve_version(MlflowClient(uri), ref)
    with tempfile.TemporaryDirectory(prefix="encoder-") as tmp:
        yield download_version(uri, ref.name, str(version.version), tmp)
