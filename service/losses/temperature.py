"""A temperature that may be learned: CLIP's log logit scale, shared by the CLIP-style losses."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Self

import torch
from torch import Tensor, nn

from service.losses.base import ContrastiveLoss
from service.losses.errors import LossInputError
from service.losses.inputs import check_temperature, problems

if TYPE_CHECKING:
    from service.config import LossConfig

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of 1/T: a learnable temperature never goes below 0.01


def check_learnable_start(
    temperature: float, max_logit_scale: float = MAX_LOGIT_SCALE, name: str = "temperature"
) -> None:
    """A learnable temperature must start above ``1/max_logit_scale`` (else it starts clamped).

    >>> check_learnable_start(0.001, name="loss.temperature")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    service.losses.errors.LossInputError: loss.temperature=0.001 is below 1/max_logit_scale=0.01...
    """
    if temperature > 0 and 1.0 / temperature > max_logit_scale:  # T <= 0: check_temperature's
        raise LossInputError(
            f"{name}={temperature} is below 1/max_logit_scale="
            f"{1.0 / max_logit_scale:g}; a learnable temperature would start clamped"
        )


class LearnableTemperatureLoss(ContrastiveLoss):
    """Base of the losses whose temperature can be learned (``symmetric``, ``siglip``).

    With ``learnable_temperature=True`` the scale is ``logit_scale = nn.Parameter(log(1/T))``
    (CLIP's parameterisation: multiplicative updates, always positive). The forward uses the raw
    ``exp(logit_scale)`` and ``after_step`` clamps the parameter in place to
    ``log(max_logit_scale)`` after every optimizer step (CLIP clamps at 100, the same way). A
    clamp inside the forward would zero the gradient once the parameter passes the bound, so
    the temperature could never come back. ``temperature_parameters()`` hands the parameter to
    the optimizer, which gives it a group of its own (no weight decay, no LARS adaptation, the
    unscaled base LR); ``reduce_gradients`` averages its gradient over ranks (DDP does not see
    it).

    >>> class Scaled(LearnableTemperatureLoss):  # a toy loss: the scaled similarity of pairs
    ...     def compute(self, views):
    ...         return -(views[0] * views[1]).sum(dim=1).mean() * self.scale(views[0].dtype)
    >>> crit = Scaled(temperature=0.5, learnable_temperature=True)
    >>> round(crit.temperature, 4), [p.shape for p in crit.temperature_parameters()]
    (0.5, [torch.Size([])])
    """

    supports_learnable_temperature = True

    def __init__(
        self,
        temperature: float,
        learnable_temperature: bool = False,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        gather_distributed: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(temperature, gather_distributed, chunk_size)
        self.learnable_temperature = learnable_temperature
        self.max_logit_scale = check_temperature(max_logit_scale, "max_logit_scale")
        self.logit_scale: nn.Parameter | None = None
        if learnable_temperature:
            check_learnable_start(self._temperature, self.max_logit_scale)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self._temperature)))

    @classmethod
    def config_problems(cls, cfg: LossConfig) -> list[str]:
        start = (check_learnable_start, cfg.temperature, MAX_LOGIT_SCALE, "loss.temperature")
        found = super().config_problems(cfg)
        return found + problems(start) if cfg.learnable_temperature else found

    @classmethod
    def from_config(cls, cfg: LossConfig, embed_dim: int, gather_distributed: bool) -> Self:
        chunking = {"chunk_size": cfg.chunk_size} if cls.supports_chunking else {}
        return cls(
            cfg.temperature,
            learnable_temperature=cfg.learnable_temperature,
            gather_distributed=gather_distributed,
            **chunking,
        )

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
