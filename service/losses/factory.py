"""The loss registry: ``loss.name`` → class, the config rules, and ``build_loss``.

A loss's name and what it supports are class attributes (``name``, ``paired``, ``uses_margin``,
``supports_learnable_temperature``, ``supports_chunking``, ``exact_views``, ``needs_labels``);
its hyperparameter ranges are ``config_problems`` and its construction ``from_config``. This
module only lists the classes, so every list of names below is derived from them.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _registry(*classes: type[ContrastiveLoss]) -> dict[str, type[ContrastiveLoss]]:
    """``{cls.name: cls}`` in the given order (the order users see the names in)."""
    registry: dict[str, type[ContrastiveLoss]] = {}
    for cls in classes:
        if not cls.name or cls.name in registry:
            raise TypeError(f"{cls.__name__}.name={cls.name!r} is empty or taken")
        registry[cls.name] = cls
    return registry


# The allowed ``loss.name`` values and their classes: the one place a loss is registered.
LOSS_CLASSES: dict[str, type[ContrastiveLoss]] = _registry(
    NTXentLoss,
    SymmetricInfoNCELoss,
    MoCoLoss,
    HardNegativeNTXentLoss,
    DebiasedNTXentLoss,
    SupConLoss,
    TripletLoss,
    PairwiseContrastiveLoss,
    SigLIPLoss,
)


def loss_names(
    where: Callable[[type[ContrastiveLoss]], bool] = lambda cls: True,
) -> tuple[str, ...]:
    """The registered names whose class satisfies ``where``, in registry order.

    >>> loss_names(lambda cls: cls.paired)
    ('symmetric', 'siglip')
    """
    return tuple(name for name, cls in LOSS_CLASSES.items() if where(cls))


LOSS_NAMES: tuple[str, ...] = loss_names()
# Image–text (paired) training: the losses whose two views may be different modalities.
PAIRED_LOSS_NAMES: tuple[str, ...] = loss_names(lambda cls: cls.paired)
# The losses that use ``loss.margin`` (a distance margin, no temperature).
MARGIN_LOSS_NAMES: tuple[str, ...] = loss_names(lambda cls: cls.uses_margin)


def loss_class(name: str) -> type[ContrastiveLoss]:
    """The class of ``loss.name``, or ``LossInputError`` naming the allowed names."""
    if name not in LOSS_CLASSES:
        raise LossInputError(f"loss.name must be one of {'|'.join(LOSS_NAMES)}, got {name!r}")
    return LOSS_CLASSES[name]


def _combination_problems(cfg: LossConfig, n_views: int | None, text_mode: bool) -> list[str]:
    """The options the named (registered) loss must support, and its number of views."""
    name, cls = cfg.name, LOSS_CLASSES[cfg.name]
    found = []
    if cfg.learnable_temperature and not cls.supports_learnable_temperature:
        learnable = "|".join(loss_names(lambda c: c.supports_learnable_temperature))
        found.append(
            f"loss.learnable_temperature is not supported by loss.name={name!r}; use {learnable}"
        )
    if cfg.chunk_size is not None and not cls.supports_chunking:
        chunked = "/".join(loss_names(lambda c: c.supports_chunking))
        found.append(
            f"loss.chunk_size={cfg.chunk_size} is not supported by loss.name={name!r} "
            f"(it needs per-anchor negative selections); use {chunked} or unset it"
        )
    if cfg.margin is not None and not cls.uses_margin:
        found.append(
            f"loss.margin={cfg.margin} is used by loss.name={'|'.join(MARGIN_LOSS_NAMES)} only, "
            f"not {name!r}; unset it"
        )
    if text_mode and not cls.paired:
        found.append(
            f"loss.name={name!r} cannot train image–text pairs (text.column is set); use "
            f"{'|'.join(PAIRED_LOSS_NAMES)}"
        )
    # In text mode one image view and its caption: augment.n_views does not apply.
    if not text_mode and n_views is not None and cls.exact_views not in (None, n_views):
        found.append(
            f"loss.name={name!r} takes exactly {cls.exact_views} views; "
            f"got augment.n_views={n_views}"
        )
    return found


def check_loss_config(
    cfg: LossConfig, n_views: int | None = None, *, text_mode: bool = False
) -> None:
    """Raise ``LossInputError`` for a ``loss`` section the named loss cannot run.

    Checks the name, the options the loss must support (learnable temperature, chunking,
    ``margin``) and, given ``n_views`` (``augment.n_views``), the number of views it takes;
    with ``text_mode`` (``text.column`` set: image–text pairs) that the loss is a paired one.
    The hyperparameter ranges are the class's ``config_problems`` (``loss_config_problems``
    gathers both without raising). Whether the training data has the ``label`` column a label
    loss (``needs_labels``) requires is a data check.

    >>> check_loss_config(LossConfig(name="moco"), n_views=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    service.losses.errors.LossInputError: loss.name='moco' takes exactly 2 views; got ...
    """
    loss_class(cfg.name)
    found = _combination_problems(cfg, n_views, text_mode)
    if found:
        raise LossInputError(found[0])


def loss_config_problems(
    cfg: LossConfig, n_views: int | None = None, *, text_mode: bool = False
) -> list[str]:
    """Every problem of the ``loss`` section, naming its keys; builds nothing (for pre-flight).

    ``check_loss_config``'s rules, then the named class's hyperparameter ranges.

    >>> loss_config_problems(LossConfig(name="hard_negative", temperature=-1.0, top_k=0))
    ['loss.temperature must be > 0 and finite, got -1.0', 'loss.top_k must be >= 1, got 0']
    """
    try:
        cls = loss_class(cfg.name)
    except LossInputError as exc:
        return [str(exc)]
    return _combination_problems(cfg, n_views, text_mode) + cls.config_problems(cfg)


def resolved_loss_config(cfg: LossConfig) -> LossConfig:
    """``cfg`` with the named loss's defaults for the keys left unset (``with_defaults``): what
    the loss is built with, e.g. for tags that record it. An unknown name returns ``cfg``.

    >>> resolved_loss_config(LossConfig(name="siglip")).learnable_temperature
    True
    """
    cls = LOSS_CLASSES.get(cfg.name)
    return cfg if cls is None else cls.with_defaults(cfg)


def build_loss(cfg: LossConfig, embed_dim: int, gather_distributed: bool = True) -> ContrastiveLoss:
    """The loss named by ``cfg.name``; ``embed_dim`` is the projection output size (MoCo queue).

    Every returned module exposes ``.temperature`` (float) and the training-loop hooks of
    ``ContrastiveLoss``. A learnable temperature (``symmetric``, ``siglip``; and SigLIP's bias)
    lives in the returned module's parameters: optimise them too. The constructor checks the
    hyperparameter ranges (``LossInputError``), so nothing else re-checks them here.

    >>> from service.config import LossConfig
    >>> build_loss(LossConfig(name="ntxent", temperature=0.2), embed_dim=128)
    NTXentLoss(temperature=0.2, gather_distributed=True, chunk_size=None)
    """
    check_loss_config(cfg)
    return loss_class(cfg.name).from_config(cfg, embed_dim, gather_distributed)
