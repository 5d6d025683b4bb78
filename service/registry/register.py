"""Log the trained backbone into its run and register it; the alias rules live in ``aliases``.

Stored formats (all inside the one MLflow model version, so ``models:/NAME/V`` carries them):

* **Portable pyfunc** (the ``python_function`` flavour, ``service.registry.pyfunc``):
  models-from-code + ``code/contrastive_pyfunc`` + the safetensors weights below;
  ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` work where only MLflow, torch and
  torchvision are installed (docs/registry.md "Load without this project").
* **MLflow ``pytorch`` flavour, pickled** (``serialization_format="pickle"``, cloudpickle):
  ``mlflow.pytorch.load_model`` gives back the *same* ``nn.Module`` class with its attributes
  (``out_dim``). We deliberately do not use MLflow 3's default ``pt2`` (``torch.export``) format:
  it reloads a traced ``GraphModule`` specialised to the example's shapes (a size-1 batch
  dimension becomes static), loses module attributes and eval/train semantics, and ties the
  artifact to ``torch.export`` version compatibility.
  **Risk:** unpickling runs code from the artifact. Only load pickled models from a registry
  you trust; the class must be importable (``contrastive-service`` installed).
* **Weights-only copy** (``artifacts/encoder.safetensors`` + ``artifacts/encoder.json``;
  ``extra_files/`` in versions from before the pyfunc):
  tensors in safetensors (no code execution on load) plus the architecture config, input size,
  normalisation and embedding dim, all from the training ``Config``.
  ``service.registry.load.load_encoder`` prefers this path whenever the architecture can be
  rebuilt, so the default load never unpickles.

An encoder ``service.models`` cannot rebuild gets the pickled flavour and the weights only.

    >>> result = register_encoder(  # doctest: +SKIP
    ...     backbone, config, tracking_uri=uri, run_id=run_id, knn=0.41,
    ...     metric_name="knn_top1", metric_value=0.41)
    >>> result["model_uri"], result["champion"]  # doctest: +SKIP
    ('models:/contrastive-encoder/1', True)
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.config import Config
from service.console import MLFLOW_PICKLE_WARNING, dropping_log_messages
from service.models import unwrap
from service.registry.aliases import apply_alias_policy, metric_tag

# Old import path of promote (service/commands/registry.py); use service.registry.promote.
from service.registry.errors import EncoderSpecError, RegistryError
from service.registry.listing import TOWERS_TAG
from service.registry.lookup import ModelRef
from service.registry.spec import EncoderSpec, backbone_from_spec, save_weights
from service.registry.tags import version_tags
from service.registry.text import write_text_files
from service.registry.validation import ValidationData, validation_data
from service.tracking.uri import use_tracking_uri

log = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "encoder"


@dataclass(frozen=True)
class LoggedEncoder:
    """A backbone logged into its run and registered as a new version (no aliases yet)."""

    model_uri: str
    version: str
    spec: EncoderSpec


def register_encoder(
    backbone: nn.Module,
    config: Config,
    *,
    tracking_uri: str,
    run_id: str,
    metric_name: str,
    metric_value: float,
    knn: float | None = None,
    name: str | None = None,
    input_example: np.ndarray | None = None,
    tags: dict[str, Any] | None = None,
    higher_is_better: bool = True,
    image_text: nn.Module | None = None,
    tokenizer: Any | None = None,
) -> dict[str, Any]:
    """Log ``backbone`` (not the projection head) into run ``run_id``, register it, set
    ``latest-trained`` and maybe ``champion``; returns ``model_uri``, ``version``, ``champion``
    (bool), ``previous_champion`` (version or None), ``decision`` (text), ``metric_name``,
    ``metric_value``, ``validation`` (what the metric was measured on, or None).

    ``name`` defaults to ``config.mlflow.registered_model_name``; ``input_example`` (float32
    ``[b, 3, H, W]``, already normalised) to zeros of the config's image size. The version is
    tagged with ``version_tags(config, knn, backbone)``, the champion metric, the data it was
    measured on (``validation.*``: fingerprint, rows, classes, description; read from
    ``config.data``, see ``service.registry.validation``) and ``tags`` (extra tags, which win
    over the computed ones).

    Image–text runs (``config.text.column`` set) also pass ``image_text``, the trained
    ``ImageTextModel`` (``backbone`` is its ``.backbone``): its heads and text tower are logged
    weights-only with the tokenizer (``service.registry.text``). ``tokenizer`` defaults to the
    run's ``<storage_path>/<run_name>/tokenizer.json``.
    """
    from mlflow import MlflowClient

    name = config.mlflow.registered_model_name if name is None else name
    if not name:
        raise RegistryError(
            "registered model name must be non-empty (mlflow.registered_model_name)"
        )
    metric_value = float(metric_value)
    text = _text_parts(config, image_text, tokenizer)
    validation = _validation(config, metric_name)
    all_tags = {
        **version_tags(config, knn, unwrap(backbone)),
        "champion_metric": metric_name,
        metric_tag(metric_name): repr(metric_value),
        **({} if validation is None else validation.tags()),
        **{key: str(value) for key, value in (tags or {}).items()},
    }
    logged = log_encoder(
        backbone,
        config,
        tracking_uri=tracking_uri,
        run_id=run_id,
        name=name,
        input_example=input_example,
        tags=all_tags,
        text=text,
    )
    client = MlflowClient(tracking_uri)
    client.update_model_version(
        name, logged.version, description=f"{metric_name}={metric_value:.4g} from run {run_id}"
    )
    client.set_tag(run_id, "registry.model_uri", logged.model_uri)
    decision = apply_alias_policy(
        client,
        name,
        logged.version,
        run_id=run_id,
        metric_name=metric_name,
        metric_value=metric_value,
        higher_is_better=higher_is_better,
        validation=validation,
    )
    log.info("registered %s (%s)", logged.model_uri, decision.reason)
    return {
        "model_uri": logged.model_uri,
        "version": logged.version,
        "champion": decision.champion,
        "previous_champion": decision.previous_champion,
        "decision": decision.reason,
        "metric_name": metric_name,
        "metric_value": metric_value,
        "validation": None if validation is None else validation.to_dict(),
    }


def _validation(config: Config, metric_name: str) -> ValidationData | None:
    """What the champion metric was measured on; None (never champion automatically, and the
    decision says so) when the data cannot be read now: registration still goes ahead."""
    try:
        return validation_data(config, metric_name)
    except (OSError, ValueError) as exc:  # DataError is a ValueError
        log.warning("validation data of %s unknown: %s", metric_name, str(exc)[:200])
        return None


def log_encoder(
    backbone: nn.Module,
    config: Config,
    *,
    tracking_uri: str,
    run_id: str,
    name: str,
    input_example: np.ndarray | None = None,
    tags: dict[str, str] | None = None,
    text: tuple[nn.Module, Any] | None = None,
) -> LoggedEncoder:
    """Log ``backbone`` as the portable pyfunc, the pickled pytorch flavour and the safetensors +
    ``encoder.json`` copy into run ``run_id`` and register it as a new version of ``name``,
    tagged with ``tags``.
    ``text``: (ImageTextModel, Tokenizer) of an image–text run, logged weights-only beside it.

    Everything that can be wrong with the inputs is checked before anything is logged.
    """
    import mlflow
    from mlflow.models import infer_signature

    example_np = _example(config, input_example)
    encoder = copy.deepcopy(unwrap(backbone)).cpu().float().eval()
    example = torch.from_numpy(example_np)
    with torch.no_grad():
        output = encoder(example)
    if output.ndim != 2:
        raise EncoderSpecError(f"backbone must return [b, dim] features, got {tuple(output.shape)}")
    spec = _check_rebuild(
        EncoderSpec.from_config(config, encoder, int(output.shape[1])), encoder, example
    )
    facts = {
        "run_id": run_id,
        "embedding_dim": str(spec.embedding_dim),
        "serialization": "pyfunc+pickle+safetensors" if spec.rebuildable else "pickle+safetensors",
        "weights_rebuildable": str(spec.rebuildable).lower(),
        TOWERS_TAG: "image+text" if text is not None else "image",
    }
    all_tags = {**(tags or {}), **facts}
    with tempfile.TemporaryDirectory(prefix="encoder-weights-") as tmp:
        extra = [str(save_weights(encoder, tmp)), str(spec.save(tmp))]
        if text is not None:  # written and checked before anything is logged
            model, tokenizer = text
            text_model = copy.deepcopy(unwrap(model))
            files = write_text_files(text_model, encoder, tokenizer, config, Path(tmp))
            extra += [str(f) for f in files]
        model_id = _logged_model_of_run(tracking_uri, run_id, all_tags)
        # MLflow warns on every pickled model; pickling is the choice explained above.
        with (
            use_tracking_uri(tracking_uri),
            dropping_log_messages("mlflow.pytorch", MLFLOW_PICKLE_WARNING),
        ):
            if spec.rebuildable:  # the portable pyfunc + the pickled pytorch flavour
                info = _log_portable(encoder, spec, [Path(f) for f in extra], model_id, all_tags,
                                     name=name, run_id=run_id, text=text is not None)  # fmt: skip
            else:  # an architecture service.models cannot rebuild: the pickled module only
                info = mlflow.pytorch.log_model(
                    encoder,
                    name=MODEL_ARTIFACT_NAME,
                    model_id=model_id,
                    registered_model_name=name,
                    input_example=example_np,
                    signature=infer_signature(example_np, output.numpy()),
                    serialization_format="pickle",
                    extra_files=extra,
                    pip_requirements=_pip_requirements(),
                    metadata={"encoder": spec.to_dict()},
                    tags=all_tags,
                    run_id=run_id,
                )
    version = str(info.registered_model_version)
    return LoggedEncoder(ModelRef(name, version=version).uri, version, spec)


def _log_portable(
    encoder: nn.Module, spec: EncoderSpec, files: list[Path], model_id: str,
    tags: dict[str, str], *, name: str, run_id: str, text: bool,
) -> Any:  # fmt: skip
    """Log the version as the portable pyfunc (+ the pickled pytorch flavour), after checking
    that the portable copy reproduces ``encoder`` (``service.registry.pyfunc``)."""
    from mlflow.models import Model

    from service.registry.pyfunc import EncoderFlavor, check_portable

    check_portable(files, encoder, spec.image_size)
    return Model.log(
        None,
        flavor=EncoderFlavor,
        name=MODEL_ARTIFACT_NAME,
        registered_model_name=name,
        model_id=model_id,
        metadata={"encoder": spec.to_dict()},
        tags=tags,
        run_id=run_id,
        encoder=encoder,
        files=files,
        text=text,
        embedding_dim=spec.embedding_dim,
        image_size=spec.image_size,
        validate_serving_input=False,  # check_portable did; this would import the code here
    )


def _text_parts(
    config: Config, image_text: nn.Module | None, tokenizer: Any | None
) -> tuple[nn.Module, Any] | None:
    """(model, tokenizer) to log in text mode, None otherwise; errors before anything is logged."""
    if not config.text.column:
        if image_text is not None:
            raise RegistryError("image_text was given but config.text.column is not set")
        return None
    if image_text is None or not getattr(unwrap(image_text), "paired_views", False):
        raise RegistryError(
            "config.text.column is set: register_encoder needs image_text=<the trained "
            "ImageTextModel> (its heads and text tower are registered with the backbone)"
        )
    if tokenizer is None:
        from service.eval.image_text import run_tokenizer_path
        from service.text import Tokenizer

        path = run_tokenizer_path(config)
        if not path.is_file():
            raise RegistryError(f"no tokenizer at {path}; pass tokenizer= to register_encoder")
        tokenizer = Tokenizer.load(path)
    return unwrap(image_text), tokenizer


def _logged_model_of_run(tracking_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Create the MLflow 3 LoggedModel in the run's experiment, linked to the run; its id.

    Left to itself, ``log_model(run_id=...)`` without an active fluent run files the model under
    the *current* experiment ("Default", id 0) instead of the run's, so the run page lists no
    logged model and a SQLite store writes it under ``./mlruns/0`` of whatever the cwd is.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    model = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=MODEL_ARTIFACT_NAME,
        source_run_id=run_id,
        tags=tags,
        params=dict(run.data.params),  # what log_model itself copies from the run
    )
    return model.model_id


def _example(config: Config, input_example: np.ndarray | None) -> np.ndarray:
    """The input example as contiguous float32 ``[b, 3, S, S]``, S the config's image size."""
    size = config.data.image_size
    if input_example is None:
        return np.zeros((1, 3, size, size), dtype=np.float32)
    example = np.ascontiguousarray(input_example, dtype=np.float32)
    if example.ndim != 4 or example.shape[1:] != (3, size, size):
        raise EncoderSpecError(
            f"input_example shape {example.shape} does not match the recorded input size "
            f"[b, 3, {size}, {size}]"
        )
    return example


def _check_rebuild(spec: EncoderSpec, encoder: nn.Module, example: torch.Tensor) -> EncoderSpec:
    """Keep ``model_config`` only if it really rebuilds this encoder (same outputs)."""
    try:
        rebuilt = backbone_from_spec(spec)
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
