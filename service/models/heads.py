"""Projection head: the MLP between backbone features and the contrastive loss.

SimCLR showed the loss is best computed on a projection ``g(h)`` while the representation ``h``
(the backbone output) is what transfers, so the head is discarded after pretraining.
"""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """``num_layers`` linear layers: (Linear-BN-ReLU) x (num_layers - 1), then Linear.

    ``num_layers=1`` is a single linear projection. Hidden linears have no bias when followed by
    BatchNorm (BN's shift makes it redundant).

    >>> ProjectionHead(512, 2048, 128, num_layers=3)(torch.zeros(4, 512)).shape
    torch.Size([4, 128])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"model.proj_layers must be >= 1, got {num_layers}")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(f"head dims must be >= 1, got {in_dim}, {hidden_dim}, {out_dim}")
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
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
