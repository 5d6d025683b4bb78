"""Peers for ``bench/quality.py``: lightly's SimCLR and MoCo with **their own CIFAR-10 recipe**
(lightly's ``cifar10_benchmark.py``), trained in a plain single-process loop for a wall-clock
budget, so a table can set them beside our recipe at the same budget.

The recipe, as lightly documents it for CIFAR-10 (only the schedule is translated: their cosine
runs over 200 epochs, here over the budget):

- backbone: lightly's CIFAR ResNet-18 (``ResNetGenerator("resnet-18")``, 11.2 M parameters), built
  the way their benchmark builds it; MoCo's uses split batch norm (8 splits, their stand-in for
  shuffle BN on one device);
- views: ``SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)``, ImageNet
  normalisation (also for the evaluation, as their kNN data uses);
- SimCLR: ``SimCLRProjectionHead(512, 512, 128)``, ``NTXentLoss()`` (τ = 0.5);
- MoCo: ``MoCoProjectionHead(512, 512, 128)``, a momentum copy updated with m = 0.99, keys
  batch-shuffled, ``NTXentLoss(temperature=0.1, memory_bank_size=4096)``, symmetric loss;
- SGD, LR 0.06 x batch / 128, momentum 0.9, weight decay 5e-4, cosine to 0, no warmup, batch 128.

lightly is an optional dependency (``pip install -e '.[bench]'``): it is imported only here.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from service.train.optim import CLOCK_WARMUP_LEAD, warmup_cosine_factor

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # lightly's default normalisation (IMAGENET_NORMALIZE)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PeerRecipe:
    """One lightly method with the hyperparameters of lightly's CIFAR-10 benchmark."""

    method: str
    temperature: float
    memory_bank: int = 0  # MoCo: the queue of past keys (0: in-batch negatives only)
    key_momentum: float | None = None  # MoCo: EMA of the key encoder (None: one encoder)
    split_bn: int = 0  # MoCo: batch-norm splits of the backbone (shuffle-BN stand-in)
    batch_size: int = 128
    lr_per_128: float = 0.06
    weight_decay: float = 5e-4


RECIPES = {
    "lightly_simclr": PeerRecipe("lightly_simclr", temperature=0.5),
    "lightly_moco": PeerRecipe(
        "lightly_moco", temperature=0.1, memory_bank=4096, key_momentum=0.99, split_bn=8
    ),
}


def resnet18_backbone(split_bn: int = 0) -> nn.Module:
    """lightly's CIFAR ResNet-18 without its classifier, as their benchmark builds it (their
    ``children()[:-1]`` also drops the stem's functional ReLU: kept, it is their recipe); images
    → ``[b, 512]`` features."""
    from lightly.models import ResNetGenerator

    resnet = ResNetGenerator("resnet-18", num_splits=split_bn)
    return nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten())


class PeerModel(nn.Module):
    """The backbone, the projection head and (MoCo) their momentum copies; ``loss(x0, x1)`` is
    the method's step objective."""

    def __init__(self, recipe: PeerRecipe) -> None:
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead

        self.recipe = recipe
        self.backbone = resnet18_backbone(recipe.split_bn)
        head = MoCoProjectionHead if recipe.key_momentum is not None else SimCLRProjectionHead
        self.head = head(512, 512, 128)
        bank = (recipe.memory_bank, 128) if recipe.memory_bank else 0
        self.criterion = NTXentLoss(temperature=recipe.temperature, memory_bank_size=bank)
        self.key_backbone = self.key_head = None
        if recipe.key_momentum is not None:
            self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.key_head = copy.deepcopy(self.head).requires_grad_(False)

    def trainable(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.head.parameters())

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if self.key_backbone is None:  # SimCLR: both views through the one encoder
            return self.criterion(self.head(self.backbone(x0)), self.head(self.backbone(x1)))
        from lightly.models.utils import batch_shuffle, batch_unshuffle, update_momentum

        update_momentum(self.backbone, self.key_backbone, self.recipe.key_momentum)
        update_momentum(self.head, self.key_head, self.recipe.key_momentum)

        def query_key(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k, order = batch_shuffle(k)
            with torch.no_grad():
                key = batch_unshuffle(self.key_head(self.key_backbone(k)), order)
            return self.head(self.backbone(q)), key

        # symmetric, as lightly's benchmark: each view is once the query, once the key
        return 0.5 * (self.criterion(*query_key(x0, x1)) + self.criterion(*query_key(x1, x0)))


def train_for_budget(
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loader: DataLoader,
    optimizer: torch.optim.Optimizer, lr: float, minutes: float, warmup: float, label: str,
) -> dict[str, Any]:  # fmt: skip
    """The plain budgeted loop every peer shares: steps on ``loader``'s view pairs until
    ``minutes`` of wall clock have passed (data loading included, as ours counts it; evaluation
    outside), the LR warmed up over ``warmup`` of the budget then cosine to 0 over it, like ours.
    A progress line a minute on stderr."""
    budget, steps, images, next_report = minutes * 60, 0, 0, 60.0
    started = time.perf_counter()
    trained = 0.0
    while trained < budget:
        for (x0, x1), _ in loader:
            factor = warmup_cosine_factor(trained / budget, warmup, CLOCK_WARMUP_LEAD * warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            loss = loss_of(x0, x1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps, images = steps + 1, images + x0.shape[0]
            trained = time.perf_counter() - started
            if trained >= next_report:  # long runs show progress
                next_report += 60.0
                print(json.dumps({"peer": label, "minute": round(trained / 60, 1),
                                  "step": steps, "loss": round(loss.item(), 3),
                                  "images_per_s": round(images / trained, 1)}),
                      file=sys.stderr, flush=True)  # fmt: skip
            if trained >= budget:
                break
    return {"steps": steps, "epochs": round(images / len(loader.dataset), 2),
            "images_per_s": round(images / trained, 1)}  # fmt: skip


def train_peer(recipe: PeerRecipe, train_path: str, minutes: float, seed: int = 0) -> dict:
    """Train ``recipe`` on ``train_path`` for ``minutes`` of wall clock and return its frozen
    backbone and what it did (lightly's schedule: cosine, no warmup)."""
    from lightly.transforms import SimCLRTransform

    from service.data import ParquetImageDataset, make_dataloader

    torch.manual_seed(seed)
    model = PeerModel(recipe)
    views = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    loader = make_dataloader(
        ParquetImageDataset(train_path, views), batch_size=recipe.batch_size, shuffle=True,
        drop_last=True, num_workers=1,
    )  # fmt: skip
    lr = recipe.lr_per_128 * recipe.batch_size / 128
    optimizer = torch.optim.SGD(
        model.trainable(), lr=lr, momentum=0.9, weight_decay=recipe.weight_decay
    )
    model.train()
    done = train_for_budget(model.loss, loader, optimizer, lr, minutes, 0.0, recipe.method)
    return {"backbone": model.backbone.eval(), **done}


def peer_row(recipe: PeerRecipe) -> dict[str, Any]:
    """The recipe's settings as a flat JSON/MLflow row."""
    return {"method": recipe.method, "backbone": "lightly resnet-18", "batch": recipe.batch_size,
            "temperature": recipe.temperature, "memory_bank": recipe.memory_bank,
            "optimizer": "sgd", "lr": recipe.lr_per_128 * recipe.batch_size / 128}  # fmt: skip
