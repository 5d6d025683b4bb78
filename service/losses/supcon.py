"""Supervised contrastive loss (SupCon, Khosla et al. 2020, L_out) over the global batch."""

from __future__ import annotations

import math

from torch import Tensor

from service.losses.base import ContrastiveLoss
from service.losses.chunked import masked_logsumexp
from service.losses.initial import FirstBatch
from service.losses.inputs import local_anchors_and_keys


class SupConLoss(ContrastiveLoss):
    """SupCon's L_out: every other embedding with the anchor's label is a positive.

    ``loss = crit(z1, z2, ..., labels=y)``: each view is ``[b, d]`` (this rank's batch), ``y`` is
    ``[b]`` integer classes; every view of sample i has label ``y[i]``. For each of the V*b
    local anchors ``a`` (L2-normalised), with ``P(a)`` every *other* embedding of any view on any
    rank that has ``a``'s label (so at least the other views of the same image)::

        l(a) = -1/|P(a)| sum_{p in P(a)} log( exp(s_ap/T) / sum_{k != a} exp(s_ak/T) )

    The denominator runs over every other embedding of the global batch. The result is the mean
    over this rank's anchors; with the autograd gather of the embeddings, the plain gather of
    the labels and DDP's gradient average this equals one process on the whole global batch.
    With every label distinct this is ``NTXentLoss`` (the other views are the only positives).

    >>> import torch
    >>> z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    >>> labels = torch.tensor([0, 1, 2, 0, 1, 2])
    >>> loss = SupConLoss(temperature=0.1)(z1, z2, labels=labels)
    >>> loss.shape
    torch.Size([])
    >>> from service.losses.ntxent import NTXentLoss
    >>> distinct = SupConLoss(0.5)(z1, z2, labels=torch.arange(6))
    >>> torch.allclose(distinct, NTXentLoss(0.5)(z1, z2))
    True
    """

    name = "supcon"
    needs_labels = True

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__(temperature, gather_distributed)

    def compute(self, views: tuple[Tensor, ...], labels: Tensor) -> Tensor:  # type: ignore[override]
        batch = self.check(views)
        z, keys, offset = local_anchors_and_keys(views, batch)
        positive, _ = self.label_masks(labels, batch, len(views))
        x = z / self.temperature
        lse = masked_logsumexp(x, keys, self_offset=offset)
        mean_positive = ((x @ keys.T) * positive).sum(dim=1) / positive.sum(dim=1)
        return (lse - mean_positive).mean()

    def expected_initial_loss(
        self, n_views: int, global_batch: int, first: FirstBatch | None = None
    ) -> float | None:
        # Indistinguishable embeddings: every logit is alike, each term is log(V*B - 1) (+ the
        # batch's spread: same-class positives score like negatives at init).
        spread = first.spread(self.temperature) if first is not None else 0.0
        return math.log(n_views * global_batch - 1) + spread
