"""Encoder backbones, by name: ``[b, 3, H, W]`` images → ``[b, out_dim]`` features.

The backbone is the product: it is what gets registered and served; projection heads only live in
training checkpoints. Every backbone exposes ``out_dim`` so heads and probes size themselves.

``cifar_stem=True`` swaps the ImageNet stem (7x7 stride-2 conv + max-pool, a 4x downsample that
leaves 8x8 maps from 32 px inputs) for a 3x3 stride-1 conv without max-pool, the standard change
for 32 px data (SimCLR's CIFAR-10 setup).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet18, resnet50

from service.config import ModelConfig


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU stages (32-64-128-256 channels, 2x down-sampling between them) and global
    average pooling: ~0.4 M parameters, ~16 M MACs per 32 px image. Fast enough for CPU demos and
    tests, big enough to learn useful CIFAR features in a couple of epochs. ``depth`` stacks that
    many conv-BN-ReLU layers per stage (depth 1 keeps the parameter names of older checkpoints).

    >>> SmallCNN()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 256])
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), depth: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(depth):
                layers += _conv_bn_relu(c_in, width)
                c_in = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _resnet(factory: Callable[..., nn.Module], cifar_stem: bool) -> nn.Module:
    model = factory(weights=None)  # never downloads: pretraining starts from scratch
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.out_dim = model.fc.in_features  # 512 (resnet18) / 2048 (resnet50)
    model.fc = nn.Identity()  # features, not ImageNet logits
    return model


def _small_cnn(cifar_stem: bool, width: int, depth: int) -> nn.Module:
    # no stem to change: it is built for small images
    return SmallCNN(tuple(width * 2**i for i in range(4)), depth)


# name -> (cifar_stem, width, depth) -> backbone; width and depth only shape the small CNN
# (model_config_problems)
BACKBONES: dict[str, Callable[[bool, int, int], nn.Module]] = {
    "small_cnn": _small_cnn,
    "resnet18": lambda cifar_stem, width, depth: _resnet(resnet18, cifar_stem),
    "resnet50": lambda cifar_stem, width, depth: _resnet(resnet50, cifar_stem),
}
DEFAULT_WIDTH = ModelConfig.width
DEFAULT_DEPTH = ModelConfig.depth


def build_backbone(
    arch: str, cifar_stem: bool = True, width: int = DEFAULT_WIDTH, depth: int = DEFAULT_DEPTH
) -> nn.Module:
    """Build a randomly initialised backbone by name (see ``BACKBONES``); it has ``.out_dim``.

    >>> build_backbone("resnet18").out_dim
    512
    """
    if arch not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[arch](cifar_stem, width, depth)


def model_config_problems(cfg: ModelConfig) -> list[str]:
    """What is wrong with the ``model`` section (empty when nothing)."""
    problems = []
    for key, default in (("width", DEFAULT_WIDTH), ("depth", DEFAULT_DEPTH)):  # small CNN only
        value = getattr(cfg, key)
        if value < 1:
            problems.append(f"model.{key} must be >= 1, got {value}")
        elif value != default and cfg.arch != "small_cnn":
            problems.append(
                f"model.{key} shapes only the small_cnn backbone; {cfg.arch} has a fixed {key} "
                f"(remove model.{key} or set it to {default})"
            )
    for key in ("proj_hidden_dim", "proj_out_dim", "proj_layers"):
        if getattr(cfg, key) < 1:
            problems.append(f"model.{key} must be >= 1, got {getattr(cfg, key)}")
    return problems
