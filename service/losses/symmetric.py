"""CLIP-style symmetric InfoNCE with an optional learnable, log-parameterised temperature."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from service.losses.base import ContrastiveLoss
from service.losses.chunked import masked_logsumexp
from service.losses.distributed import gather_with_grad
from service.losses.errors import LossInputError
from service.losses.inputs import check_temperature, normalized


class SymmetricInfoNCELoss(ContrastiveLoss):
    """Symmetric cross-entropy between two aligned batches, as in CLIP.

    ``loss = crit(a, b)``: row i of ``a`` and row i of ``b`` are a positive pair; every other row
    of the *other* modality/view on every rank is a negative. The loss is the average of the
    a→b and b→a cross-entropies, each a mean over this rank's rows (DDP's gradient average then
    gives the global-batch gradient). Local anchors are scored against gathered keys with labels
    offset by ``rank * b``.

    With ``learnable_temperature=True`` the scale is ``logit_scale = nn.Parameter(log(1/T))``
    (CLIP's parameterisation: multiplicative updates, always positive). The forward uses the raw
    ``exp(logit_scale)`` and ``after_step`` clamps the parameter in place to
    ``log(max_logit_scale)`` after every optimizer step (CLIP clamps at 100, the same way). A
    clamp inside the forward would zero the gradient once the parameter passes the bound, so
    the temperature could never come back. ``temperature_parameters()`` hands the parameter to
    the optimizer, which gives it a group of its own (no weight decay, no LARS adaptation, the
    unscaled base LR); ``reduce_gradients`` averages its gradient over ranks (DDP does not see
    it).

    >>> import torch
    >>> crit = SymmetricInfoNCELoss(temperature=0.07, learnable_temperature=True)
    >>> loss = crit(torch.randn(8, 16), torch.randn(8, 16))
    >>> round(crit.temperature, 4)
    0.07
    """

    supports_learnable_temperature = True
    supports_chunking = True
    exact_views = 2

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        max_logit_scale: float = 100.0,
        gather_distributed: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(temperature, gather_distributed, chunk_size)
        self.learnable_temperature = learnable_temperature
        self.max_logit_scale = check_temperature(max_logit_scale, "max_logit_scale")
        if learnable_temperature and 1.0 / self._temperature > self.max_logit_scale:
            raise LossInputError(
                f"temperature={self._temperature} is below 1/max_logit_scale="
                f"{1.0 / self.max_logit_scale:g}; a learnable temperature would start clamped"
            )
        self.logit_scale: nn.Parameter | None = None
        if learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self._temperature)))

    def scale(self, dtype: torch.dtype | None = None) -> Tensor | float:
        """The multiplicative logit scale 1/T: a differentiable tensor when learnable (unclamped:
        ``after_step`` keeps the parameter within ``max_logit_scale``)."""
        if self.logit_scale is None:
            return 1.0 / self._temperature  # a fixed temperature is used as given
        log_scale = self.logit_scale if dtype is None else self.logit_scale.to(dtype)
        return log_scale.exp()

    @property
    def temperature(self) -> float:
        scale = self.scale()
        return 1.0 / float(scale.detach() if isinstance(scale, Tensor) else scale)

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

    def temperature_parameters(self) -> list[nn.Parameter]:
        """``[logit_scale]`` when the temperature is learnable, else ``[]``."""
        return [] if self.logit_scale is None else [self.logit_scale]

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Clamp ``logit_scale`` in place to ``log(max_logit_scale)`` (same on every rank: the
        gradient was averaged, so the parameter is too)."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_(max=math.log(self.max_logit_scale))

    def repr_fields(self) -> dict[str, object]:
        return {"learnable": self.learnable_temperature, "max_logit_scale": self.max_logit_scale}

    def expected_initial_loss(self, n_views: int, global_batch: int) -> float | None:
        return math.log(global_batch)  # each row's positive among the B keys of the other side
