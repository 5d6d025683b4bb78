"""``ContrastiveLoss``: what every loss shares, and the hooks the training loop calls.

A loss subclass sets its temperature through ``super().__init__`` and writes its maths in
``compute(views)``; ``forward(*views)`` does the shared prologue (accept a list or separate
tensors, autocast off so the logits are computed in at least float32).

The hooks let one training step serve every method without ``if loss == ...`` branches. The loop
calls, per worker::

    criterion.attach(unwrap(model))              # once, after DDP wrapping, before .to(device)
    criterion.to(device)
    loss = criterion.forward_views(model, views, labels)  # every step, under autocast
    loss.backward()
    criterion.reduce_gradients()                 # before clipping and the optimizer step
    optimizer.step()
    criterion.after_step(model)                  # after the optimizer step

and the optimizer asks ``criterion.temperature_parameters()`` for the parameters that get a
group of their own (a learnable temperature: no weight decay, no LARS adaptation, base LR).

Supervised losses set ``needs_labels = True``: their ``forward(*views, labels=...)`` takes this
rank's integer class labels ``[b]`` (one per source sample; every view of a sample shares it)
and ``compute(views, labels)`` sees them. ``labels`` are gathered across ranks with a plain
all-gather (no gradient) next to the autograd gather of the embeddings.

A model with the class attribute ``paired_views = True`` (the image–text model) takes the views
as separate inputs and returns one embedding per view: ``forward_views`` then calls
``self(*model(*views))`` instead of one forward over the concatenated views.

Anything a hook creates (MoCo's key encoder) is a submodule, so ``criterion.state_dict()``
checkpoints it and ``criterion.to(device)`` moves it; ``attach`` must therefore run before a
checkpoint is loaded into the criterion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from torch import Tensor, nn

from service.losses import distributed
from service.losses.errors import LossInputError
from service.losses.initial import FirstBatch, InitialLossReport, judge_initial_loss
from service.losses.inputs import (
    Batch,
    as_views,
    check_chunk_size,
    check_temperature,
    check_views,
    full_precision,
    problems,
)
from service.models import unwrap

if TYPE_CHECKING:
    from service.config import LossConfig


class ContrastiveLoss(nn.Module):
    """Base of the contrastive losses: temperature, ``gather_distributed``, hooks (no-ops).

    Class attributes say what a loss is and supports, so config validation can ask the loss:
    ``name`` (its ``loss.name``; the registry is ``service.losses.factory.LOSS_CLASSES``),
    ``supports_learnable_temperature``, ``supports_chunking`` (``chunk_size=k`` streams the keys),
    ``exact_views`` (None: any number >= 2), ``needs_labels`` (class labels per sample),
    ``paired`` (can train image–text pairs: its two views may be different modalities),
    ``uses_margin`` (takes ``loss.margin``) and ``in_batch_negatives`` (False: the negatives come
    from elsewhere, e.g. MoCo's queue, so a per-worker batch of one is fine).

    Two classmethods connect a loss to ``config.loss`` (a ``LossConfig``): ``config_problems``
    (its hyperparameter ranges, naming the config keys, without building anything) and
    ``from_config`` (the loss the config describes). Both default to the temperature-only case.

    >>> import torch
    >>> class Alignment(ContrastiveLoss):  # a toy loss: mean distance of the positive pairs
    ...     def compute(self, views):
    ...         return (views[0] - views[1]).pow(2).sum(dim=1).mean() / self.temperature
    >>> Alignment(temperature=0.5)(torch.ones(4, 3), torch.zeros(4, 3))
    tensor(6.)
    >>> Alignment(temperature=0.5)
    Alignment(temperature=0.5, gather_distributed=True)
    """

    name: ClassVar[str] = ""  # ``loss.name``; set by every registered loss
    supports_learnable_temperature: ClassVar[bool] = False
    supports_chunking: ClassVar[bool] = False
    exact_views: ClassVar[int | None] = None
    needs_labels: ClassVar[bool] = False
    paired: ClassVar[bool] = False
    uses_margin: ClassVar[bool] = False
    in_batch_negatives: ClassVar[bool] = True
    # Why W workers x b is *not* 1 process x W*b for this loss by design ("": it is, exactly);
    # ``contrastive check`` shows this instead of comparing gradients.
    per_worker_by_design: ClassVar[str] = ""
    # The loss's own hyperparameters beyond the temperature: (range check, ``loss.<key>``),
    # checked by ``config_problems`` with the functions the constructor raises with.
    checked_keys: ClassVar[tuple[tuple[Callable[..., Any], str], ...]] = ()
    # What ``loss.temperature`` / ``loss.learnable_temperature`` left unset (null) mean for
    # this loss (``with_defaults``).
    default_temperature: ClassVar[float] = 0.5
    default_learnable_temperature: ClassVar[bool] = False

    def __init__(
        self,
        temperature: float,
        gather_distributed: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self._temperature = check_temperature(temperature)
        self.gather_distributed = gather_distributed
        if chunk_size is not None and not self.supports_chunking:
            raise LossInputError(f"{type(self).__name__} does not support chunk_size")
        self.chunk_size = check_chunk_size(chunk_size)
        # The similarities of the first batch this loss sees, for the step-0 check (once).
        self.first_batch: FirstBatch | None = None

    @classmethod
    def with_defaults(cls, cfg: LossConfig) -> LossConfig:
        """``cfg`` with this loss's defaults for the keys left unset (null): the temperature
        and whether it is learned. ``config_problems`` and ``from_config`` read this.

        >>> from service.config import LossConfig
        >>> ContrastiveLoss.with_defaults(LossConfig()).temperature
        0.5
        """
        values = {
            "temperature": cls.default_temperature,
            "learnable_temperature": cls.default_learnable_temperature,
        }
        unset = {key: value for key, value in values.items() if getattr(cfg, key) is None}
        return dataclasses.replace(cfg, **unset) if unset else cfg

    @classmethod
    def config_problems(cls, cfg: LossConfig) -> list[str]:
        """The ranges of this loss's hyperparameters in ``cfg``, as problems naming the config
        keys; nothing is built. The constructor checks its arguments with the same functions.

        >>> from service.config import LossConfig
        >>> ContrastiveLoss.config_problems(LossConfig(temperature=-1.0))
        ['loss.temperature must be > 0 and finite, got -1.0']
        """
        cfg = cls.with_defaults(cfg)
        checks: list[tuple] = [(check_temperature, cfg.temperature, "loss.temperature")]
        if cls.supports_chunking:
            checks.append((check_chunk_size, cfg.chunk_size, "loss.chunk_size"))
        checks += [(check, getattr(cfg, key), f"loss.{key}") for check, key in cls.checked_keys]
        return problems(*checks)

    @classmethod
    def from_config(cls, cfg: LossConfig, embed_dim: int, gather_distributed: bool) -> Self:
        """The loss ``cfg`` describes (``embed_dim``: the projection output size). The default
        passes the temperature (and ``chunk_size`` to a chunking loss); losses with more
        hyperparameters override it."""
        cfg = cls.with_defaults(cfg)
        chunking = {"chunk_size": cfg.chunk_size} if cls.supports_chunking else {}
        return cls(cfg.temperature, gather_distributed=gather_distributed, **chunking)

    @property
    def temperature(self) -> float:
        """The current temperature (a float, also when it is learnable)."""
        return self._temperature

    def forward(self, *views: Tensor, labels: Tensor | None = None) -> Tensor:
        """The mean loss over this rank's anchors; ``crit(z1, z2)`` or ``crit([z1, z2])``.

        ``labels`` (``[b]`` integers) reach ``compute`` only when the loss ``needs_labels``;
        the others ignore them, so the loop can always pass what the data has.
        """
        views = as_views(views)
        with full_precision(views):
            if not self.needs_labels:
                loss = self.compute(views)
            elif labels is None:
                raise LossInputError(
                    f"{type(self).__name__} needs class labels: call it with labels=[b] ints"
                )
            else:
                loss = self.compute(views, labels=labels)
            if self.first_batch is None:  # once, and only of views the loss has accepted
                self.first_batch = FirstBatch.of(views, paired=self.paired)
        return loss

    def compute(self, views: tuple[Tensor, ...], **kwargs: Tensor) -> Tensor:
        """The loss maths: ``views`` as given (autocast is off); return a scalar.

        Losses with ``needs_labels`` get ``labels=`` (this rank's ``[b]`` labels) as well.
        """
        raise NotImplementedError

    def check(self, views: Sequence[Tensor], **kwargs) -> Batch:
        """``check_views`` with this loss's name, gather flag and ``exact_views``."""
        kwargs.setdefault("exact_views", self.exact_views)
        return check_views(
            views, loss=type(self).__name__, gather=self.gather_distributed, **kwargs
        )

    def label_masks(self, labels: Tensor, batch: Batch, n_views: int) -> tuple[Tensor, Tensor]:
        """Boolean ``(positive, negative)`` masks ``[V*b, W*V*b]`` of this rank's anchors.

        The layout of ``local_anchors_and_keys`` (view-major per rank, rank-major overall, this
        rank's rows from column ``rank*V*b``); every view of sample i carries ``labels[i]``.
        Positive: same label, the anchor itself excluded (so the other views of its image are
        always positives); negative: a different label. The labels travel in a plain all-gather
        (integers, no gradient), checked after it so every rank raises the same error together.
        """
        name = type(self).__name__
        if not isinstance(labels, Tensor) or tuple(labels.shape) != (batch.local,):
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise LossInputError(f"{name}: labels must be a [{batch.local}] tensor, got {shape}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise LossInputError(f"{name}: labels must be integers, got {labels.dtype}")
        local = labels.to(torch.int64).repeat(n_views)
        keys = distributed.gather_no_grad(local, check_sizes=False) if batch.world > 1 else local
        if bool((keys < 0).any()):
            raise LossInputError(
                f"{name}: {int((keys < 0).sum()) // n_views} sample(s) of the global batch have "
                "no label (a negative label); a supervised loss needs an integer 'label' column "
                "on every training row"
            )
        positive = local[:, None] == keys[None, :]
        negative = ~positive
        rows = torch.arange(local.shape[0], device=positive.device)
        positive[rows, rows + batch.rank * local.shape[0]] = False  # the anchor itself
        return positive, negative

    def repr_fields(self) -> dict[str, object]:
        """The loss's own hyperparameters for ``repr`` (between temperature and the gather flag)."""
        return {}

    def extra_repr(self) -> str:
        fields: dict[str, object] = {
            "temperature": f"{self.temperature:.4g}",
            **self.repr_fields(),
            "gather_distributed": self.gather_distributed,
        }
        if self.supports_chunking:
            fields["chunk_size"] = self.chunk_size
        return ", ".join(f"{name}={value}" for name, value in fields.items())

    # --- training-loop hooks (no-ops unless a method needs them) -----------------------------

    def temperature_parameters(self) -> list[nn.Parameter]:
        """Trainable temperature parameters, for an optimizer group of their own (none here).

        A log-temperature is a scalar whose useful step is a small fraction of its value
        whatever the batch size, so the optimizer gives it the unscaled base LR, no weight decay
        and no LARS trust ratio (``service.train.optim.build_optimizer``).
        """
        return []

    def attach(self, model: nn.Module) -> None:
        """Called once per worker with the unwrapped model, after DDP wrapping (so every rank
        gets rank 0's broadcast weights) and before the criterion is moved to the device."""

    def forward_views(
        self, model: nn.Module, views: Sequence[Tensor], labels: Tensor | None = None
    ) -> Tensor:
        """The loss of one batch of views (each ``[b, ...]`` images) through ``model``.

        One forward over all views concatenated: BatchNorm sees the whole local batch and DDP
        sees one forward per backward. A model with ``paired_views = True`` (image–text) gets
        the views as separate inputs (``model(images, tokens)``) and returns one embedding
        batch per view. ``labels`` go to losses that ``needs_labels``.
        """
        if getattr(unwrap(model), "paired_views", False):
            return self(*model(*views), labels=labels)
        return self(*model(torch.cat(list(views))).chunk(len(views)), labels=labels)

    def reduce_gradients(self) -> None:
        """Average over ranks the gradients of this loss's own parameters (DDP does not see them).

        Call after ``backward`` and before clipping / the optimizer step; no-op when not
        distributed or when the loss has no gradients (e.g. a fixed temperature).
        """
        distributed.average_gradients(self.parameters())

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step with the (possibly DDP-wrapped) model."""

    def expected_initial_loss(
        self, n_views: int, global_batch: int, first: FirstBatch | None = None
    ) -> float | None:
        """The step-0 loss when all embeddings are indistinguishable (None: no simple formula):
        log(candidates) for the softmax losses, the loss curve's reference line.

        With ``first`` (the first batch's similarities), the loss of a positive that scores
        like an average negative among embeddings spread like these: the reference plus the
        batch's spread term (``service.losses.initial``). A healthy random-init start is at
        or below it.
        """
        return None

    def initial_loss_report(
        self, loss: float, n_views: int, global_batch: int
    ) -> InitialLossReport | None:
        """The step-0 check of the first ``loss`` against the first batch this loss saw (None:
        the loss has no expected value): flags only what a healthy start cannot show."""
        reference = self.expected_initial_loss(n_views, global_batch)
        if reference is None:
            return None
        first = self.first_batch
        expected = self.expected_initial_loss(n_views, global_batch, first) if first else None
        temperature = None if self.uses_margin else self.temperature
        return judge_initial_loss(loss, reference, expected or reference, first, temperature)
