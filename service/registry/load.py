"""Load a registered encoder (``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local pulled
directory) as an eval-mode ``nn.Module`` plus its preprocessing; ``pull`` one for offline use.

Loading prefers the weights-only copy (rebuild the architecture from ``encoder.json``, load
``encoder.safetensors``: nothing is unpickled). Only when the architecture cannot be rebuilt
(``source="auto"``) or when asked (``source="pickle"``) is the pickled MLflow model loaded, which
executes code from the artifact: use it only with registries you trust.

    >>> encoder, preprocess = load_encoder("models:/contrastive-encoder@champion")  # doctest: +SKIP
    >>> encoder(preprocess(image).unsqueeze(0)).shape  # doctest: +SKIP
    torch.Size([1, 512])
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from torch import nn

from service.registry.errors import EncoderSpecError, RegistryError, RegistryInputError
from service.registry.lookup import (
    download_version,
    model_directory,
    parse_model_ref,
    resolve_version,
)
from service.registry.spec import SPEC_FILE, WEIGHTS_FILE, EncoderSpec, find_weights_copy
from service.registry.text import copy_text_files
from service.tracking.uri import redact_uri, resolve_tracking_uri

Source = Literal["auto", "weights", "pickle"]
PULLED_MODEL_DIR = "model"  # the MLflow model directory inside a pulled directory
REGISTRY_INFO_FILE = "registry.json"


def _mlflow_model_dir(directory: Path) -> Path | None:
    for candidate in (directory / PULLED_MODEL_DIR, directory):
        if (candidate / "MLmodel").exists():
            return candidate
    return None


@dataclass(frozen=True)
class LoadedEncoder:
    """A loaded encoder (eval mode, CPU), its preprocessing and its ``encoder.json`` spec.

    The spec says how to build the same architecture afresh (``backbone_from_spec``), e.g. for
    a random-init baseline of a registered encoder.
    """

    module: nn.Module
    preprocess: Callable[[Any], Any]
    spec: EncoderSpec


def load_from_directory(
    directory: str | Path, source: Source = "auto"
) -> tuple[nn.Module, Callable[[Any], Any]]:
    """Load from a pulled directory or a downloaded MLflow model directory."""
    loaded = _load_directory(Path(directory), source)
    return loaded.module, loaded.preprocess


def _load_directory(directory: Path, source: Source) -> LoadedEncoder:
    spec_path, weights_path = find_weights_copy(directory)
    spec = EncoderSpec.load(spec_path)
    if source not in ("auto", "weights", "pickle"):
        raise RegistryError(f"source must be 'auto', 'weights' or 'pickle', got {source!r}")
    module: nn.Module | None = None
    if source == "weights" or (source == "auto" and spec.rebuildable):
        from service.registry.spec import rebuild_from_weights

        module = rebuild_from_weights(spec, weights_path)
    if module is None:
        model_dir = _mlflow_model_dir(directory)
        if model_dir is None:
            raise EncoderSpecError(f"{directory} holds no MLflow model (MLmodel file) to unpickle")
        import mlflow.pytorch

        module = mlflow.pytorch.load_model(str(model_dir), map_location="cpu")
    return LoadedEncoder(module.eval(), spec.preprocess(), spec)


def load_encoder(
    model_uri: str, tracking_uri: str | None = None, *, source: Source = "auto"
) -> tuple[nn.Module, Callable[[Any], Any]]:
    """``(encoder in eval mode on CPU, preprocess)`` where ``preprocess`` maps an RGB PIL image
    to the normalised ``[3, H, W]`` tensor the encoder was trained on.

    ``model_uri``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local directory made by
    ``pull`` (or a downloaded MLflow model directory). ``source``: ``auto`` (weights-only copy if
    the architecture is rebuildable, else the pickle), ``weights`` or ``pickle``. Without
    ``tracking_uri``, the store is the one pretraining used (``resolve_tracking_uri``).
    """
    loaded = load_registered(model_uri, tracking_uri, source=source)
    return loaded.module, loaded.preprocess


def load_registered(
    model_uri: str, tracking_uri: str | None = None, *, source: Source = "auto"
) -> LoadedEncoder:
    """:func:`load_encoder`, plus the encoder's spec (architecture, input size, normalisation)."""
    with model_directory(model_uri, tracking_uri) as directory:
        return _load_directory(directory, source)


def version_aliases(client: Any, name: str, version: str | int) -> list[str]:
    """The aliases pointing at ``version`` of ``name``, sorted.

    Registered-model aliases map to an int version in a SQLite store and to a str over HTTP, so
    versions are compared as strings.
    """
    registered = client.get_registered_model(name)
    return sorted(a for a, v in registered.aliases.items() if str(v) == str(version))


