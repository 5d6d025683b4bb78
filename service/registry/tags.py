"""The tags that describe a registered encoder version: written once, here.

Search and compare versions in the MLflow UI by these (dataset, method, temperature, ...).

    >>> from service.config import Config
    >>> tags = version_tags(Config(), 0.41234, None)
    >>> tags["method"], tags["knn_top1"], tags["input_size"], tags["embedding_dim"]
    ('ntxent', '0.4123', '32', '')
"""

from __future__ import annotations

from torch import nn

from service.config import Config
from service.losses.factory import resolved_loss_config


def version_tags(config: Config, knn: float | None, backbone: nn.Module | None) -> dict[str, str]:
    """What the encoder was trained on and how; ``knn`` (kNN top-1) and ``backbone.out_dim`` are
    left empty when unknown."""
    return {
        "dataset": config.data.train,
        "method": config.loss.name,
        # unset (null) in the config: the loss's own default, which it trained with
        "temperature": str(resolved_loss_config(config.loss).temperature),
        "augment_strength": str(config.augment.strength),
        "knn_top1": "" if knn is None else f"{knn:.4f}",
        "embedding_dim": str(getattr(backbone, "out_dim", "")),
        "arch": config.model.arch,
        "input_size": str(config.data.image_size),
        "normalize_mean": ",".join(map(str, config.augment.mean)),
        "normalize_std": ",".join(map(str, config.augment.std)),
    }
