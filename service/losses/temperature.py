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
MIN_LOGIT_SCALE = 1.0  # open_clip's lower clamp (log 1/T >= 0): nor above 1


def check_learnable_start(
    temperature: float, max_logit_scale: float = MAX_LOGIT_SCALE, name: str = "temperature"
) -> None:
    """A learnable temperature must start within the clamp: ``1/max_logit_scale <= T <= 1``.

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
    if temperature > 1.0 / MIN_LOGIT_SCALE:
        raise LossInputError(
            f"{name}={temperature} is above 1 (log logit scale below 0); a learnable "
            "temperature is clamped to at most 1 (open_clip), so it would start clamped"
        )


class LearnableTemperatureLoss(ContrastiveLoss):
    """Base of the losses whose temperature can be learned (``symmetric``, ``siglip``).

    With ``learnable_temperature=True`` the scale is ``logit_scale = nn.Parameter(log(1/T))``
    (CLIP's parameterisation: multiplicative updates, always positive). The forward uses the raw
    ``exp(logit_scale)`` and ``after_step`` clamps the parameter in place to
    ``[0, log(max_logit_scale)]`` after every optimizer step (open_clip clamps to [0, log 100],
    the same way: T stays within [1/max_logit_scale, 1]). A
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
        if self.max_logit_scale < MIN_LOGIT_SCALE:
            raise LossInputError(f"max_logit_scale must be >= 1, got {max_logit_scale!r}")
        self.logit_scale: nn.Parameter | None = None
        if learnable_temperature:
            check_learnable_start(self._temperature, self.max_logit_scale)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self._temperature)))

    @classmethod
    def config_problems(cls, cfg: LossConfig) -> list[str]:
        cfg = cls.with_defaults(cfg)
        start = (check_learnable_start, cfg.temperature, MAX_LOGIT_SCALE, "loss.temperature")
        found = super().config_problems(cfg)
        return found + problems(start) if cfg.learnable_temperature else found

    @classmethod
    def from_config(cls, cfg: LossConfig, embed_dim: int, gather_distributed: bool) -> Self:
        cfg = cls.with_defaults(cfg)
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
        """Clamp ``logit_scale`` in place to ``[0, log(max_logit_scale)]`` (same on every rank:
        the gradient was averaged, so the parameter is too)."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_(math.log(MIN_LOGIT_SCALE), math.log(self.max_logit_scale))

    def repr_fields(self) -> dict[str, object]:
        return {"learnable": self.learnable_temperature, "max_logit_scale": self.max_logit_scale}
