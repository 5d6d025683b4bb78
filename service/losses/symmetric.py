"""CLIP-style symmetric InfoNCE with an optional learnable, log-parameterised temperature."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from service.losses.chunked import masked_logsumexp
from service.losses.distributed import gather_with_grad
from service.losses.initial import FirstBatch
from service.losses.inputs import normalized
from service.losses.temperature import LearnableTemperatureLoss


class SymmetricInfoNCELoss(LearnableTemperatureLoss):
    """Symmetric cross-entropy between two aligned batches, as in CLIP.

    ``loss = crit(a, b)``: row i of ``a`` and row i of ``b`` are a positive pair; every other row
    of the *other* modality/view on every rank is a negative. The loss is the average of the
    a→b and b→a cross-entropies, each a mean over this rank's rows (DDP's gradient average then
    gives the global-batch gradient). Local anchors are scored against gathered keys with labels
    offset by ``rank * b``.

    With ``learnable_temperature=True`` the temperature is CLIP's learnable log logit scale
    (:class:`~service.losses.temperature.LearnableTemperatureLoss`: clamped in place after each
    step, own optimizer group, gradient averaged over ranks).

    >>> import torch
    >>> crit = SymmetricInfoNCELoss(temperature=0.07, learnable_temperature=True)
    >>> loss = crit(torch.randn(8, 16), torch.randn(8, 16))
    >>> round(crit.temperature, 4)
    0.07
    """

    name = "symmetric"
    supports_chunking = True
    exact_views = 2
    paired = True

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        max_logit_scale: float = 100.0,
        gather_distributed: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            temperature, learnable_temperature, max_logit_scale, gather_distributed, chunk_size
        )

    def compute(self, views: tuple[Tensor, ...]) -> Tensor:
        batch = self.check(views)
        a, b = (normalized(v) for v in views)
        n, d = a.shape
        if batch.world > 1:
            # One collective for both sides: rank-major [W, 2, n, d].
            both = gather_with_grad(torch.cat([a, b]), check_sizes=False).view(-1, 2, n, d)
            keys_a, keys_b = both[:, 0].reshape(-1, d), both[:, 1].reshape(-1, d)
        else:
            keys_a, keys_b = a, b
        scale = self.scale(a.dtype)
        xa, xb = a * scale, b * scale
        positive = (xa * b).sum(dim=1)
        # a -> b: cross-entropy over all b keys; the positive sits at rank*n + i.
        lse_ab = masked_logsumexp(xa, keys_b, chunk_size=self.chunk_size)
        lse_ba = masked_logsumexp(xb, keys_a, chunk_size=self.chunk_size)
        return 0.5 * ((lse_ab - positive).mean() + (lse_ba - positive).mean())

    def expected_initial_loss(
        self, n_views: int, global_batch: int, first: FirstBatch | None = None
    ) -> float | None:
        # each row's positive among the B keys of the other side (+ the batch's spread)
        spread = first.spread(self.temperature) if first is not None else 0.0
        return math.log(global_batch) + spread
