"""MoCo: momentum key encoder, a ring queue of negative keys shared by all ranks, and the loss.

Shuffle-BN (He et al. 2020, MoCo v1 §3.3; the official ``_batch_shuffle_ddp`` /
``_batch_unshuffle_ddp``) is done by ``shuffled_forward``, which ``MoCoLoss.forward_views`` uses
for the key encoder: the key images of all ranks are gathered, permuted with a permutation
broadcast from rank 0, each rank encodes its slice of the permuted batch, and the keys are
gathered back and un-permuted so that every rank holds the keys of its own samples. Without it,
a query and its key see BatchNorm statistics of the same per-rank sub-batch, and the model can
find its positive through that leak ("cheat") instead of learning good features; SyncBN does
not remove it (the statistics still come from the batch holding both views' sample). With one
process it is a no-op: there is no other sub-batch to shuffle with.

With ``model.sync_batchnorm`` (global BN) the *online* encoder normalises the queries by the
global batch's statistics, while the key encoder keeps per-rank BatchNorm
(``MomentumEncoder`` converts its copy back with ``convert_to_local_bn``), as in MoCo: with
global statistics in the key encoder every key would be normalised alike whatever the
permutation, and the shuffle (and its two all-gathers) would be pointless.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.losses.base import ContrastiveLoss
from service.losses.chunked import masked_logsumexp
from service.losses.distributed import (
    broadcast_from_rank0,
    gather_no_grad,
    get_rank,
    get_world_size,
    is_distributed,
)
from service.losses.errors import LossInputError
from service.losses.initial import FirstBatch
from service.losses.inputs import normalized
from service.models import convert_to_local_bn, unwrap

if TYPE_CHECKING:
    from service.config import LossConfig


def check_momentum(momentum: float, name: str = "momentum") -> float:
    """``momentum`` as a float in [0, 1] (1 freezes the key encoder), or raise."""
    if not 0.0 <= float(momentum) <= 1.0:
        raise LossInputError(f"{name} must be in [0, 1], got {momentum}")
    return float(momentum)


def check_queue_size(size: int, name: str = "queue_size") -> int:
    """``size`` (keys the queue holds) as an int >= 1, or raise."""
    if int(size) < 1:
        raise LossInputError(f"{name} must be >= 1, got {size}")
    return int(size)


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """``target = m * target + (1 - m) * online`` for parameters; buffers are copied.

    ``online`` may be DDP-wrapped (its ``.module`` is used). Buffers (BatchNorm running stats,
    ``num_batches_tracked``) are copied, not averaged, as in MoCo/BYOL implementations.
    """
    m = check_momentum(m)
    online, target = unwrap(online), unwrap(target)
    for kind, o_named, t_named in (
        ("parameter", online.named_parameters(), target.named_parameters()),
        ("buffer", online.named_buffers(), target.named_buffers()),
    ):
        o, t = dict(o_named), dict(t_named)
        if o.keys() != t.keys():
            raise LossInputError(
                f"online and target modules differ in {kind}s: only online "
                f"{sorted(o.keys() - t.keys())}, only target {sorted(t.keys() - o.keys())}"
            )
        names = list(o)
        if kind == "parameter":
            if names:
                torch._foreach_lerp_([t[n] for n in names], [o[n] for n in names], 1.0 - m)
        else:
            for n in names:
                t[n].copy_(o[n])


@torch.no_grad()
def shuffled_forward(encoder: nn.Module, x: Tensor, generator: torch.Generator) -> Tensor:
    """``encoder(x)`` with shuffle-BN across ranks: rows in ``x``'s order, batch statistics from
    a random mix of all ranks' samples. No gradient (for a momentum key encoder).

    Every rank passes its local ``[b, ...]`` batch (equal ``b`` on all ranks). The permutation
    of the ``W*b`` gathered rows is drawn from ``generator`` and broadcast from rank 0, so it is
    reproducible from the generator's seed and identical on every rank. Single process: exactly
    ``encoder(x)``.
    """
    if not is_distributed():
        return encoder(x)
    rank, world = get_rank(), get_world_size()
    everything = gather_no_grad(x)  # [W*b, ...] in rank order; checks equal local shapes
    permutation = torch.randperm(everything.shape[0], generator=generator)
    permutation = broadcast_from_rank0(permutation).to(x.device)
    mine = permutation.view(world, -1)[rank]  # the rows this rank encodes together
    keys = gather_no_grad(encoder(everything[mine]), check_sizes=False)  # keys[j] of row perm[j]
    inverse = torch.argsort(permutation)  # the position in ``keys`` of every gathered row
    return keys[inverse.view(world, -1)[rank]]


class MomentumEncoder(nn.Module):
    """A frozen copy of an encoder that follows it by exponential moving average.

    >>> import torch
    >>> online = torch.nn.Linear(4, 2)
    >>> key_encoder = MomentumEncoder(online, momentum=0.99)
    >>> keys = key_encoder(torch.randn(3, 4))  # no grad
    >>> key_encoder.update(online)  # after the optimiser step
    """

    momentum_update = staticmethod(momentum_update)

    def __init__(self, online: nn.Module, momentum: float = 0.99) -> None:
        super().__init__()
        self.momentum = check_momentum(momentum)
        # Per-rank BatchNorm in the copy even when the online model has global BN
        # (model.sync_batchnorm): shuffle-BN needs statistics of this rank's slice of the
        # shuffled keys; global statistics would make the shuffle pointless (and cost a
        # collective per layer). Same parameter and buffer names, so the EMA still matches.
        self.target = convert_to_local_bn(copy.deepcopy(unwrap(online)))
        self.target.requires_grad_(False)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.target(*args, **kwargs)

    def update(self, online: nn.Module, momentum: float | None = None) -> None:
        """EMA step towards ``online`` (DDP-wrapped is fine); call after the optimiser step."""
        momentum_update(online, self.target, self.momentum if momentum is None else momentum)


class NegativeQueue(nn.Module):
    """A ring buffer of L2-normalised keys, kept identical on every rank.

    ``enqueue(keys)`` all-gathers the keys from every rank (rank order) before writing them, so
    all ranks hold the same queue, equal to the single-process queue of the global batch.
    ``keys`` and ``ptr`` are registered buffers: the queue round-trips through ``state_dict``.
    The initial content is random unit vectors from a fixed seed (as in MoCo), identical on
    every rank without any communication.

    >>> import torch
    >>> queue = NegativeQueue(dim=8, size=16)
    >>> queue.enqueue(torch.randn(4, 8))
    >>> int(queue.ptr)
    4
    """

    keys: Tensor
    ptr: Tensor

    def __init__(self, dim: int, size: int = 65536, seed: int = 0) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise LossInputError(f"queue dim and size must be >= 1, got dim={dim}, size={size}")
        generator = torch.Generator().manual_seed(seed)
        initial = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("keys", initial)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    @torch.no_grad()
    def enqueue(
        self, keys: Tensor, gather_distributed: bool = True, check_sizes: bool = True
    ) -> None:
        """Gather ``keys`` (``[b, dim]``) from all ranks, normalise and write them at ``ptr``.

        More keys than the queue holds keep only the newest ``size``. The buffer is replaced
        (out of place), so a graph that saved the old queue for its backward stays valid.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise LossInputError(f"keys must be [batch, {self.dim}], got {tuple(keys.shape)}")
        if gather_distributed and is_distributed():
            keys = gather_no_grad(keys, check_sizes=check_sizes)
        keys = F.normalize(keys.detach().float(), dim=1).to(self.keys)
        n = keys.shape[0]
        skip = max(0, n - self.size)
        keys = keys[skip:]
        index = (self.ptr + skip + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.keys = self.keys.index_copy(0, index, keys)
        self.ptr = (self.ptr + n) % self.size


class MoCoLoss(ContrastiveLoss):
    """InfoNCE of queries against their momentum keys, with a queue of past keys as negatives.

    ``loss = crit(q, k)``: ``q`` ``[b, dim]`` from the online encoder, ``k`` ``[b, dim]`` from the
    momentum encoder (detached here). Logits are ``[q.k, q.queue] / T`` with the positive at index
    0; the result is the mean over this rank's queries. After computing the loss (in training
    mode) the keys of *all* ranks are enqueued, so every rank's queue matches the single-process
    queue. The loss itself has no cross-rank term: queries only meet their own key and the
    queue, so DDP's gradient average is already the global-batch gradient.

    In training the key encoder lives here too: ``attach(model)`` copies the model into
    ``key_encoder`` (a ``MomentumEncoder``, so it is in ``state_dict`` and moves with ``.to``),
    ``forward_views`` runs queries through the model and keys through the key encoder, and
    ``after_step`` moves the key encoder towards the model by EMA with ``momentum``. Call
    ``attach`` after DDP has broadcast rank 0's weights, so every rank's key encoder is the same.

    Shuffle-BN: with several ranks, ``forward_views`` encodes the keys with ``shuffled_forward``
    (MoCo v1 §3.3): the key images of all ranks are gathered, shuffled, encoded per rank in
    slices of the shuffled batch and un-shuffled, so a key's BatchNorm statistics come from other
    samples than its query's. The permutation is drawn from a generator seeded with
    ``shuffle_seed`` and the step counter ``shuffle_step`` (a buffer: it is checkpointed, so a
    resumed run draws the same permutations) and broadcast from rank 0. One process: no shuffle.

    >>> import torch
    >>> crit = MoCoLoss(temperature=0.2, queue_size=32, dim=8)
    >>> loss = crit(torch.randn(4, 8), torch.randn(4, 8))
    >>> int(crit.queue.ptr)
    4
    >>> model = torch.nn.Linear(3, 8)
    >>> crit.attach(model)
    >>> loss = crit.forward_views(model, [torch.randn(4, 3), torch.randn(4, 3)])
    >>> loss.backward()  # ... optimizer.step()
    >>> crit.after_step(model)
    >>> int(crit.queue.ptr)
    8
    """

    name = "moco"
    checked_keys = ((check_queue_size, "moco_queue_size"), (check_momentum, "moco_momentum"))
    supports_chunking = True
    exact_views = 2
    in_batch_negatives = False  # the negatives come from the queue
    per_worker_by_design = (
        "MoCo's key encoder normalises each worker's slice of the shuffled keys (shuffle-BN), so "
        "its keys depend on how the batch is split over workers"
    )

    def __init__(
        self,
        temperature: float = 0.07,
        queue_size: int = 65536,
        dim: int = 128,
        gather_distributed: bool = True,
        chunk_size: int | None = None,
        momentum: float = 0.99,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__(temperature, gather_distributed, chunk_size)
        self.momentum = check_momentum(momentum)
        self.queue = NegativeQueue(dim=dim, size=queue_size)
        self.key_encoder: MomentumEncoder | None = None  # set by attach()
        self.shuffle_seed = int(shuffle_seed)
        self.register_buffer("shuffle_step", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg: LossConfig, embed_dim: int, gather_distributed: bool) -> Self:
        cfg = cls.with_defaults(cfg)
        return cls(
            cfg.temperature,
            queue_size=cfg.moco_queue_size,
            dim=embed_dim,
            gather_distributed=gather_distributed,
            chunk_size=cfg.chunk_size,
            momentum=cfg.moco_momentum,
        )

    def compute(self, views: tuple[Tensor, ...]) -> Tensor:
        self.check(views, min_global_batch=1)  # the negatives come from the queue
        q, k = views
        if q.shape[1] != self.queue.dim:
            raise LossInputError(
                f"MoCoLoss: embeddings have dim {q.shape[1]} but the queue holds dim "
                f"{self.queue.dim}; set dim= to the projection output size"
            )
        qn, kn = normalized(q), normalized(k.detach())
        x = qn / self.temperature
        positive = (x * kn).sum(dim=1)
        negatives = self.queue.keys.to(x.dtype)
        lse = torch.logaddexp(positive, masked_logsumexp(x, negatives, None, self.chunk_size))
        loss = (lse - positive).mean()
        if self.training:
            self.queue.enqueue(kn, self.gather_distributed, check_sizes=False)
        return loss

    def repr_fields(self) -> dict[str, object]:
        return {"queue_size": self.queue.size, "dim": self.queue.dim, "momentum": self.momentum}

    # --- training-loop hooks ------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Copy ``model`` (frozen) into ``key_encoder``; its keys are then the queue's entries."""
        self.key_encoder = MomentumEncoder(model, self.momentum)

    def _attached(self) -> MomentumEncoder:
        if self.key_encoder is None:
            raise RuntimeError("MoCoLoss has no key encoder: call attach(model) before training")
        return self.key_encoder

    def shuffle_generator(self) -> torch.Generator:
        """The generator of this step's shuffle-BN permutation: ``(shuffle_seed, shuffle_step)``."""
        seed = (self.shuffle_seed * 0x9E3779B1 + int(self.shuffle_step)) % 2**63
        return torch.Generator().manual_seed(seed)

    def forward_views(self, model: nn.Module, views: Sequence[Tensor]) -> Tensor:
        """Queries from ``model`` on view 0, keys from the key encoder on view 1 (no grad),
        encoded with shuffle-BN across ranks (``shuffled_forward``; no-op with one process)."""
        key_encoder = self._attached()
        queries = model(views[0])
        keys = shuffled_forward(key_encoder, views[1], self.shuffle_generator())
        self.shuffle_step += 1
        return self(queries, keys)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before shuffle-BN have no step counter: start it at 0.
        state_dict.setdefault(prefix + "shuffle_step", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def after_step(self, model: nn.Module) -> None:
        """EMA step of the key encoder towards ``model`` (DDP-wrapped is fine)."""
        self._attached().update(model, self.momentum)

    def expected_initial_loss(
        self, n_views: int, global_batch: int, first: FirstBatch | None = None
    ) -> float | None:
        # The positive among queue_size + 1 candidates. The queue starts as random unit vectors
        # (not spread like the batch), so the first batch adds nothing here.
        return math.log(self.queue.size + 1)
