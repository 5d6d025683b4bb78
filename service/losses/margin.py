"""What the margin losses share (triplet, pairwise): a margin, labels, and the distances of
this rank's anchors to every embedding of the global batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from torch import Tensor

from service.losses.base import ContrastiveLoss
from service.losses.errors import LossInputError
from service.losses.inputs import local_anchors_and_keys, problems

if TYPE_CHECKING:
    from service.config import LossConfig


def check_margin(margin: float, name: str = "margin") -> float:
    """``margin`` as a positive finite float, or ``LossInputError``."""
    value = float(margin)
    if not (value > 0 and value < float("inf")):
        raise LossInputError(f"{name} must be > 0 and finite, got {margin!r}")
    return value


def unit_distances(z: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """``(squared, euclidean)`` distances ``[n, m]`` between L2-normalised rows.

    ``|z - k|^2 = 2 - 2 z.k`` for unit vectors, in [0, 4]. The square root is taken of the
    distance clamped at 1e-12: identical rows get distance 1e-6 and a zero gradient instead of
    the infinite one of ``sqrt`` at 0.
    """
    squared = (2.0 - 2.0 * (z @ keys.T)).clamp_min(0.0)
    return squared, squared.clamp_min(1e-12).sqrt()


class MarginLoss(ContrastiveLoss):
    """Base of the label losses compared by Euclidean distance against a ``margin``.

    There is no temperature (``temperature`` is reported as 1; ``loss.temperature`` is not
    used). :meth:`pair_distances` gives the masks and distances of this rank's V*b anchors
    against all W*V*b embeddings of the gathered batch, so each loss is its few lines of maths
    on top. ``loss.margin: null`` keeps the subclass's default margin.
    """

    needs_labels = True
    uses_margin = True

    def __init__(self, margin: float, gather_distributed: bool = True) -> None:
        super().__init__(1.0, gather_distributed)
        self.margin = check_margin(margin)

    @classmethod
    def config_problems(cls, cfg: LossConfig) -> list[str]:
        if cfg.margin is None:
            return []
        return problems((check_margin, cfg.margin, "loss.margin"))

    @classmethod
    def from_config(cls, cfg: LossConfig, embed_dim: int, gather_distributed: bool) -> Self:
        margin = {} if cfg.margin is None else {"margin": cfg.margin}
        return cls(gather_distributed=gather_distributed, **margin)

    def pair_distances(
        self, views: tuple[Tensor, ...], labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(positive, negative, squared, distance)``, each ``[V*b, W*V*b]``: same-label pairs
        (the anchor itself excluded), other-label pairs, squared and Euclidean distances."""
        batch = self.check(views)
        z, keys, _ = local_anchors_and_keys(views, batch)
        positive, negative = self.label_masks(labels, batch, len(views))
        squared, distance = unit_distances(z, keys)
        return positive, negative, squared, distance

    def repr_fields(self) -> dict[str, object]:
        return {"margin": self.margin}
