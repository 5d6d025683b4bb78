"""NT-Xent variants that reshape the negatives: top-k hard negatives and debiased (Chuang 2020).

Both need per-anchor selections or sums over the negatives only, so they build this rank's
``[V*b, W*V*b]`` logits explicitly (no chunked mode); the anchor/key layout, gathering and
the distributed exactness argument are the same as ``NTXentLoss``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Self

import torch
from torch import Tensor

from service.losses.base import ContrastiveLoss
from service.losses.chunked import MASKED
from service.losses.errors import LossInputError
from service.losses.initial import FirstBatch
from service.losses.inputs import Batch, local_anchors_and_keys

if TYPE_CHECKING:
    from service.config import LossConfig


def check_top_k(top_k: int, name: str = "top_k") -> int:
    """``top_k`` as an int >= 1, or ``LossInputError``."""
    if int(top_k) < 1:
        raise LossInputError(f"{name} must be >= 1, got {top_k}")
    return int(top_k)


def check_tau_plus(tau_plus: float, name: str = "tau_plus") -> float:
    """``tau_plus`` (a class prior) as a float in [0, 1), or ``LossInputError``."""
    if not 0.0 <= float(tau_plus) < 1.0:
        raise LossInputError(f"{name} must be in [0, 1), got {tau_plus}")
    return float(tau_plus)


def _logits_and_positive_columns(
    views: tuple[Tensor, ...], batch: Batch, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's logits ``[V*b, m]``, each anchor's same-sample columns ``[V*b, V]`` (itself
    included, in view order) and a boolean ``[V*b, V]`` marking which of them is the anchor."""
    z, keys, offset = local_anchors_and_keys(views, batch)
    logits = (z / temperature) @ keys.T
    n_views, b, device = len(views), batch.local, z.device
    sample = torch.arange(b, device=device).repeat(n_views)  # anchor row -> local sample
    view = torch.arange(n_views, device=device).repeat_interleave(b)  # anchor row -> its view
    columns = offset + sample[:, None] + b * torch.arange(n_views, device=device)[None, :]
    is_self = view[:, None] == torch.arange(n_views, device=device)[None, :]
    return logits, columns, is_self


class HardNegativeNTXentLoss(ContrastiveLoss):
    """NT-Xent whose denominator keeps only each anchor's ``top_k`` most similar negatives.

    For every anchor the denominator is its V-1 positives plus its ``top_k`` highest-logit
    negatives among all W*V*b - V global negatives; the numerator averages the positives as in
    ``NTXentLoss``. With ``top_k`` equal to the number of negatives it *is* ``NTXentLoss``.
    The gradient flows through the selected logits only.

    >>> import torch
    >>> crit = HardNegativeNTXentLoss(temperature=0.5, top_k=4)
    >>> loss = crit(torch.randn(8, 16), torch.randn(8, 16))
    """

    name = "hard_negative"
    checked_keys = ((check_top_k, "top_k"),)

    def __init__(
        self, temperature: float = 0.5, top_k: int = 64, gather_distributed: bool = True
    ) -> None:
        super().__init__(temperature, gather_distributed)
        self.top_k = check_top_k(top_k)

    @classmethod
    def from_config(cls, cfg: LossConfig, embed_dim: int, gather_distributed: bool) -> Self:
        cfg = cls.with_defaults(cfg)
        return cls(cfg.temperature, cfg.top_k, gather_distributed)

    def compute(self, views: tuple[Tensor, ...]) -> Tensor:
        logits, columns, is_self = _logits_and_positive_columns(
            views, self.check(views), self.temperature
        )
        n_views = columns.shape[1]
        n_negatives = logits.shape[1] - n_views
        if self.top_k > n_negatives:
            raise LossInputError(
                f"HardNegativeNTXentLoss: top_k={self.top_k} exceeds the {n_negatives} "
                f"negatives per anchor of this global batch ({logits.shape[1]} embeddings, "
                f"{n_views} views); lower loss.top_k or raise the batch size"
            )
        # The anchor's own column and its positives are never negatives.
        negatives = logits.scatter(1, columns, MASKED)
        hard = negatives.topk(self.top_k, dim=1).values
        positives = logits.gather(1, columns[~is_self].view(-1, n_views - 1))
        lse = torch.logsumexp(torch.cat([positives, hard], dim=1), dim=1)
        return (lse - positives.mean(dim=1)).mean()

    def repr_fields(self) -> dict[str, object]:
        return {"top_k": self.top_k}

    def expected_initial_loss(
        self, n_views: int, global_batch: int, first: FirstBatch | None = None
    ) -> float | None:
        # The positive among min(top_k, negatives) equally scored hard negatives; with a batch,
        # the spread of its top_k / negatives most similar negatives around the mean.
        negatives = n_views * global_batch - 2
        k = min(self.top_k, negatives)
        spread = first.spread(self.temperature, k / negatives) if first is not None else 0.0
        return math.log(k + 1) + spread


