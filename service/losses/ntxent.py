"""NT-Xent / InfoNCE over any number of views with negatives from the global batch."""

from __future__ import annotations

import math

from torch import Tensor

from service.losses.base import ContrastiveLoss
from service.losses.chunked import masked_logsumexp
from service.losses.initial import FirstBatch
from service.losses.inputs import local_anchors_and_keys


def multi_positive_logits(x: Tensor, z: Tensor, n_views: int) -> Tensor:
    """Mean positive logit per anchor: ``mean_{u != v} x_{v,i} . z_{u,i}``, shape ``[V*b]``.

    Uses ``sum_{u != v} z_u = (sum_u z_u) - z_v``: O(V*b*d), no loop over views or samples.
    """
    zv = z.view(n_views, -1, z.shape[1])
    others = zv.sum(dim=0, keepdim=True) - zv
    return (x.view_as(zv) * others).sum(dim=-1).reshape(-1) / (n_views - 1)


class NTXentLoss(ContrastiveLoss):
    """SimCLR's NT-Xent with any number of views and negatives from every rank.

    ``loss = crit(z1, z2, ...)``: each view is ``[b, d]`` (this rank's batch), row i of every view
    comes from the same source sample. Every other embedding of every view on every rank is a
    negative. Embeddings are L2-normalised and the logits are computed in float32 (float64 stays
    float64) with autocast disabled.

    Multi-view form (SupCon's L_out with the sample as its own class, as in sthalles' n_views):
    each of the V*b local anchors has V-1 positives and its loss is the *average of the per-positive
    InfoNCE terms*, all sharing one denominator over every other global embedding (itself
    excluded)::

        l(a) = mean_{p in P(a)} [ -s(a, p)/T ] + log sum_{j != a} exp(s(a, j)/T)

    For V=2 this is exactly the classic NT-Xent with 2N-2 negatives. The result is the mean over
    this rank's anchors; with equal local batches DDP's gradient average then equals the
    single-process gradient of the whole global batch.

    ``chunk_size=k`` streams over k keys at a time (never materialising the ``[V*b, W*V*b]``
    logits) with identical values and gradients.

    >>> import torch
    >>> crit = NTXentLoss(temperature=0.5)
    >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    >>> loss = crit(z1, z2)
    >>> loss.shape, crit.temperature
    (torch.Size([]), 0.5)
    """

    name = "ntxent"
    supports_chunking = True

    def __init__(
        self,
        temperature: float = 0.5,
        gather_distributed: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(temperature, gather_distributed, chunk_size)

    def compute(self, views: tuple[Tensor, ...]) -> Tensor:
        z, keys, offset = local_anchors_and_keys(views, self.check(views))
        x = z / self.temperature
        lse = masked_logsumexp(x, keys, self_offset=offset, chunk_size=self.chunk_size)
        return (lse - multi_positive_logits(x, z, len(views))).mean()

    def expected_initial_loss(
        self, n_views: int, global_batch: int, first: FirstBatch | None = None
    ) -> float | None:
        # Indistinguishable embeddings: every anchor's V-1 positives and its V*B-V negatives score
        # alike, so each InfoNCE term is log of the V*B-1 candidates (+ the batch's spread).
        spread = first.spread(self.temperature) if first is not None else 0.0
        return math.log(n_views * global_batch - 1) + spread
