"""``EncoderModel``: the MLflow pyfunc of a registered encoder, needing only MLflow, torch,
torchvision, numpy, pandas and Pillow (``tokenizers`` too for the text tower).

``predict(df)``: one row per input row, ``float32 [n, d]``.

* column ``image``: encoded image bytes (PNG, JPEG, WebP, ...; base64 strings over HTTP), or
  uint8 ``[H, W, 3]`` arrays in-process (``[H, W]`` greyscale and ``[H, W, 4]`` RGBA too);
* column ``text`` (image–text models only): caption strings.

A row uses whichever of the two it has. Images get the run's evaluation preprocessing (resize the
shorter side to ``image_size``, centre crop, scale to [0, 1], normalise with the run's mean/std),
exactly ``contrastive embed``'s, and give the **backbone features, not L2-normalised** (as
``contrastive embed`` without ``--normalize``). Texts give the joint image–text space,
L2-normalised (as ``contrastive embed --text-column``). Params: ``normalize`` (L2-normalise image
rows too) and, for image–text models, ``space="joint"`` (image rows through the image projection,
L2-normalised: comparable with text rows; a frame mixing images and texts needs it).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.pyfunc import PythonModel
from PIL import Image, ImageOps

from .nets import Towers, build_backbone, read_safetensors

IMAGE_COLUMN = "image"
TEXT_COLUMN = "text"
WEIGHTS, SPEC = "encoder.safetensors", "encoder.json"
TOWERS, IMAGE_TEXT_SPEC, TOKENIZER = "towers.safetensors", "image_text.json", "tokenizer.json"
BACKGROUND = (255, 255, 255)  # transparent pixels composited onto white, as in training


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB, as ``service.data.decode.to_rgb`` (16-bit and float greyscale
    scaled, palette and alpha composited onto white)."""
    if image.mode == "RGB":
        return image
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        array = np.asarray(image)
        if image.mode == "F":
            top = 1.0 if np.nanmax(array) <= 1.0 else 255.0
            array = np.nan_to_num(array) * (255.0 / top)
        else:
            top = 65535.0 if image.mode != "I" or array.max() > 255 else 255.0
            array = array.astype(np.float64) * (255.0 / top)
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in {"RGBa", "La"}:
        image = image.convert("RGBA" if image.mode == "RGBa" else "LA")
    if image.mode in {"RGBA", "LA", "PA"}:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def to_image(value: Any) -> Image.Image:
    """Encoded bytes (or their base64 text) or a uint8 array → RGB PIL image (EXIF rotation
    applied to encoded images, as ``service.data.decode.decode_image``)."""
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3):
            raise ValueError(f"image arrays must be uint8 [H, W(, C)], got {value.dtype} "
                             f"{value.shape}")  # fmt: skip
        return to_rgb(Image.fromarray(value))
    if isinstance(value, str):
        import base64

        value = base64.b64decode(value)
    with Image.open(io.BytesIO(bytes(value))) as opened:
        opened.load()
        try:
            image = ImageOps.exif_transpose(opened)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
            image = opened.copy()
        return to_rgb(image)


def _present(value: Any) -> bool:
    """Not a missing cell (None, or pandas' NaN); an empty string is a caption like any other."""
    return value is not None and not (isinstance(value, float) and np.isnan(value))


