"""Linear evaluation protocol: a linear classifier trained on frozen, precomputed features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.console import Progress


def linear_probe_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 30,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Train ``nn.Linear`` on standardised features with AdamW + cosine LR; return test top-1.

    Features are standardised with the train split's statistics (a common, cheap stand-in for
    the BatchNorm-without-affine layer some protocols put before the classifier).

    Deterministic: ``seed`` fixes both the classifier's initialisation and the batch order, and
    the global RNG is left untouched, so the same features always give the same accuracy.
    """
    generator = torch.Generator().manual_seed(seed)
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True).clamp_min(1e-6)
    x_train = (train_features.float() - mean) / std
    x_test = (test_features.float() - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws its init from the global RNG
        torch.manual_seed(seed)
        classifier = nn.Linear(x_train.shape[1], num_classes)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-x_train.shape[0] // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    with Progress(epochs, "linear probe", unit="epochs") as progress:
        for _ in progress.iterate(range(epochs)):
            order = torch.randperm(x_train.shape[0], generator=generator)
            for start in range(0, x_train.shape[0], batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(classifier(x_train[idx]), train_labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    with torch.no_grad():
        predicted = classifier(x_test).argmax(dim=1)
    return float((predicted == test_labels).float().mean())
