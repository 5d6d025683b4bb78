"""Margin (pairwise) contrastive loss (Hadsell, Chopra & LeCun 2006) over the global batch."""

from __future__ import annotations

from torch import Tensor

from service.losses.margin import MarginLoss


class PairwiseContrastiveLoss(MarginLoss):
    """Pull same-label pairs together, push other-label pairs beyond ``margin``.

    ``loss = crit(z1, z2, ..., labels=y)``: views ``[b, d]``, ``y`` ``[b]`` integer classes
    (every view of sample i has label ``y[i]``, so the views of one image are always a positive
    pair). Embeddings are L2-normalised; ``d`` is their Euclidean distance (in [0, 2]). Every
    local anchor ``a`` is paired with every other embedding of every view on every rank::

        l(a) = mean_{p in P(a)} d(a, p)^2 / 2 + mean_{n in N(a)} max(0, margin - d(a, n))^2 / 2

    Hadsell et al.'s terms, **balanced per anchor**: the positive and the negative terms are each
    averaged over the anchor's own pairs, so the few positives are not drowned by the W*V*b
    negatives of a large global batch (a plain sum over pairs would be). An anchor with no
    negative contributes its positive term only. The result is the mean over this rank's
    anchors: exact across ranks with DDP's gradient average. There is no temperature.

    >>> import torch
    >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> # positives coincide (0); negatives sqrt(2) apart, inside margin 2: (2 - 1.4142)^2 / 2
    >>> PairwiseContrastiveLoss(margin=2.0)(z, z, labels=torch.tensor([0, 1]))
    tensor(0.1716)
    """

    name = "pairwise"

    def __init__(self, margin: float = 1.0, gather_distributed: bool = True) -> None:
        super().__init__(margin, gather_distributed)

    def compute(self, views: tuple[Tensor, ...], labels: Tensor) -> Tensor:  # type: ignore[override]
        positive, negative, squared, distance = self.pair_distances(views, labels)
        pull = (squared * positive).sum(dim=1) / positive.sum(dim=1)
        push = (self.margin - distance).clamp_min(0.0).pow(2) * negative
        push = push.sum(dim=1) / negative.sum(dim=1).clamp_min(1)
        return 0.5 * (pull + push).mean()
