"""Contrastive losses with exact global-batch negatives across DDP ranks.

Every loss computes this rank's anchors against the autograd-gathered keys of all ranks and
returns the mean over local anchors; with equal local batches, DDP's gradient average equals the
single-process gradient of the concatenated batch. See ``distributed.py`` for why.
"""

from service.losses.base import ContrastiveLoss
from service.losses.chunked import masked_logsumexp
from service.losses.distributed import (
    SIMULATED_BUGS,
    average_gradients,
    broadcast_from_rank0,
    gather_no_grad,
    gather_with_grad,
    get_rank,
    get_world_size,
    simulated_bug,
)
from service.losses.errors import LossInputError, NonFiniteEmbeddingError
from service.losses.factory import (
    LOSS_CLASSES,
    LOSS_NAMES,
    MARGIN_LOSS_NAMES,
    PAIRED_LOSS_NAMES,
    build_loss,
    check_loss_config,
    loss_class,
    loss_config_problems,
    loss_names,
    resolved_loss_config,
)
from service.losses.hard_negatives import DebiasedNTXentLoss, HardNegativeNTXentLoss
from service.losses.initial import FirstBatch, InitialLossReport, judge_initial_loss
from service.losses.margin import MarginLoss
from service.losses.moco import (
    MoCoLoss,
    MomentumEncoder,
    NegativeQueue,
    momentum_update,
    shuffled_forward,
)
from service.losses.ntxent import NTXentLoss
from service.losses.pairwise import PairwiseContrastiveLoss
from service.losses.siglip import SigLIPLoss
from service.losses.supcon import SupConLoss
from service.losses.symmetric import SymmetricInfoNCELoss
from service.losses.temperature import LearnableTemperatureLoss
from service.losses.triplet import TripletLoss

__all__ = [
    "FirstBatch",
    "InitialLossReport",
    "judge_initial_loss",
    "resolved_loss_config",
    "MarginLoss",
    "LearnableTemperatureLoss",
    "LOSS_CLASSES",
    "LOSS_NAMES",
    "MARGIN_LOSS_NAMES",
    "PAIRED_LOSS_NAMES",
    "ContrastiveLoss",
    "DebiasedNTXentLoss",
    "HardNegativeNTXentLoss",
    "LossInputError",
    "MoCoLoss",
    "MomentumEncoder",
    "NTXentLoss",
    "NegativeQueue",
    "NonFiniteEmbeddingError",
    "PairwiseContrastiveLoss",
    "SigLIPLoss",
    "SupConLoss",
    "SymmetricInfoNCELoss",
    "TripletLoss",
    "average_gradients",
    "broadcast_from_rank0",
    "build_loss",
    "check_loss_config",
    "gather_no_grad",
    "gather_with_grad",
    "simulated_bug",
    "SIMULATED_BUGS",
    "get_rank",
    "get_world_size",
    "loss_class",
    "loss_config_problems",
    "loss_names",
    "masked_logsumexp",
    "momentum_update",
    "shuffled_forward",
]
