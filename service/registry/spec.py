"""The weights-only copy of a registered encoder: ``encoder.safetensors`` + ``encoder.json``.

Stored next to the pickled MLflow model so an encoder can be rebuilt without unpickling anything:
the JSON names the architecture (the run's ``model.*`` config), the input size, the normalisation
and the embedding dimension, all taken from the training ``Config``;
``backbone_from_spec(spec)`` plus the ``safetensors`` weights gives back the same module.

    >>> spec = EncoderSpec(image_size=32, mean=[0.5] * 3, std=[0.25] * 3, embedding_dim=512)
    >>> EncoderSpec.from_dict(spec.to_dict()) == spec
    True
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.config import Config, ModelConfig
from service.registry.errors import EncoderSpecError

SPEC_FILE = "encoder.json"
WEIGHTS_FILE = "encoder.safetensors"
FORMAT_VERSION = 1


@dataclass
class EncoderSpec:
    """How to feed and (optionally) rebuild an encoder; serialised as ``encoder.json``."""

    image_size: int
    mean: list[float]
    std: list[float]
    embedding_dim: int
    arch: str | None = None
    # ``ModelConfig`` fields of the training run; None → only the pickled model can be loaded.
    model_config: dict[str, Any] | None = None
    class_path: str = ""
    input_shape: list[int] = field(default_factory=list)  # [3, H, W], without the batch dim
    torch_version: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise EncoderSpecError(
                f"normalisation must be 3 means and 3 positive stds, got mean={self.mean} "
                f"std={self.std}"
            )
        if self.image_size < 1 or self.embedding_dim < 1:
            raise EncoderSpecError(
                f"image_size and embedding_dim must be >= 1, got {self.image_size} and "
                f"{self.embedding_dim}"
            )
        if not self.input_shape:
            self.input_shape = [3, self.image_size, self.image_size]

    @classmethod
    def from_config(cls, config: Config, encoder: nn.Module, embedding_dim: int) -> EncoderSpec:
        """The spec of ``encoder`` trained with ``config``: the Config is the only source of
        input size, normalisation and architecture (no re-parsing of logged params)."""
        kind = type(encoder)
        return cls(
            image_size=config.data.image_size,
            mean=[float(v) for v in config.augment.mean],
            std=[float(v) for v in config.augment.std],
            embedding_dim=embedding_dim,
            arch=config.model.arch,
            model_config=dataclasses.asdict(config.model),
            class_path=f"{kind.__module__}.{kind.__qualname__}",
            torch_version=str(torch.__version__),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSpec:
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise EncoderSpecError(
                f"{SPEC_FILE} has format_version {version}; this code reads <= {FORMAT_VERSION}. "
                "Upgrade contrastive-service."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SPEC_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EncoderSpec:
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise EncoderSpecError(f"no {SPEC_FILE} at {path}") from exc
        except (json.JSONDecodeError, TypeError) as exc:
            raise EncoderSpecError(f"{path} is not a valid {SPEC_FILE}: {exc}") from exc

    @property
    def rebuildable(self) -> bool:
        return self.model_config is not None

    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """The eval transform for this encoder: RGB PIL image → normalised ``[3, H, W]`` tensor."""
        from service.data.augment import eval_transform

        return eval_transform(self.image_size, self.mean, self.std)


def save_weights(module: nn.Module, directory: str | Path) -> Path:
    """``state_dict`` → ``encoder.safetensors`` (shared tensors handled, no pickle)."""
    from safetensors.torch import save_model

    path = Path(directory) / WEIGHTS_FILE
    save_model(module, str(path))
    return path


def backbone_from_spec(spec: EncoderSpec) -> nn.Module:
    """A freshly initialised backbone of the architecture ``spec.model_config`` records.

    Not ``service.models.build_backbone`` (arch name + stem flag): this rebuilds from the whole
    stored ``ModelConfig`` of a registered encoder.
    """
    from service.models import build_model

    if spec.model_config is None:
        raise EncoderSpecError(
            f"{SPEC_FILE} records no model_config (class {spec.class_path or 'unknown'}), so the "
            "encoder cannot be rebuilt from weights; load the pickled model (source='pickle')"
        )
    try:
        config = ModelConfig(**spec.model_config)
    except TypeError as exc:
        raise EncoderSpecError(
            f"model_config {spec.model_config} does not match ModelConfig: {exc}"
        ) from exc
    return build_model(config).backbone


def rebuild_from_weights(spec: EncoderSpec, weights: str | Path) -> nn.Module:
    """Rebuild the architecture from ``spec.model_config`` and load the safetensors weights."""
    from safetensors.torch import load_model

    module = backbone_from_spec(spec)
    try:
        load_model(module, str(weights), strict=True)
    except (RuntimeError, KeyError) as exc:
        raise EncoderSpecError(
            f"weights {weights} do not fit the {spec.arch!r} backbone built from model_config "
            f"(has service.models changed since training?): {str(exc)[:300]}"
        ) from exc
    return module.eval()


def model_file_dirs(model_dir: Path) -> tuple[Path, Path, Path]:
    """Where a version's files can be: a pulled dir, ``artifacts/`` (the pyfunc's artifacts,
    versions since the portable pyfunc) or ``extra_files/`` (older pytorch-flavour versions)."""
    return model_dir, model_dir / "artifacts", model_dir / "extra_files"


def find_weights_copy(model_dir: str | Path) -> tuple[Path, Path]:
    """(encoder.json, encoder.safetensors) inside a downloaded MLflow model dir or a pulled dir."""
    model_dir = Path(model_dir)
    for base in model_file_dirs(model_dir):
        if (base / SPEC_FILE).exists():
            return base / SPEC_FILE, base / WEIGHTS_FILE
    raise EncoderSpecError(
        f"{model_dir} holds no {SPEC_FILE}: not a registered encoder (or pulled directory)"
    )
