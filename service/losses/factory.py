"""Build the configured loss from ``config.loss``."""

from __future__ import annotations

from torch import nn

from service.config import LossConfig
from service.losses.errors import LossInputError
from service.losses.hard_negatives import DebiasedNTXentLoss, HardNegativeNTXentLoss
from service.losses.moco import MoCoLoss
from service.losses.ntxent import NTXentLoss
from service.losses.symmetric import SymmetricInfoNCELoss

LOSS_NAMES = ("ntxent", "symmetric", "moco", "hard_negative", "debiased")


def build_loss(cfg: LossConfig, embed_dim: int, gather_distributed: bool = True) -> nn.Module:
    """The loss named by ``cfg.name``; ``embed_dim`` is the projection output size (MoCo queue).

    Every returned module exposes ``.temperature`` (float). A learnable temperature
    (``symmetric`` only) lives in the returned module's parameters: optimise them too.

    >>> from service.config import LossConfig
    >>> build_loss(LossConfig(name="ntxent", temperature=0.2), embed_dim=128)
    NTXentLoss(temperature=0.2, gather_distributed=True, chunk_size=None)
    """
    name = cfg.name
    if cfg.learnable_temperature and name != "symmetric":
        raise LossInputError(
            f"loss.learnable_temperature is only supported by loss.name='symmetric', got {name!r}"
        )
    if cfg.chunk_size is not None and name not in {"ntxent", "symmetric", "moco"}:
        raise LossInputError(
            f"loss.chunk_size={cfg.chunk_size} is not supported by loss.name={name!r} "
            "(it needs per-anchor negative selections); use ntxent/symmetric/moco or unset it"
        )
    if name == "ntxent":
        return NTXentLoss(cfg.temperature, gather_distributed, cfg.chunk_size)
    if name == "symmetric":
        return SymmetricInfoNCELoss(
            cfg.temperature,
            learnable_temperature=cfg.learnable_temperature,
            gather_distributed=gather_distributed,
            chunk_size=cfg.chunk_size,
        )
    if name == "moco":
        return MoCoLoss(
            cfg.temperature, cfg.moco_queue_size, embed_dim, gather_distributed, cfg.chunk_size
        )
    if name == "hard_negative":
        return HardNegativeNTXentLoss(cfg.temperature, cfg.top_k, gather_distributed)
    if name == "debiased":
        return DebiasedNTXentLoss(cfg.temperature, cfg.tau_plus, gather_distributed)
    raise LossInputError(f"loss.name must be one of {'|'.join(LOSS_NAMES)}, got {name!r}")
