"""Log the trained backbone into its run, register it, and apply the alias rules.

Stored formats (both inside the one MLflow model version, so ``models:/NAME/V`` carries both):

* **MLflow ``pytorch`` flavour, pickled** (``serialization_format="pickle"``, cloudpickle):
  ``mlflow.pytorch.load_model`` gives back the *same* ``nn.Module`` class with its attributes
  (``out_dim``), any batch size and pyfunc serving. We deliberately do not use MLflow 3's default
  ``pt2`` (``torch.export``) format: it reloads a traced ``GraphModule`` specialised to the
  example's shapes (a size-1 batch dimension becomes static), loses module attributes and eval/
  train semantics, and ties the artifact to ``torch.export`` version compatibility.
  **Risk:** unpickling runs code from the artifact. Only load pickled models from a registry
  you trust; the class must be importable (``contrastive-service`` installed).
* **Weights-only copy** (``extra_files/encoder.safetensors`` + ``extra_files/encoder.json``):
  tensors in safetensors (no code execution on load) plus the architecture config, input size,
  normalisation and embedding dim. ``service.registry.load.load_encoder`` prefers this path
  whenever the architecture can be rebuilt, so the default load never unpickles.

Aliases, not stages: every new version gets ``latest-trained``; ``champion`` moves to it only if
its metric strictly beats the current champion's (or there is none). The comparison and decision
are written to the run (tags ``registry.*`` and ``registry/champion_decision.json``) and to the
version (tag ``champion_decision``). ``promote`` moves any alias by hand.

    >>> result = register_encoder(  # doctest: +SKIP
    ...     backbone, tracking_uri=uri, run_id=run_id, name="contrastive-encoder",
    ...     tags={"dataset": "cifar10"}, input_example=np.zeros((2, 3, 32, 32), np.float32),
    ...     metric_name="knn_top1", metric_value=0.41)
    >>> result["model_uri"], result["champion"]  # doctest: +SKIP
    ('models:/contrastive-encoder/1', True)
"""

from __future__ import annotations

import copy
import getpass
import json
import logging
import math
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from service.config import Config, ModelConfig
from service.registry.errors import EncoderSpecError, RegistryError
from service.registry.lookup import ModelRef, resolve_version
from service.registry.spec import EncoderSpec, build_backbone, save_weights
from service.tracking.uri import use_tracking_uri

log = logging.getLogger(__name__)

LATEST_ALIAS = "latest-trained"
CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT_NAME = "encoder"
DECISION_ARTIFACT = "registry/champion_decision.json"
METRIC_TAG_PREFIX = "metric."


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) / ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


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


# ---------------------------------------------------------------------- encoder metadata


def _parse_param(text: str) -> Any:
    if text == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _floats(value: Any) -> list[float] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
    return [float(v) for v in value]


def _model_config_from_params(params: dict[str, str]) -> dict[str, Any] | None:
    fields = {f for f in ModelConfig.__dataclass_fields__}
    found = {
        key[len("model.") :]: _parse_param(value)
        for key, value in params.items()
        if key.startswith("model.") and key[len("model.") :] in fields
    }
    return found or None


def build_spec(
    encoder: nn.Module,
    example: torch.Tensor,
    embedding_dim: int,
    *,
    tags: dict[str, Any],
    run_params: dict[str, str],
    config: Config | None,
) -> EncoderSpec:
    """Input size / normalisation / architecture from ``config`` > ``tags`` > the run's params."""
    if config is not None:
        image_size, mean, std = config.data.image_size, config.augment.mean, config.augment.std
        model_config: dict[str, Any] | None = dict(vars(config.model))
        arch = config.model.arch
    else:
        image_size = tags.get("input_size") or _parse_param(run_params.get("data.image_size", ""))
        mean = _floats(tags.get("normalize_mean")) or _floats(
            _parse_param(run_params.get("augment.mean", ""))
        )
        std = _floats(tags.get("normalize_std")) or _floats(
            _parse_param(run_params.get("augment.std", ""))
        )
        model_config = _model_config_from_params(run_params)
        arch = tags.get("arch") or (model_config or {}).get("arch")
    example_size = int(example.shape[-1])
    image_size = int(image_size) if image_size not in (None, "") else example_size
    if mean is None or std is None:
        raise EncoderSpecError(
            "cannot tell the encoder's input normalisation: pass config=..., or tags "
            "normalize_mean/normalize_std (e.g. '0.4914,0.4822,0.4465'), or register into a run "
            "created by start_pretrain_run (params augment.mean/augment.std)"
        )
    if image_size != example_size or tuple(example.shape[1:]) != (3, image_size, image_size):
        raise EncoderSpecError(
            f"input_example shape {tuple(example.shape)} does not match the recorded input size "
            f"[b, 3, {image_size}, {image_size}]"
        )
    return EncoderSpec(
        image_size=image_size,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        embedding_dim=embedding_dim,
        arch=arch,
        model_config=model_config,
        class_path=f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        torch_version=str(torch.__version__),
    )


