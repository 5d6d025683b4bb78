"""Build the configured loss from ``config.loss``; the one list of loss names."""

from __future__ import annotations

from service.config import LossConfig
from service.losses.base import ContrastiveLoss
from service.losses.errors import LossInputError
from service.losses.hard_negatives import DebiasedNTXentLoss, HardNegativeNTXentLoss
from service.losses.moco import MoCoLoss
from service.losses.ntxent import NTXentLoss
from service.losses.pairwise import PairwiseContrastiveLoss
from service.losses.siglip import SigLIPLoss
from service.losses.supcon import SupConLoss
from service.losses.symmetric import SymmetricInfoNCELoss
from service.losses.triplet import TripletLoss

# The allowed ``loss.name`` values and their classes; ask a class what it supports
# (``supports_learnable_temperature``, ``supports_chunking``, ``exact_views``, ``needs_labels``).
LOSS_CLASSES: dict[str, type[ContrastiveLoss]] = {
    "ntxent": NTXentLoss,
    "symmetric": SymmetricInfoNCELoss,
    "moco": MoCoLoss,
    "hard_negative": HardNegativeNTXentLoss,
    "debiased": DebiasedNTXentLoss,
    "supcon": SupConLoss,
    "triplet": TripletLoss,
    "pairwise": PairwiseContrastiveLoss,
    "siglip": SigLIPLoss,
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSS_CLASSES)
# Image–text (paired) training: the losses whose two views may be different modalities.
PAIRED_LOSS_NAMES: tuple[str, ...] = ("symmetric", "siglip")
# The losses that use ``loss.margin`` (a distance margin, no temperature).
MARGIN_LOSS_NAMES: tuple[str, ...] = ("triplet", "pairwise")


def loss_class(name: str) -> type[ContrastiveLoss]:
    """The class of ``loss.name``, or ``LossInputError`` naming the allowed names."""
    if name not in LOSS_CLASSES:
        raise LossInputError(f"loss.name must be one of {'|'.join(LOSS_NAMES)}, got {name!r}")
    return LOSS_CLASSES[name]


def check_loss_config(
    cfg: LossConfig, n_views: int | None = None, *, text_mode: bool = False
) -> None:
    """Raise ``LossInputError`` for a ``loss`` section the named loss cannot run.

    Checks the name, the options the loss must support (learnable temperature, chunking,
    ``margin``) and, given ``n_views`` (``augment.n_views``), the number of views it takes;
    with ``text_mode`` (``text.column`` set: image–text pairs) that the loss is a paired one.
    The constructors check the hyperparameter ranges. Whether the training data has the
    ``label`` column a label loss (``needs_labels``) requires is a data check. For config
    validation before any worker starts.

    >>> check_loss_config(LossConfig(name="moco"), n_views=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    service.losses.errors.LossInputError: loss.name='moco' takes exactly 2 views; got ...
    """
    name, cls = cfg.name, loss_class(cfg.name)
    if cfg.learnable_temperature and not cls.supports_learnable_temperature:
        learnable = "|".join(n for n, c in LOSS_CLASSES.items() if c.supports_learnable_temperature)
        raise LossInputError(
            f"loss.learnable_temperature is not supported by loss.name={name!r}; use {learnable}"
        )
    if cfg.chunk_size is not None and not cls.supports_chunking:
        chunked = "/".join(n for n, c in LOSS_CLASSES.items() if c.supports_chunking)
        raise LossInputError(
            f"loss.chunk_size={cfg.chunk_size} is not supported by loss.name={name!r} "
            f"(it needs per-anchor negative selections); use {chunked} or unset it"
        )
    if cfg.margin is not None and name not in MARGIN_LOSS_NAMES:
        raise LossInputError(
            f"loss.margin={cfg.margin} is used by loss.name={'|'.join(MARGIN_LOSS_NAMES)} only, "
            f"not {name!r}; unset it"
        )
    if text_mode and name not in PAIRED_LOSS_NAMES:
        raise LossInputError(
            f"loss.name={name!r} cannot train image–text pairs (text.column is set); use "
            f"{'|'.join(PAIRED_LOSS_NAMES)}"
        )
    if text_mode:
        return  # one image view and its caption: augment.n_views does not apply
    if n_views is not None and cls.exact_views is not None and n_views != cls.exact_views:
        raise LossInputError(
            f"loss.name={name!r} takes exactly {cls.exact_views} views; "
            f"got augment.n_views={n_views}"
        )


def build_loss(cfg: LossConfig, embed_dim: int, gather_distributed: bool = True) -> ContrastiveLoss:
    """The loss named by ``cfg.name``; ``embed_dim`` is the projection output size (MoCo queue).

    Every returned module exposes ``.temperature`` (float) and the training-loop hooks of
    ``ContrastiveLoss``. A learnable temperature (``symmetric``, ``siglip``; and SigLIP's bias)
    lives in the returned module's parameters: optimise them too.

    >>> from service.config import LossConfig
    >>> build_loss(LossConfig(name="ntxent", temperature=0.2), embed_dim=128)
    NTXentLoss(temperature=0.2, gather_distributed=True, chunk_size=None)
    """
    check_loss_config(cfg)
    name = cfg.name
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
            cfg.temperature,
            queue_size=cfg.moco_queue_size,
            dim=embed_dim,
            gather_distributed=gather_distributed,
            chunk_size=cfg.chunk_size,
            momentum=cfg.moco_momentum,
        )
    if name == "hard_negative":
        return HardNegativeNTXentLoss(cfg.temperature, cfg.top_k, gather_distributed)
    if name == "debiased":
        return DebiasedNTXentLoss(cfg.temperature, cfg.tau_plus, gather_distributed)
    if name == "supcon":
        return SupConLoss(cfg.temperature, gather_distributed)
    if name == "siglip":
        return SigLIPLoss(
            cfg.temperature,
            bias_init=cfg.siglip_bias_init,
            learnable_temperature=cfg.learnable_temperature,
            gather_distributed=gather_distributed,
        )
    margin = {} if cfg.margin is None else {"margin": cfg.margin}
    if name == "triplet":
        return TripletLoss(gather_distributed=gather_distributed, **margin)
    return PairwiseContrastiveLoss(gather_distributed=gather_distributed, **margin)  # "pairwise"
