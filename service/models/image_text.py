"""``ImageTextModel``: two towers (image backbone + head, text Transformer + head) projecting
images and captions into one joint embedding space (CLIP-style pretraining).

The loss (``symmetric`` or ``siglip``) takes the two projections as its two views:
``paired_views = True`` tells ``ContrastiveLoss.forward_views`` to call ``model(images, tokens)``
instead of concatenating views into one forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.config import Config
from service.models.backbones import build_backbone
from service.models.heads import ProjectionHead
from service.models.text import TextTransformer


class ImageTextModel(nn.Module):
    """``forward(images, tokens) -> (z_image, z_text)`` (unnormalised projections, for the loss);
    ``encode_image`` / ``encode_text``: L2-normalised joint-space embeddings (evaluation, serving);
    ``embed(images)``: backbone features (the registered image encoder, as for SimCLR).

    The image backbone is ``self.backbone`` and its projection ``self.head``: the same names as
    ``ContrastiveModel``, so image-only code (kNN monitor, ``load_encoder``) reads it unchanged.

    >>> from service.models.backbones import SmallCNN
    >>> model = ImageTextModel(SmallCNN(), ProjectionHead(256, 256, 64, num_layers=1),
    ...                        TextTransformer(50, 8, 32, 1, 2), ProjectionHead(32, 32, 64, 1))
    >>> images, tokens = torch.zeros(3, 3, 32, 32), torch.tensor([[3, 4, 49] + [0] * 5] * 3)
    >>> [tuple(z.shape) for z in model(images, tokens)]
    [(3, 64), (3, 64)]
    >>> round(float(model.encode_text(tokens).detach().norm(dim=1)[0]), 4)
    1.0
    """

    paired_views = True

    def __init__(
        self,
        backbone: nn.Module,
        image_head: nn.Module,
        text_encoder: nn.Module,
        text_head: nn.Module,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = image_head
        self.text_encoder = text_encoder
        self.text_head = text_head
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    @property
    def image_head(self) -> nn.Module:
        return self.head

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[b, backbone.out_dim]`` (what image-only evaluation uses)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def project_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def project_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_head(self.text_encoder(tokens))

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.project_image(images), self.project_text(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image_with_features(images)[0]

    def encode_image_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_image`` and the backbone features it went through, from one forward (the
        image–text monitor's health metrics use both)."""
        features = self.embed(images)
        return F.normalize(self.head(features).float(), dim=1), features

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project_text(tokens).float(), dim=1)


def build_image_text_model(config: Config) -> ImageTextModel:
    """Image tower ``config.model`` (backbone + projection head) and text tower ``config.text``
    (vocabulary ``text.vocab_size``, the tokenizer's upper bound) + a head of the same shape."""
    m, t = config.model, config.text
    backbone = build_backbone(m.arch, cifar_stem=m.cifar_stem, width=m.width, depth=m.depth)
    text_encoder = TextTransformer(t.vocab_size, t.context_length, t.width, t.layers, t.heads)

    def head(in_dim: int) -> ProjectionHead:
        return ProjectionHead(
            in_dim, m.proj_hidden_dim, m.proj_out_dim, m.proj_layers, m.proj_batch_norm
        )

    return ImageTextModel(
        backbone, head(backbone.out_dim), text_encoder, head(t.width), m.channels_last
    )


def text_model_problems(config: Config) -> list[str]:
    """The text tower's shape rules (``config.text``); empty outside text mode."""
    t = getattr(config, "text", None)
    if t is None or not t.column:
        return []
    problems = [
        f"text.{key} must be >= 1, got {getattr(t, key)}"
        for key in ("width", "layers", "heads")  # context/vocab: data.checks (tokenizer side)
        if getattr(t, key) < 1
    ]
    if t.width >= 1 and t.heads >= 1 and t.width % t.heads:
        problems.append(f"text.width ({t.width}) must be divisible by text.heads ({t.heads})")
    return problems