class DebiasedNTXentLoss(ContrastiveLoss):
    """Debiased contrastive loss (Chuang et al., NeurIPS 2020), two views.

    Corrects the negatives' partition sum for same-class "negatives" with class prior
    ``tau_plus``: with N = 2*B_global - 2 negatives,
    ``Ng = max((sum_neg exp(s/T) - tau_plus * N * exp(pos/T)) / (1 - tau_plus), N * e^{-1/T})``
    and ``loss = -log(exp(pos/T) / (exp(pos/T) + Ng))``, averaged over this rank's anchors.
    Evaluated in log space (shifted by the row maximum) so small temperatures do not overflow;
    ``tau_plus=0`` gives ``NTXentLoss``.

    >>> import torch
    >>> crit = DebiasedNTXentLoss(temperature=0.5, tau_plus=0.1)
    >>> loss = crit(torch.randn(8, 16), torch.randn(8, 16))
    """

    name = "debiased"
    checked_keys = ((check_tau_plus, "tau_plus"),)
    exact_views = 2

    def __init__(
        self, temperature: float = 0.5, tau_plus: float = 0.1, gather_distributed: bool = True
    ) -> None:
        super().__init__(temperature, gather_distributed)
        self.tau_plus = check_tau_plus(tau_plus)

    @classmethod
    def from_config(cls, cfg: LossConfig, embed_dim: int, gather_distributed: bool) -> Self:
        cfg = cls.with_defaults(cfg)
        return cls(cfg.temperature, cfg.tau_plus, gather_distributed)

    def compute(self, views: tuple[Tensor, ...]) -> Tensor:
        logits, columns, is_self = _logits_and_positive_columns(
            views, self.check(views), self.temperature
        )
        positive = logits.gather(1, columns[~is_self].view(-1, 1)).squeeze(1)
        negatives = logits.scatter(1, columns, MASKED)
        n_neg = logits.shape[1] - 2
        # Shift by the row max (constant per row: detached, it cancels exactly).
        shift = torch.maximum(negatives.amax(dim=1), positive).detach()
        neg_sum = (negatives - shift[:, None]).exp().sum(dim=1)
        pos_exp = (positive - shift).exp()
        debiased = (neg_sum - self.tau_plus * n_neg * pos_exp) / (1.0 - self.tau_plus)
        log_floor = math.log(n_neg) - 1.0 / self.temperature
        tiny = torch.finfo(debiased.dtype).tiny
        # log(max(debiased, floor)) without log of a non-positive number (NaN-free grads).
        log_ng = torch.where(
            debiased > 0,
            torch.clamp(shift + debiased.clamp_min(tiny).log(), min=log_floor),
            torch.full_like(shift, log_floor),
        )
        return (torch.logaddexp(positive, log_ng) - positive).mean()

    def repr_fields(self) -> dict[str, object]:
        return {"tau_plus": self.tau_plus}
