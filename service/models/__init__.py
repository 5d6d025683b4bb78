"""Models: backbones (small CNN, ResNet-18/50 with a CIFAR stem), projection head, wrapper, and
the two-tower image–text model (text Transformer + any backbone)."""

from service.models.backbones import BACKBONES, SmallCNN, build_backbone
from service.models.contrastive import (
    ContrastiveModel,
    build_model,
    build_training_model,
    maybe_convert_sync_batchnorm,
)
from service.models.global_bn import GlobalBatchNorm, convert_to_global_bn, convert_to_local_bn
from service.models.heads import ProjectionHead
from service.models.image_text import ImageTextModel, build_image_text_model, text_model_problems
from service.models.text import TextTransformer, eot_positions
from service.models.wrap import unwrap

__all__ = [
    "BACKBONES",
    "ContrastiveModel",
    "GlobalBatchNorm",
    "ImageTextModel",
    "ProjectionHead",
    "SmallCNN",
    "TextTransformer",
    "build_backbone",
    "build_image_text_model",
    "build_model",
    "build_training_model",
    "convert_to_global_bn",
    "convert_to_local_bn",
    "eot_positions",
    "maybe_convert_sync_batchnorm",
    "text_model_problems",
    "unwrap",
]