class EncoderModel(PythonModel):
    """The pyfunc; see the module docstring. ``load_context`` reads the artifacts."""

    def load_context(self, context: Any) -> None:
        from torchvision.transforms import v2

        spec = json.loads(open(context.artifacts[SPEC]).read())
        self.backbone = build_backbone(spec["model_config"])
        self.backbone.load_state_dict(read_safetensors(context.artifacts[WEIGHTS]), strict=True)
        self.backbone.eval()
        size = int(spec["image_size"])
        self.preprocess = v2.Compose([
            v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec["mean"], spec["std"]),
        ])  # fmt: skip
        self.towers = self.tokenizer = None
        if IMAGE_TEXT_SPEC in context.artifacts:
            self._load_towers(context.artifacts)

    def _load_towers(self, artifacts: dict[str, str]) -> None:
        from tokenizers import Tokenizer

        spec = json.loads(open(artifacts[IMAGE_TEXT_SPEC]).read())
        self.towers = Towers(spec["model_config"], spec["text_config"], self.backbone.out_dim)
        self.towers.load_state_dict(read_safetensors(artifacts[TOWERS]), strict=True)
        self.towers.eval()
        self.tokenizer = Tokenizer.from_file(artifacts[TOKENIZER])
        self.context_length = int(spec["text_config"]["context_length"])

    @torch.inference_mode()
    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> Any:
        params = params or {}
        space = params.get("space", "backbone")
        if space not in ("backbone", "joint") or (space == "joint" and self.towers is None):
            allowed = "'backbone' or 'joint'" if self.towers is not None else "'backbone'"
            raise ValueError(f"space must be {allowed}, got {space!r}")
        images, texts = _rows(model_input)
        if texts and self.towers is None:
            raise ValueError("this is an image-only encoder: it has no text tower")
        if images and texts and space != "joint":
            raise ValueError("images and texts in one frame: pass params={'space': 'joint'} "
                             "so both are embedded in the joint space")  # fmt: skip
        out: list[torch.Tensor | None] = [None] * (len(images) + len(texts))
        if images:
            rows, values = zip(*images, strict=True)
            features = self.embed_images(list(values), space, bool(params.get("normalize")))
            for row, vector in zip(rows, features, strict=True):
                out[row] = vector
        if texts:
            rows, values = zip(*texts, strict=True)
            for row, vector in zip(rows, self.embed_texts(list(values)), strict=True):
                out[row] = vector
        return torch.stack(out).numpy()  # type: ignore[arg-type]

    def embed_images(self, values: list[Any], space: str = "backbone", normalize: bool = False):
        """Images (bytes, base64 text or uint8 arrays) → ``[n, d]`` features."""
        batch = []
        for i, value in enumerate(values):
            try:
                batch.append(self.preprocess(to_image(value)))
            except (OSError, SyntaxError, ValueError, TypeError) as exc:
                raise ValueError(f"image {i} could not be decoded: {exc}") from exc
        features = self.backbone(torch.stack(batch)).float()
        if space == "joint":
            return F.normalize(self.towers.head(features).float(), dim=1)
        return F.normalize(features, dim=1) if normalize else features

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Captions → ``[n, d]`` joint-space unit vectors (``Tokenizer.encode``'s layout: ids
        cut to ``context_length - 1``, end-of-text, padding 0)."""
        eot = self.tokenizer.token_to_id("<eot>")
        pad = self.tokenizer.token_to_id("<pad>")
        tokens = np.full((len(texts), self.context_length), pad, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            ids = ids[: self.context_length - 1] + [eot]
            tokens[row, : len(ids)] = ids
        text = self.towers.text_encoder(torch.from_numpy(tokens))
        return F.normalize(self.towers.text_head(text).float(), dim=1)


def _rows(model_input: Any) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """(row, image) and (row, text) pairs of a DataFrame (or a list of images / one array)."""
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
        arrays = [model_input] if model_input.ndim in (2, 3) else list(model_input)
        return list(enumerate(arrays)), []
    if isinstance(model_input, list):
        return list(enumerate(model_input)), []
    if not isinstance(model_input, pd.DataFrame):
        raise ValueError(f"expected a DataFrame with an {IMAGE_COLUMN!r} and/or {TEXT_COLUMN!r} "
                         f"column, got {type(model_input).__name__}")  # fmt: skip
    images, texts = [], []
    for row in range(len(model_input)):
        image = model_input[IMAGE_COLUMN].iloc[row] if IMAGE_COLUMN in model_input else None
        text = model_input[TEXT_COLUMN].iloc[row] if TEXT_COLUMN in model_input else None
        if _present(image):
            images.append((row, image))
        elif _present(text):
            texts.append((row, str(text)))
        else:
            raise ValueError(f"row {row} has neither an {IMAGE_COLUMN!r} nor a {TEXT_COLUMN!r}")
    return images, texts
