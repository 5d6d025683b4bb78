"""Both towers of an image–text (CLIP-style) run in the registry, next to the image encoder.

A version registered in text mode (``config.text.column`` set) holds, besides the image backbone
(pickled model + ``encoder.safetensors``/``encoder.json``, loaded by ``load_encoder`` as for
SimCLR), three more weights-only files:

* ``towers.safetensors``: the image projection head, the text Transformer and the text projection
  head (every ``ImageTextModel`` tensor except the backbone's, which is ``encoder.safetensors``);
* ``image_text.json``: how to rebuild them (the run's ``model.*`` and ``text.*`` config, input
  size and normalisation, joint embedding dim);
* ``tokenizer.json``: the run's tokenizer (``service.text.Tokenizer``), fitted on its captions.

Nothing is unpickled to load them: ``load_image_text_model`` rebuilds ``ImageTextModel`` from the
JSON and reads the safetensors; ``load_text_encoder`` gives the text side alone.

    >>> model, tokenizer = load_image_text_model("models:/clip-encoder@champion")  # doctest: +SKIP
    >>> text = load_text_encoder("models:/clip-encoder@champion")  # doctest: +SKIP
    >>> text.encode(["a photo of a cat.", "a photo of a dog."]).shape  # doctest: +SKIP
    torch.Size([2, 128])
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.config import Config, ModelConfig, TextConfig
from service.registry.errors import EncoderSpecError, RegistryError, RegistryInputError
from service.registry.lookup import model_directory

IMAGE_TEXT_SPEC_FILE = "image_text.json"
TOWERS_FILE = "towers.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TEXT_FILES = (IMAGE_TEXT_SPEC_FILE, TOWERS_FILE, TOKENIZER_FILE)
BACKBONE_PREFIX = "backbone."
FORMAT_VERSION = 1


@dataclass
class ImageTextSpec:
    """How to rebuild the two towers; serialised as ``image_text.json``."""

    model_config: dict[str, Any]
    text_config: dict[str, Any]
    image_size: int
    mean: list[float]
    std: list[float]
    embedding_dim: int  # the joint (projection) space
    tokenizer_vocab_size: int
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_config(cls, config: Config, embedding_dim: int, vocab_size: int) -> ImageTextSpec:
        return cls(
            model_config=dataclasses.asdict(config.model),
            text_config=dataclasses.asdict(config.text),
            image_size=config.data.image_size,
            mean=[float(v) for v in config.augment.mean],
            std=[float(v) for v in config.augment.std],
            embedding_dim=embedding_dim,
            tokenizer_vocab_size=vocab_size,
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / IMAGE_TEXT_SPEC_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ImageTextSpec:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EncoderSpecError(f"cannot read {path}: {exc}") from exc
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise EncoderSpecError(
                f"{path} has format_version {data['format_version']}; this code reads <= "
                f"{FORMAT_VERSION}. Upgrade contrastive-service."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def context_length(self) -> int:
        return int(self.text_config["context_length"])

    def config(self) -> Config:
        """The training ``Config`` as far as the towers need it (model, text, input size)."""
        config = Config()
        try:
            config.model = ModelConfig(**self.model_config)
            config.text = TextConfig(**self.text_config)
        except TypeError as exc:
            raise EncoderSpecError(
                f"{IMAGE_TEXT_SPEC_FILE} does not match the config: {exc}"
            ) from exc
        config.data.image_size = self.image_size
        config.augment.mean, config.augment.std = list(self.mean), list(self.std)
        return config


class TextEncoder(nn.Module):
    """The text tower + its projection and the tokenizer: texts → L2-normalised joint-space
    embeddings (comparable with ``ImageTextModel.encode_image``)."""

    def __init__(
        self, text_encoder: nn.Module, text_head: nn.Module, tokenizer: Any, context_length: int
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_head = text_head
        self.tokenizer = tokenizer
        self.context_length = context_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(self.text_encoder(tokens)).float(), dim=1)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts), embedding_dim]`` unit vectors, on the module's device."""
        tokens = self.tokenizer.encode(list(texts), self.context_length)
        device = next(self.parameters()).device
        return self(tokens.to(device))


def _towers_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the image–text model except the backbone's (copied: no shared storage)."""
    return {
        key: value.detach().cpu().contiguous().clone()
        for key, value in model.state_dict().items()
        if not key.startswith(BACKBONE_PREFIX)
    }


