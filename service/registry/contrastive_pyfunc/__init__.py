"""The portable pyfunc of a registered encoder: copied into every registered version (MLflow
``code_paths``) and imported there as the top-level package ``contrastive_pyfunc``, so it must
never import ``service`` (``tests/test_registry_pyfunc.py`` loads it where ``service`` cannot be
imported). See ``model`` for what ``predict`` takes and returns."""

from .model import IMAGE_COLUMN, TEXT_COLUMN, EncoderModel
from .nets import build_backbone, read_safetensors

__all__ = ["IMAGE_COLUMN", "TEXT_COLUMN", "EncoderModel", "build_backbone", "read_safetensors"]
