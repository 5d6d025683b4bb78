"""Triplet loss with batch-hard mining (Hermans et al. 2017) over the global batch."""

from __future__ import annotations

import torch
from torch import Tensor

from service.losses.initial import FirstBatch
from service.losses.margin import MarginLoss


class TripletLoss(MarginLoss):
    """Batch-hard triplet loss: per anchor, its hardest positive against its hardest negative.

    ``loss = crit(z1, z2, ..., labels=y)``: views ``[b, d]``, ``y`` ``[b]`` integer classes
    (every view of sample i has label ``y[i]``). Embeddings are L2-normalised and compared by
    **Euclidean distance** ``d`` (in [0, 2], not squared, as in Hermans et al.). For each of the
    V*b local anchors, over every embedding of every view on every rank::

        l(a) = max(0, max_{p: same label, p != a} d(a, p) - min_{n: other label} d(a, n) + margin)

    The other views of the anchor's own image always have its label, so two views give positives
    even when every label is distinct (instance discrimination). An anchor with no negative in
    the global batch (one class only) contributes 0. The result is the mean over this rank's
    anchors: exact across ranks with DDP's gradient average, like the other losses. There is no
    temperature (``temperature`` is reported as 1).

    >>> import torch
    >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> # two views, two classes; the positive is the same point, negatives sqrt(2) away
    >>> TripletLoss(margin=0.2)(z, z, labels=torch.tensor([0, 1]))
    tensor(0.)
    >>> TripletLoss(margin=2.0)(z, z, labels=torch.tensor([0, 1]))  # 2 - sqrt(2) = 0.5858
    tensor(0.5858)
    """

    name = "triplet"

    def __init__(self, margin: float = 0.2, gather_distributed: bool = True) -> None:
        super().__init__(margin, gather_distributed)

    def compute(self, views: tuple[Tensor, ...], labels: Tensor) -> Tensor:  # type: ignore[override]
        positive, negative, _, distance = self.pair_distances(views, labels)
        hardest_positive = distance.masked_fill(~positive, float("-inf")).amax(dim=1)
        hardest_negative = distance.masked_fill(~negative, float("inf")).amin(dim=1)
        loss = (hardest_positive - hardest_negative + self.margin).clamp_min(0.0)
        return torch.where(negative.any(dim=1), loss, torch.zeros_like(loss)).mean()

    def expected_initial_loss(
        self, n_views: int, global_batch: int, first: FirstBatch | None = None
    ) -> float | None:
        # Every distance alike: hardest positive == hardest negative. With a batch: positives
        # as far as the farthest negative, the hardest negative as near as the nearest.
        return self.margin + (first.distance_range() if first is not None else 0.0)