def write_text_files(
    model: nn.Module, backbone: nn.Module, tokenizer: Any, config: Config, directory: Path
) -> list[Path]:
    """Write ``towers.safetensors``, ``image_text.json``, ``tokenizer.json`` into ``directory``
    and check that they (with the backbone) rebuild ``model`` exactly; their paths."""
    from safetensors.torch import save_file

    model = model.cpu().float().eval()
    if tokenizer.vocab_size > config.text.vocab_size:
        raise RegistryError(
            f"tokenizer has {tokenizer.vocab_size} tokens, more than the text tower's "
            f"text.vocab_size={config.text.vocab_size}: not the tokenizer this model trained with"
        )
    mine, theirs = backbone.state_dict(), model.backbone.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        raise RegistryError("the backbone to register is not the image-text model's backbone")
    tokens = tokenizer.encode(["a photo."], config.text.context_length)
    with torch.no_grad():
        joint = model.encode_text(tokens)
    spec = ImageTextSpec.from_config(config, int(joint.shape[1]), tokenizer.vocab_size)
    paths = [spec.save(directory), tokenizer.save(directory / TOKENIZER_FILE)]
    save_file(_towers_state(model), str(directory / TOWERS_FILE))
    paths.append(directory / TOWERS_FILE)
    rebuilt = _rebuild(spec, directory / TOWERS_FILE, backbone.state_dict())
    with torch.no_grad():
        if not torch.allclose(rebuilt.encode_text(tokens), joint, atol=1e-5):
            raise EncoderSpecError("the image-text model rebuilt from its files differs from it")
    return paths


def _rebuild(
    spec: ImageTextSpec, towers: Path, backbone_state: dict[str, torch.Tensor]
) -> nn.Module:
    from safetensors.torch import load_file

    from service.models import build_image_text_model

    model = build_image_text_model(spec.config())
    state = {**{BACKBONE_PREFIX + k: v for k, v in backbone_state.items()}, **load_file(towers)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EncoderSpecError(
            f"{TOWERS_FILE} does not fit the towers built from {IMAGE_TEXT_SPEC_FILE} "
            f"(has service.models changed since training?): {str(exc)[:300]}"
        ) from exc
    return model.eval()


def find_text_files(model_dir: str | Path, model_uri: str | None = None) -> Path:
    """The folder holding ``image_text.json`` in a downloaded model dir or a pulled dir; the
    error names ``model_uri`` (what the user asked for) rather than a temporary download."""
    from service.registry.spec import model_file_dirs

    model_dir = Path(model_dir)
    for base in model_file_dirs(model_dir):
        if (base / IMAGE_TEXT_SPEC_FILE).exists():
            return base
    raise RegistryInputError(
        f"{model_uri or model_dir} is an image-only encoder (registered without "
        f"config.text.column; no {IMAGE_TEXT_SPEC_FILE}), so it has no text tower: zero-shot and "
        "text embeddings need a model trained in image-text mode"
    )


@dataclass(frozen=True)
class LoadedImageText:
    """A registered image–text model (eval mode, CPU), its tokenizer and ``image_text.json``."""

    model: nn.Module
    tokenizer: Any
    spec: ImageTextSpec

    def preprocess(self) -> Any:
        """RGB PIL image → the normalised ``[3, H, W]`` tensor the image tower trained on."""
        from service.data.augment import eval_transform

        return eval_transform(self.spec.image_size, self.spec.mean, self.spec.std)


def _load_directory(directory: Path, model_uri: str) -> LoadedImageText:
    from safetensors.torch import load_file

    from service.registry.spec import find_weights_copy
    from service.text import Tokenizer

    base = find_text_files(directory, model_uri)
    spec = ImageTextSpec.load(base / IMAGE_TEXT_SPEC_FILE)
    _, backbone_weights = find_weights_copy(directory)
    model = _rebuild(spec, base / TOWERS_FILE, load_file(backbone_weights))
    return LoadedImageText(model, Tokenizer.load(base / TOKENIZER_FILE), spec)


def load_image_text(model_uri: str, tracking_uri: str | None = None) -> LoadedImageText:
    """:func:`load_image_text_model`, plus the spec (input size, normalisation, templates)."""
    with model_directory(model_uri, tracking_uri) as directory:
        return _load_directory(directory, model_uri)


def load_image_text_model(model_uri: str, tracking_uri: str | None = None) -> tuple[nn.Module, Any]:
    """``(ImageTextModel in eval mode on CPU, Tokenizer)`` of an image–text version
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a pulled directory); weights only."""
    loaded = load_image_text(model_uri, tracking_uri)
    return loaded.model, loaded.tokenizer


def load_text_encoder(model_uri: str, tracking_uri: str | None = None) -> TextEncoder:
    """The text side of an image–text version: ``encode(texts) -> [n, d]`` L2-normalised."""
    model, tokenizer = load_image_text_model(model_uri, tracking_uri)
    context_length = int(model.text_encoder.context_length)
    return TextEncoder(model.text_encoder, model.text_head, tokenizer, context_length).eval()


def is_image_text_dir(directory: str | Path) -> bool:
    """Whether ``directory`` (downloaded model dir or pulled dir) holds an image–text version."""
    from service.registry.spec import model_file_dirs

    return any((b / IMAGE_TEXT_SPEC_FILE).exists() for b in model_file_dirs(Path(directory)))


def copy_text_files(model_dir: Path, out: Path) -> None:
    """An image–text version's towers, spec and tokenizer beside ``encoder.*`` (if it has them),
    so ``load_image_text_model(out)`` / ``load_text_encoder(out)`` work offline (``pull``)."""
    if is_image_text_dir(model_dir):
        base = find_text_files(model_dir)
        for name in TEXT_FILES:
            shutil.copy2(base / name, out / name)