def _check_rebuild(spec: EncoderSpec, encoder: nn.Module, example: torch.Tensor) -> EncoderSpec:
    """Keep ``model_config`` only if it really rebuilds this encoder (same outputs)."""
    if spec.model_config is None:
        return spec
    try:
        rebuilt = build_backbone(spec.model_config)
        rebuilt.load_state_dict(encoder.state_dict(), strict=True)
        with torch.no_grad():
            same = torch.allclose(rebuilt.eval()(example), encoder(example), atol=1e-5)
        if not same:
            raise EncoderSpecError("rebuilt backbone gives different outputs")
    except Exception as exc:  # noqa: BLE001 - any failure means "not rebuildable", not fatal
        log.warning(
            "encoder cannot be rebuilt from model_config %s (%s); only the pickled model will be "
            "loadable",
            spec.model_config,
            str(exc)[:200],
        )
        spec.model_config = None
    return spec


def _pip_requirements() -> list[str]:
    """Pinned explicitly: MLflow's inference would load the model in a subprocess (slow)."""
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    for dist in ("mlflow", "cloudpickle", "safetensors", "numpy"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return reqs


# ---------------------------------------------------------------------- registration


def _current_champion(client: Any, name: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except Exception as exc:
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" or "alias" in str(exc):
            return None
        raise


def register_encoder(
    backbone: nn.Module,
    *,
    tracking_uri: str,
    run_id: str,
    name: str,
    tags: dict[str, Any],
    input_example: np.ndarray,
    metric_name: str,
    metric_value: float,
    higher_is_better: bool = True,
    config: Config | None = None,
) -> dict[str, Any]:
    """Log ``backbone`` (not the projection head) into run ``run_id``, register it as ``name``,
    set ``latest-trained`` and maybe ``champion``; returns ``model_uri``, ``version``,
    ``champion`` (bool), ``previous_champion`` (version or None), ``decision`` (text).

    ``input_example``: float32 ``[b, 3, H, W]`` (already normalised). Input size, normalisation
    and architecture come from ``config`` if given, else ``tags`` (``input_size``,
    ``normalize_mean``, ``normalize_std``, ``arch``), else the run's params.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    if not name:
        raise RegistryError(
            "registered model name must be non-empty (mlflow.registered_model_name)"
        )
    metric_value = float(metric_value)
    example_np = np.ascontiguousarray(input_example, dtype=np.float32)
    if example_np.ndim != 4:
        raise EncoderSpecError(f"input_example must be [b, 3, H, W], got shape {example_np.shape}")
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)

    encoder = copy.deepcopy(unwrap(backbone)).cpu().float().eval()
    example = torch.from_numpy(example_np)
    with torch.no_grad():
        output = encoder(example)
    if output.ndim != 2:
        raise EncoderSpecError(f"backbone must return [b, dim] features, got {tuple(output.shape)}")
    spec = build_spec(
        encoder,
        example,
        int(output.shape[1]),
        tags=tags,
        run_params=run.data.params,
        config=config,
    )
    spec = _check_rebuild(spec, encoder, example)

    version_tags = {
        "run_id": run_id,
        "embedding_dim": str(spec.embedding_dim),
        "input_size": str(spec.image_size),
        "normalize_mean": ",".join(map(str, spec.mean)),
        "normalize_std": ",".join(map(str, spec.std)),
        "arch": str(spec.arch),
        "champion_metric": metric_name,
        f"{METRIC_TAG_PREFIX}{metric_name}": repr(metric_value),
        "serialization": "pickle+safetensors",
        "weights_rebuildable": str(spec.rebuildable).lower(),
        **{key: str(value) for key, value in tags.items()},
    }
    with tempfile.TemporaryDirectory(prefix="encoder-weights-") as tmp:
        extra = [str(save_weights(encoder, tmp)), str(spec.save(tmp))]
        with use_tracking_uri(tracking_uri):
            info = mlflow.pytorch.log_model(
                encoder,
                name=MODEL_ARTIFACT_NAME,
                registered_model_name=name,
                input_example=example_np,
                signature=infer_signature(example_np, output.numpy()),
                serialization_format="pickle",
                extra_files=extra,
                pip_requirements=_pip_requirements(),
                metadata={"encoder": spec.to_dict()},
                tags=version_tags,
                run_id=run_id,
            )
    version = str(info.registered_model_version)
    model_uri = ModelRef(name, version=version).uri

    previous = _current_champion(client, name)
    previous_value: float | None = None
    reason_extra = ""
    if previous is not None:
        raw = previous.tags.get(f"{METRIC_TAG_PREFIX}{metric_name}")
        previous_value = float(raw) if raw is not None else None
        if raw is None:
            reason_extra = f"champion v{previous.version} has no {metric_name!r}; "
    if previous is not None and previous_value is None:
        promote_it, reason = False, reason_extra + "kept it (use promote() to decide by hand)"
    else:
        promote_it, reason = decide_champion(metric_value, previous_value, higher_is_better)

    client.set_registered_model_alias(name, LATEST_ALIAS, version)
    if promote_it:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    decision = {
        "model": name,
        "version": version,
        "metric_name": metric_name,
        "metric_value": metric_value,
        "higher_is_better": higher_is_better,
        "previous_champion": previous.version if previous is not None else None,
        "previous_champion_value": previous_value,
        "champion": promote_it,
        "reason": reason,
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    verdict = "promoted" if promote_it else "kept-previous"
    client.set_model_version_tag(name, version, "champion_decision", f"{verdict}: {reason}")
    client.update_model_version(
        name, version, description=f"{metric_name}={metric_value:.4g} from run {run_id}"
    )
    client.set_tag(run_id, "registry.model_uri", model_uri)
    client.set_tag(run_id, "registry.champion_decision", f"{verdict}: {reason}")
    client.log_text(run_id, json.dumps(decision, indent=2) + "\n", DECISION_ARTIFACT)
    log.info("registered %s (%s)", model_uri, decision["reason"])
    return {
        "model_uri": model_uri,
        "version": version,
        "champion": promote_it,
        "previous_champion": decision["previous_champion"],
        "decision": reason,
        "metric_name": metric_name,
        "metric_value": metric_value,
    }


def promote(name: str, version: str | int, alias: str, tracking_uri: str | None = None) -> dict:
    """Point ``alias`` (e.g. ``champion``) at ``version`` by hand; records who and when.

    Returns ``{"alias", "version", "previous"}`` where ``previous`` is the version the alias
    pointed to before (or None).
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    target = resolve_version(client, ModelRef(name, version=str(version)))
    if not alias or alias == "latest" or (alias[0] in "vV" and alias[1:].isdigit()):
        raise RegistryError(f"alias {alias!r} is reserved by MLflow (latest, v<N>) or empty")
    registered = client.get_registered_model(name)
    previous = registered.aliases.get(alias)
    client.set_registered_model_alias(name, alias, target.version)
    stamp = f"{getpass.getuser()} at {datetime.now(UTC).isoformat(timespec='seconds')}"
    client.set_model_version_tag(name, target.version, f"promoted.{alias}", stamp)
    return {"alias": alias, "version": str(target.version), "previous": previous}
