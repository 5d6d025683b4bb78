"""The registered architectures, written again without ``service``: this file travels with every
registered version (MLflow ``code_paths``) so the version loads where only MLflow, torch and
torchvision are installed.

The modules here have the same parameter names and forward passes as ``service.models``
(``SmallCNN``, the ResNets with the CIFAR stem, ``ProjectionHead``, ``TextTransformer``), so the
run's ``state_dict`` loads into them strictly. Registration checks that the portable copy gives
the trained encoder's outputs (``service.registry.register``) and
``tests/test_registry_pyfunc.py`` that each architecture stays in step with ``service.models``.

    >>> build_backbone({"arch": "small_cnn", "width": 8})(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """``service.models.backbones.SmallCNN``: conv-BN-ReLU stages, max-pool between them."""

    def __init__(self, widths: tuple[int, ...], depth: int = 1) -> None:
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


def _resnet(arch: str, cifar_stem: bool) -> nn.Module:
    from torchvision import models

    model = getattr(models, arch)(weights=None)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.out_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def build_backbone(model_config: dict[str, Any]) -> nn.Module:
    """The backbone a run's ``model.*`` config (``encoder.json`` ``model_config``) describes."""
    arch = model_config["arch"]
    if arch == "small_cnn":
        width = int(model_config.get("width", 32))
        depth = int(model_config.get("depth", 1))  # versions registered before depth existed: 1
        return SmallCNN(tuple(width * 2**i for i in range(4)), depth)
    if arch in ("resnet18", "resnet50"):
        return _resnet(arch, bool(model_config.get("cifar_stem", True)))
    raise ValueError(f"unknown backbone {arch!r}: this model needs a newer contrastive_pyfunc")


class ProjectionHead(nn.Module):
    """``service.models.heads.ProjectionHead``: (Linear-BN-ReLU) x (layers - 1), then Linear."""

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, batch_norm: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(d, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TextTransformer(nn.Module):
    """``service.models.text.TextTransformer``: pre-LN causal Transformer pooled at end-of-text."""

    def __init__(
        self, vocab_size: int, context_length: int, width: int, layers: int, heads: int
    ) -> None:
        super().__init__()
        self.context_length, self.pad_id = context_length, 0
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        block = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.transformer = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        mask = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.transformer(x, mask=self.causal_mask[:length, :length], is_causal=True)
        x = self.ln_final(x)
        positions = torch.arange(length, device=tokens.device).expand_as(tokens)
        eot = torch.where(tokens != self.pad_id, positions, -1).amax(dim=1).clamp(min=0)
        return x[torch.arange(x.shape[0], device=x.device), eot]


class Towers(nn.Module):
    """The image–text parts beside the backbone, named as in ``ImageTextModel`` (``head``,
    ``text_encoder``, ``text_head``) so ``towers.safetensors`` loads strictly."""

    def __init__(self, model_config: dict[str, Any], text_config: dict[str, Any], in_dim: int):
        super().__init__()
        m, t = model_config, text_config

        def head(dim: int) -> ProjectionHead:
            return ProjectionHead(
                dim, m["proj_hidden_dim"], m["proj_out_dim"], m["proj_layers"],
                m.get("proj_batch_norm", True),
            )  # fmt: skip

        self.head = head(in_dim)
        self.text_encoder = TextTransformer(
            t["vocab_size"], t["context_length"], t["width"], t["layers"], t["heads"]
        )
        self.text_head = head(t["width"])


# safetensors dtype names → torch dtypes (the ones a state_dict of these modules holds)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, read without the ``safetensors`` package (its format
    is an 8-byte little-endian header length, a JSON header, then the raw bytes).

    >>> import tempfile
    >>> from safetensors.torch import save_file
    >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
    >>> save_file({"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(7)}, str(path))
    >>> {k: v.tolist() for k, v in sorted(read_safetensors(path).items())}
    {'n': 7, 'w': [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]}
    """
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    body = memoryview(data)[8 + size :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        raw = np.frombuffer(body[start:end], dtype=np.uint8).copy()
        flat = torch.from_numpy(raw).view(dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors
