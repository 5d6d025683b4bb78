"""The registered version as an MLflow pyfunc that loads without this project.

``log_model`` writes one MLflow model with two flavours:

* ``python_function``: models-from-code (``_ENTRY``, three lines) + ``code/contrastive_pyfunc/``
  (the architectures and the ``EncoderModel`` wrapper, importing nothing from ``service``) +
  ``artifacts/`` (``encoder.safetensors``, ``encoder.json`` and, for image–text runs,
  ``towers.safetensors``, ``image_text.json``, ``tokenizer.json``). Requirements: torch,
  torchvision, mlflow, pillow, pandas, numpy (+ tokenizers for the text tower). This is what
  ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` use; nothing is unpickled.
* ``pytorch``: the pickled backbone (``data/model.pth``) for ``mlflow.pytorch.load_model`` and
  ``load_encoder(source="pickle")``, where this project is installed.

Why code + weights rather than ``torch.export``: export works for the small CNN and ResNet-18 on
CPU (torch 2.14, dynamic batch) but costs 5–15 s per registration here, ties the artifact to
``torch.export``'s format version, and still needs code for the tokenizer; the state dict in
safetensors loads into the portable modules with any torch that has these layers. The price is a
second copy of the architectures, checked at every registration (``check_portable``).
"""

from __future__ import annotations

import io
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from service.registry import contrastive_pyfunc
from service.registry.errors import EncoderSpecError

PACKAGE_DIR = Path(contrastive_pyfunc.__file__).parent
ENTRY_FILE = "encoder_pyfunc.py"
# Executed by MLflow when the model loads (models-from-code): no pickle in the pyfunc flavour.
# MLflow also runs it once while saving, in this project, where code/ is not on sys.path yet.
_ENTRY = """import importlib.util

from mlflow.models import set_model

if importlib.util.find_spec("contrastive_pyfunc") is not None:  # code/ of the logged model
    from contrastive_pyfunc import EncoderModel
else:  # only while registering, inside contrastive-service
    from service.registry.contrastive_pyfunc import EncoderModel

set_model(EncoderModel())
"""
PYTORCH_DATA = "data"


def example_png(image_size: int) -> bytes:
    """A small deterministic RGB PNG (a colour gradient of the encoder's input size)."""
    from PIL import Image

    ramp = np.linspace(0, 255, image_size, dtype=np.float32)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1, None]), -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def signature(embedding_dim: int, text: bool) -> Any:
    """Inputs: ``image`` (binary) and, for image–text models, ``text`` (string), each optional;
    output: ``float32 [-1, embedding_dim]`` (``[-1, -1]`` for image–text models: backbone
    features for images, the joint space for texts); params ``normalize`` (and ``space``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    columns = [ColSpec(DataType.binary, contrastive_pyfunc.IMAGE_COLUMN, required=not text)]
    params = [ParamSpec("normalize", DataType.boolean, False)]
    if text:
        columns.append(ColSpec(DataType.string, contrastive_pyfunc.TEXT_COLUMN, required=False))
        params.append(ParamSpec("space", DataType.string, "backbone"))
    return ModelSignature(
        inputs=Schema(columns),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1 if text else embedding_dim))]),
        params=ParamSchema(params),
    )


def pip_requirements(text: bool) -> list[str]:
    """Pinned to this environment; never this project."""
    dists = ["torch", "torchvision", "mlflow", "pillow", "pandas", "numpy"]
    reqs = []
    for dist in dists + (["tokenizers"] if text else []):
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def check_portable(files: list[Path], encoder: nn.Module, image_size: int) -> None:
    """Raise unless the portable pyfunc, built from ``files``, gives ``encoder``'s features for
    the example image (the copy of the architectures has not drifted)."""
    import pandas as pd

    from service.data.augment import eval_transform
    from service.data.decode import decode_image
    from service.registry.spec import EncoderSpec

    artifacts = {f.name: str(f) for f in files}
    model = contrastive_pyfunc.EncoderModel()
    model.load_context(SimpleNamespace(artifacts=artifacts, model_config={}))
    png = example_png(image_size)
    spec = EncoderSpec.load(artifacts["encoder.json"])
    with torch.no_grad():
        x = eval_transform(spec.image_size, spec.mean, spec.std)(decode_image(png))
        expected = encoder(x.unsqueeze(0)).float().numpy()
    got = model.predict(None, pd.DataFrame({contrastive_pyfunc.IMAGE_COLUMN: [png]}))
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise EncoderSpecError(
            "the portable pyfunc (service/registry/contrastive_pyfunc) does not reproduce the "
            "encoder: its copy of the architecture has drifted from service.models"
        )


class EncoderFlavor:
    """What ``mlflow.models.Model.log`` calls: the pyfunc flavour plus the pickled ``pytorch``
    flavour in one model directory."""

    __name__ = "contrastive_pyfunc"

    @staticmethod
    def save_model(
        path: str, mlflow_model: Any, *, encoder: nn.Module, files: list[Path], text: bool,
        embedding_dim: int, image_size: int, **_: Any,
    ) -> None:  # fmt: skip
        import mlflow.pyfunc
        import mlflow.pytorch
        import pandas as pd

        with tempfile.TemporaryDirectory(prefix="encoder-pyfunc-") as tmp:
            entry = Path(tmp) / ENTRY_FILE
            entry.write_text(_ENTRY)
            mlflow.pyfunc.save_model(
                path,
                python_model=str(entry),
                artifacts={f.name: str(f) for f in files},
                code_paths=[str(PACKAGE_DIR)],
                signature=signature(embedding_dim, text),
                input_example=pd.DataFrame({"image": [example_png(image_size)]}),
                pip_requirements=pip_requirements(text),
                mlflow_model=mlflow_model,
            )
            pickled = Path(tmp) / "pytorch"
            mlflow.pytorch.save_model(
                encoder, str(pickled), serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )  # fmt: skip
            shutil.copytree(pickled / PYTORCH_DATA, Path(path) / PYTORCH_DATA)
            conf = mlflow.models.Model.load(str(pickled)).flavors["pytorch"]
        mlflow_model.add_flavor("pytorch", **{**conf, "model_data": PYTORCH_DATA})
        mlflow_model.save(str(Path(path) / "MLmodel"))
        for cache in Path(path).rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
