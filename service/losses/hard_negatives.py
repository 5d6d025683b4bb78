"""NT-Xent variants that reshape the negatives: top-k hard negatives and debiased (Chuang 2020).

Both need per-anchor selections or sums over the negatives only, so they build this rank's
``[V*b, W*V*b]`` logits explicitly (no chunked mode); the anchor/key layout, gathering and
the distributed exactness argument are the same as ``NTXentLoss``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from service.losses.chunked import MASKED
from service.losses.errors import LossInputError
from service.losses.inputs import as_views, check_temperature, full_precision
from service.losses.ntxent import local_anchors_and_keys


def _logits_and_positive_columns(
    views: tuple[Tensor, ...], gather: bool, temperature: float, loss: str
) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's logits ``[V*b, m]``, each anchor's same-sample columns ``[V*b, V]`` (itself
    included, in view order) and a boolean ``[V*b, V]`` marking which of them is the anchor."""
    z, keys, offset, n_views, b = local_anchors_and_keys(views, gather, loss)
    logits = (z / temperature) @ keys.T
    device = z.device
    sample = torch.arange(b, device=device).repeat(n_views)  # anchor row -> local sample
    view = torch.arange(n_views, device=device).repeat_interleave(b)  # anchor row -> its view
    columns = offset + sample[:, None] + b * torch.arange(n_views, device=device)[None, :]
    is_self = view[:, None] == torch.arange(n_views, device=device)[None, :]
    return logits, columns, is_self


class HardNegativeNTXentLoss(nn.Module):
    """NT-Xent whose denominator keeps only each anchor's ``top_k`` most similar negatives.

    For every anchor the denominator is its V-1 positives plus its ``top_k`` highest-logit
    negatives among all W*V*b - V global negatives; the numerator averages the positives as in
    ``NTXentLoss``. With ``top_k`` equal to the number of negatives it *is* ``NTXentLoss``.
    The gradient flows through the selected logits only.

    >>> import torch
    >>> crit = HardNegativeNTXentLoss(temperature=0.5, top_k=4)
    >>> loss = crit(torch.randn(8, 16), torch.randn(8, 16))
    """

    def __init__(
        self, temperature: float = 0.5, top_k: int = 64, gather_distributed: bool = True
    ) -> None:
        super().__init__()
        self._temperature = check_temperature(temperature)
        if int(top_k) < 1:
            raise LossInputError(f"top_k must be >= 1, got {top_k}")
        self.top_k = int(top_k)
        self.gather_distributed = gather_distributed

    @property
    def temperature(self) -> float:
        return self._temperature

    def forward(self, *views: Tensor) -> Tensor:
        views = as_views(views)
        with full_precision(views):
            logits, columns, is_self = _logits_and_positive_columns(
                views, self.gather_distributed, self._temperature, "HardNegativeNTXentLoss"
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

    def extra_repr(self) -> str:
        return f"temperature={self._temperature}, top_k={self.top_k}"


class DebiasedNTXentLoss(nn.Module):
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

    def __init__(
        self, temperature: float = 0.5, tau_plus: float = 0.1, gather_distributed: bool = True
    ) -> None:
        super().__init__()
        self._temperature = check_temperature(temperature)
        if not 0.0 <= float(tau_plus) < 1.0:
            raise LossInputError(f"tau_plus must be in [0, 1), got {tau_plus}")
        self.tau_plus = float(tau_plus)
        self.gather_distributed = gather_distributed

    @property
    def temperature(self) -> float:
        return self._temperature

    def forward(self, *views: Tensor) -> Tensor:
        views = as_views(views)
        if len(views) != 2:
            raise LossInputError(f"DebiasedNTXentLoss takes exactly 2 views, got {len(views)}")
        with full_precision(views):
            logits, columns, is_self = _logits_and_positive_columns(
                views, self.gather_distributed, self._temperature, "DebiasedNTXentLoss"
            )
            positive = logits.gather(1, columns[~is_self].view(-1, 1)).squeeze(1)
            negatives = logits.scatter(1, columns, MASKED)
            n_neg = logits.shape[1] - 2
            # Shift by the row max (constant per row: detached, it cancels exactly).
            shift = torch.maximum(negatives.amax(dim=1), positive).detach()
            neg_sum = (negatives - shift[:, None]).exp().sum(dim=1)
            pos_exp = (positive - shift).exp()
            debiased = (neg_sum - self.tau_plus * n_neg * pos_exp) / (1.0 - self.tau_plus)
            log_floor = math.log(n_neg) - 1.0 / self._temperature
            tiny = torch.finfo(debiased.dtype).tiny
            # log(max(debiased, floor)) without log of a non-positive number (NaN-free grads).
            log_ng = torch.where(
                debiased > 0,
                torch.clamp(shift + debiased.clamp_min(tiny).log(), min=log_floor),
                torch.full_like(shift, log_floor),
            )
            return (torch.logaddexp(positive, log_ng) - positive).mean()

    def extra_repr(self) -> str:
        return f"temperature={self._temperature}, tau_plus={self.tau_plus}"
