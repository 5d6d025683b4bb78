"""Contrastive losses with exact global-batch negatives across DDP ranks.

Every loss computes this rank's anchors against the autograd-gathered keys of all ranks and
returns the mean over local anchors; with equal local batches, DDP's gradient average equals the
single-process gradient of the concatenated batch. See ``distributed.py`` for why.
"""

from service.losses.chunked import masked_logsumexp
from service.losses.distributed import (
    gather_no_grad,
    gather_with_grad,
    get_rank,
    get_world_size,
)
from service.losses.errors import LossInputError, NonFiniteEmbeddingError
from service.losses.factory import LOSS_NAMES, build_loss
from service.losses.hard_negatives import DebiasedNTXentLoss, HardNegativeNTXentLoss
from service.losses.moco import MoCoLoss, MomentumEncoder, NegativeQueue, momentum_update
from service.losses.ntxent import NTXentLoss
from service.losses.symmetric import SymmetricInfoNCELoss

__all__ = [
    "LOSS_NAMES",
    "DebiasedNTXentLoss",
    "HardNegativeNTXentLoss",
    "LossInputError",
    "MoCoLoss",
    "MomentumEncoder",
    "NTXentLoss",
    "NegativeQueue",
    "NonFiniteEmbeddingError",
    "SymmetricInfoNCELoss",
    "build_loss",
    "gather_no_grad",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "masked_logsumexp",
    "momentum_update",
]