_LOADER_PY = '''"""Load this pulled encoder offline (no MLflow server needed).

    python loader.py                       # load it and print a one-line summary
    from loader import load                # model, preprocess = load()

Needs contrastive-service installed (it defines the architecture).
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(source="auto"):
    """(encoder in eval mode, preprocess: RGB PIL image -> normalised [3, H, W] tensor)."""
    try:
        from service.registry.load import load_encoder
    except ImportError as exc:
        raise SystemExit(
            "contrastive-service is not installed; `pip install <repo>` first. "
            "See README.md for rebuilding from encoder.safetensors by hand."
        ) from exc
    return load_encoder(str(HERE), source=source)


if __name__ == "__main__":
    import torch

    model, preprocess = load()
    spec = json.loads((HERE / "encoder.json").read_text())
    with torch.no_grad():
        out = model(torch.zeros(2, *spec["input_shape"]))
    info = json.loads((HERE / "registry.json").read_text())
    print(json.dumps({"model": info["model_uri"], "embedding_shape": list(out.shape)}))
'''

_README = """# {name} version {version}

Pulled from `{model_uri}`{alias_note} on {pulled_at} (run `{run_id}`).

| file | what |
|---|---|
| `model/` | the MLflow model: its pyfunc needs only MLflow, torch, torchvision \
(`mlflow.pyfunc.load_model("model")`); the pickled `nn.Module` (`pytorch` flavour) |
| `encoder.safetensors` | weights only (no code is executed when loading them) |
| `encoder.json` | architecture config, input size {image_size}px, mean {mean}, std {std}, \
embedding dim {embedding_dim} |
| `registry.json` | registry metadata: version, aliases, tags |
| `loader.py` | `from loader import load; model, preprocess = load()` |

Loading prefers rebuilding the architecture and reading `encoder.safetensors`. The pickled model
in `model/` runs code from the file when loaded (`source="pickle"`): only do that for files from
a registry you trust.

By hand, without the loader:

```python
import json, torch
from safetensors.torch import load_model
from service.config import ModelConfig
from service.models import build_model

spec = json.load(open("encoder.json"))
encoder = build_model(ModelConfig(**spec["model_config"])).backbone
load_model(encoder, "encoder.safetensors")
encoder.eval()  # inputs: RGB, resized+centre-cropped to image_size, scaled to [0,1], normalised
```
"""


def pull(
    spec: str, out_dir: str | Path, tracking_uri: str | None = None, *, overwrite: bool = False
) -> Path:
    """Download ``NAME@ALIAS`` / ``NAME/VERSION`` (optionally ``models:/``-prefixed) into
    ``out_dir``: the MLflow model, the weights-only copy, ``loader.py``, ``README.md`` and
    ``registry.json`` (version, its aliases, tags). Without ``tracking_uri``, the store is the one
    pretraining used (``resolve_tracking_uri``)."""
    from mlflow import MlflowClient

    ref = parse_model_ref(spec)
    uri = resolve_tracking_uri(explicit=tracking_uri)
    client = MlflowClient(uri)
    version = resolve_version(client, ref)
    number = str(version.version)  # an int from a SQLite store
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RegistryInputError(
                f"{out} is not empty; choose another directory or overwrite=True"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = download_version(uri, ref.name, number, out / PULLED_MODEL_DIR)
    spec_path, weights_path = find_weights_copy(model_dir)
    shutil.copy2(spec_path, out / SPEC_FILE)
    shutil.copy2(weights_path, out / WEIGHTS_FILE)
    copy_text_files(model_dir, out)
    encoder_spec = EncoderSpec.load(out / SPEC_FILE)

    info = {
        "name": ref.name,
        "version": number,
        "model_uri": f"models:/{ref.name}/{number}",
        "requested": spec,
        "aliases": version_aliases(client, ref.name, number),
        "run_id": version.run_id,
        "tags": dict(version.tags),
        "tracking_uri": redact_uri(uri),
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / REGISTRY_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    (out / "loader.py").write_text(_LOADER_PY)
    (out / "README.md").write_text(
        _README.format(
            name=ref.name,
            version=number,
            model_uri=info["model_uri"],
            alias_note=f" (alias `{ref.alias}`)" if ref.alias else "",
            pulled_at=info["pulled_at"],
            run_id=version.run_id,
            image_size=encoder_spec.image_size,
            mean=encoder_spec.mean,
            std=encoder_spec.std,
            embedding_dim=encoder_spec.embedding_dim,
        )
        + (_TEXT_README if (out / "image_text.json").exists() else "")
    )
    return out


_TEXT_README = """
## Image–text model

`towers.safetensors` (image projection head, text Transformer, text projection head),
`image_text.json` (how to rebuild them) and `tokenizer.json` (the run's tokenizer) hold the rest
of the CLIP-style model: `service.registry.load_image_text_model(".")` gives the whole
`ImageTextModel` and its tokenizer, `service.registry.load_text_encoder(".")` the text side
(`encode(texts)`: L2-normalised joint-space embeddings). Nothing is unpickled.
"""
