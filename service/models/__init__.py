"""Models: backbones (small CNN, ResNet-18/50 with a CIFAR stem), projection head, wrapper."""

from service.models.backbones import BACKBONES, SmallCNN, build_backbone
from service.models.contrastive import ContrastiveModel, build_model, maybe_convert_sync_batchnorm
from service.models.heads import ProjectionHead
from service.models.wrap import unwrap

__all__ = [
    "BACKBONES",
    "ContrastiveModel",
    "ProjectionHead",
    "SmallCNN",
    "build_backbone",
    "build_model",
    "maybe_convert_sync_batchnorm",
    "unwrap",
]
