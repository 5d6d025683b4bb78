"""``ContrastiveModel``: backbone (the encoder that is registered) + projection head (training)."""

from __future__ import annotations

import torch
from torch import nn

from service.config import Config, ModelConfig
from service.models.backbones import build_backbone
from service.models.global_bn import convert_to_global_bn
from service.models.heads import ProjectionHead


class ContrastiveModel(nn.Module):
    """``forward(x)`` → projections ``z`` for the loss; ``embed(x)`` → backbone features.

    No normalisation and no dtype handling inside: the loss L2-normalises, and autocast (AMP)
    wraps the forward from outside. With ``channels_last=True`` inputs are converted on the way
    in, so callers need not remember to.

    >>> model = ContrastiveModel(build_backbone("small_cnn"), ProjectionHead(256, 512, 128))
    >>> x = torch.zeros(2, 3, 32, 32)
    >>> model(x).shape, model.embed(x).shape
    (torch.Size([2, 128]), torch.Size([2, 256]))
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[b, backbone.out_dim]`` (what evaluation and serving use)."""
        return self.backbone(self._prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build_model(cfg: ModelConfig) -> ContrastiveModel:
    """Backbone ``cfg.arch`` + projection head sized from the config."""
    backbone = build_backbone(cfg.arch, cifar_stem=cfg.cifar_stem, width=cfg.width, depth=cfg.depth)
    head = ProjectionHead(
        backbone.out_dim,
        cfg.proj_hidden_dim,
        cfg.proj_out_dim,
        num_layers=cfg.proj_layers,
        batch_norm=cfg.proj_batch_norm,
    )
    return ContrastiveModel(backbone, head, channels_last=cfg.channels_last)


def build_training_model(config: Config) -> nn.Module:
    """What trains: ``ContrastiveModel`` (images only), or ``ImageTextModel`` when
    ``config.text.column`` names a caption column (image–text mode).

    >>> type(build_training_model(Config())).__name__
    'ContrastiveModel'
    """
    text = getattr(config, "text", None)
    if text is not None and text.column:
        from service.models.image_text import build_image_text_model

        return build_image_text_model(config)
    return build_model(config.model)


def maybe_convert_sync_batchnorm(model: nn.Module, enabled: bool) -> nn.Module:
    """``model.sync_batchnorm``: every BatchNorm becomes a ``GlobalBatchNorm`` (statistics over
    the global batch, on gloo/CPU as on NCCL/GPU) when enabled; otherwise ``model`` unchanged.

    Call before DDP wrapping. SimCLR's "global BN": with per-worker statistics the positives of a
    worker are normalised together and the model can use that to cheat the contrastive task; with
    it, W workers x b give the gradients of one worker x W*b (``service/models/global_bn.py``).
    """
    return convert_to_global_bn(model) if enabled else model
