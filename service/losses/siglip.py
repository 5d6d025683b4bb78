"""Sigmoid pairwise loss (SigLIP, Zhai et al. 2023) with global negatives across ranks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.losses.distributed import gather_with_grad
from service.losses.errors import LossInputError
from service.losses.inputs import normalized
from service.losses.temperature import MAX_LOGIT_SCALE, LearnableTemperatureLoss

if TYPE_CHECKING:
    from service.config import LossConfig


def check_bias_init(bias_init: float, name: str = "siglip bias_init") -> float:
    """``bias_init`` as a finite float, or ``LossInputError``."""
    if not math.isfinite(float(bias_init)):
        raise LossInputError(f"{name} must be finite, got {bias_init!r}")
    return float(bias_init)


class SigLIPLoss(LearnableTemperatureLoss):
    """SigLIP: every (row, column) pair is an independent binary "same pair?" decision.

    ``loss = crit(a, b)``: row i of ``a`` and row i of ``b`` are a positive pair (an image and
    its caption, or two views of one image); every other pairing with ``b`` on every rank is a
    negative. With L2-normalised rows, ``t = exp(t')`` and bias ``bias``::

        loss = -1/B sum_i sum_j log sigmoid(z_ij * (t * a_i.b_j + bias))
        z_ij = +1 if i == j else -1

    summed over the B columns of the global batch, averaged over its B rows (the paper's
    normalisation). There is no softmax, so nothing couples the rows: each rank scores its own b
    rows of ``a`` against all W*b gathered columns of ``b`` and returns the sum over columns,
    mean over its rows. The mean over ranks of those local means is the global mean, so DDP's
    gradient average (and ``reduce_gradients`` for ``t'`` and ``bias``) gives exactly the
    gradient of 1 process on the W*b batch — no rescaling by W.

    ``t' = log(1/temperature)`` (the paper: ``temperature=0.1``, t = 10) and ``bias`` (the
    paper: -10, so the W*b - 1 negatives start near zero loss) are parameters of the loss:
    ``temperature_parameters()`` hands both to the optimizer (own group: no weight decay, no
    LARS, base LR). ``t'`` is learnable with ``learnable_temperature=True`` (else fixed) and
    clamped in place to ``[0, log(max_logit_scale)]`` after each step
    (:class:`~service.losses.temperature.LearnableTemperatureLoss`); the bias is always learned.

    >>> import torch
    >>> crit = SigLIPLoss(temperature=0.1, bias_init=-10.0, learnable_temperature=True)
    >>> a = torch.eye(4)  # own pair: 10 * 1 - 10 = 0 -> log 2; others: softplus(-10) each
    >>> round(crit(a, a).item(), 4)
    0.6933
    >>> round(crit.temperature, 4), [p.shape for p in crit.temperature_parameters()]
    (0.1, [torch.Size([]), torch.Size([])])
    """

    name = "siglip"
    checked_keys = ((check_bias_init, "siglip_bias_init"),)
    # The paper's start when the config leaves them unset: t = 10, learned (b: siglip_bias_init)
    default_temperature = 0.1
    default_learnable_temperature = True
    exact_views = 2
    paired = True

    def __init__(
        self,
        temperature: float = 0.1,
        bias_init: float = -10.0,
        learnable_temperature: bool = True,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__(temperature, learnable_temperature, max_logit_scale, gather_distributed)
        self.bias = nn.Parameter(torch.tensor(check_bias_init(bias_init)))

    @classmethod
    def from_config(cls, cfg: LossConfig, embed_dim: int, gather_distributed: bool) -> Self:
        cfg = cls.with_defaults(cfg)
        return cls(
            cfg.temperature,
            bias_init=cfg.siglip_bias_init,
            learnable_temperature=cfg.learnable_temperature,
            gather_distributed=gather_distributed,
        )

    def compute(self, views: tuple[Tensor, ...]) -> Tensor:
        batch = self.check(views)
        a, b = (normalized(v) for v in views)
        columns = gather_with_grad(b, check_sizes=False) if batch.world > 1 else b
        logits = (a @ columns.T) * self.scale(a.dtype) + self.bias.to(a.dtype)
        n = a.shape[0]
        sign = torch.full_like(logits, -1.0)
        rows = torch.arange(n, device=a.device)
        sign[rows, rows + batch.rank * n] = 1.0  # row i's own pair sits at column rank*n + i
        # -log sigmoid(x) = softplus(-x): stable for large |x|
        return F.softplus(-sign * logits).sum(dim=1).mean()

    def temperature_parameters(self) -> list[nn.Parameter]:
        """``[t', bias]`` (``[bias]`` with a fixed temperature)."""
        return [*super().temperature_parameters(), self.bias]

    def repr_fields(self) -> dict[str, object]:
        return {**super().repr_fields(), "bias": f"{float(self.bias.detach()):.4g}"}
