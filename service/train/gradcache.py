"""Cached-gradient steps (GradCache, Gao et al. 2021): global batches larger than memory, exactly.

A contrastive loss couples every embedding of the global batch, so it cannot be accumulated over
micro-batches like a per-sample loss; but it only needs the *embeddings*, which are small. With
``train.micro_batch_size = m`` smaller than the local batch ``b`` each worker runs three passes:

1. **Embed, no graph.** Every micro-batch (``m`` source samples, all their views in one forward)
   runs through the model under ``no_grad``; only the embeddings are kept. The RNG state (CPU and
   the CUDA device's) is saved before each micro-batch, so dropout, stochastic depth and
   augmentation on the device can be replayed.
2. **Loss once.** The embeddings become leaves with ``requires_grad``; the loss runs once on the
   whole local batch (it all-gathers across ranks as in a plain step; ``loss.chunk_size`` still
   applies) and is backpropagated to the embeddings only: their gradients are the cache. The
   loss's own parameters (a learnable temperature) get their gradient here; loss state (MoCo's
   queue) is updated here, once.
3. **Replay with graph.** Each micro-batch is forwarded again with its pass-1 RNG state restored,
   and ``backward(cached gradient slice)`` accumulates the parameter gradients. Under DDP all but
   the last micro-batch run in ``no_sync()``: gradients are all-reduced once per step.

The parameter gradients equal the plain step's when the model has no batch statistics (chain rule:
the loss's gradient w.r.t. the embeddings does not depend on how they were computed).

**BatchNorm semantics.** Each micro-batch (``m`` samples x the views the model call holds: all
of them in the base ``forward_views``, the queries for MoCo) is normalised by its own
statistics, in both passes (so pass 3 reproduces pass 1 exactly); the result equals a step that
forwards each micro-batch with a graph and backpropagates the full-batch loss once. The running
statistics are frozen in pass 1 and updated in pass 3, i.e. once per sample (``num_batches_tracked``
grows by the number of micro-batches). With ``model.sync_batchnorm`` (global BN, the default) the
statistics of micro-batch ``k`` are those of the ``k``-th micro-batches of all ranks together
(``W*m*V`` images), in both passes; every rank runs the same number of micro-batches, so the
collectives match. W ranks with micro-batch ``m`` are then exactly one process with micro-batch
``W*m`` whose ``k``-th micro-batch holds the ranks' ``k``-th ones (``tests/test_global_bn.py``).
Without it each rank's micro-batch has its own statistics. Either way this is *not* the plain
step's normalisation over the whole batch: BN statistics over fewer samples are a known source of
degraded contrastive training; prefer larger micro-batches or a head without BN.

How the loss is reached: pass 2 *is* the loss's own ``criterion.forward_views(model, views)``,
called with a stand-in for the model. Each time ``forward_views`` calls the model on a batch, the
stand-in runs pass 1 on it in micro-batches and returns the embeddings as leaves; everything else
``forward_views`` does runs once, exactly as in the plain step: MoCo's key encoder (no graph, whole
local batch, with its shuffle-BN across ranks), its step counter and queue, a learnable
temperature. So every loss of the factory is exact in this sense; a ``forward_views`` that never
calls the model on a tensor batch is refused, naming the loss. A model call on ``n*b`` rows (``n``
views of the local batch ``b``, view-major, as ``torch.cat(views)``) is micro-batched by sample:
micro-batch ``k`` holds samples ``[k*m, (k+1)*m)`` of each of the ``n`` views. A paired
(image–text) model called with several inputs of ``b`` rows is micro-batched the same way on
every input, its tuple of outputs becoming a tuple of leaves. Labels (supervised losses) go to
the loss once, with the whole local batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from service.losses import ContrastiveLoss
from service.models import unwrap
from service.train.micro_batch import GradCacheError as GradCacheError
from service.train.micro_batch import gradcache_problems as gradcache_problems

if TYPE_CHECKING:  # annotations only (the state resolves its micro-batch in micro_batch.py)
    from service.train.state import TrainState


def label_kwargs(criterion: ContrastiveLoss, labels: Tensor | None) -> dict[str, Tensor | None]:
    """``{"labels": labels}`` for a loss that ``needs_labels``, else ``{}`` (the other losses'
    ``forward_views`` may not take labels: MoCo's override, test doubles)."""
    return {"labels": labels} if getattr(criterion, "needs_labels", False) else {}


def uses_gradcache(s: TrainState, local_batch: int) -> bool:
    """True when ``train.micro_batch_size`` is set and smaller than the local batch."""
    return s.micro_batch is not None and s.micro_batch < local_batch


# --- RNG and BatchNorm helpers ---------------------------------------------------------------


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise by batch statistics but leave running stats (and counts) alone.

    ``track_running_stats=False`` in training mode is exactly that in ``_BatchNorm``,
    ``SyncBatchNorm`` and ``GlobalBatchNorm``: no running buffers passed to ``batch_norm``, no
    ``num_batches_tracked`` increment. Restored on exit, also on error.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def _without_ddp(model: nn.Module) -> nn.Module:
    # Pass 1 needs no DDP (no graph, no gradients) and must not consume DDP's once-per-step
    # buffer broadcast, which happens at the first forward with a graph (pass 3).
    return model.module if isinstance(model, DistributedDataParallel) else model


# --- the three passes ------------------------------------------------------------------------


@dataclass
class _Call:
    """One call of the model inside ``forward_views``: its inputs, micro-batch rows, outputs."""

    xs: tuple[Tensor, ...]  # the model's inputs (two for a paired image–text model)
    rows: list[Tensor]  # row indices of every input, one tensor per micro-batch
    rng: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)  # before each
    leaves: tuple[Tensor, ...] = ()  # the outputs for all rows, requires_grad (pass 2's input)


def micro_batch_rows(n_rows: int, local_batch: int, m: int) -> list[Tensor]:
    """Rows of each micro-batch of a model input with ``n_rows`` rows, grouped by sample.

    ``n_rows = n * local_batch`` (n views, view-major): micro-batch k holds samples
    ``[k*m, (k+1)*m)`` of every view. Otherwise the rows are cut in consecutive runs of ``m``.

    >>> [r.tolist() for r in micro_batch_rows(6, 3, 2)]
    [[0, 1, 3, 4], [2, 5]]
    """
    views, b = (n_rows // local_batch, local_batch) if n_rows % local_batch == 0 else (1, n_rows)
    view_starts = torch.arange(views)[:, None] * b
    return [
        (view_starts + torch.arange(i, min(i + m, b))[None, :]).reshape(-1) for i in range(0, b, m)
    ]


def _as_outputs(out: object) -> tuple[Tensor, ...]:
    outs = out if isinstance(out, tuple) else (out,)
    if not outs or not all(isinstance(o, Tensor) for o in outs):
        raise GradCacheError(f"the model returned {type(out).__name__}, not Tensor(s)")
    return outs


class _EmbedInMicroBatches(nn.Module):
    """Stands in for the model in pass 2: pass 1 on each batch it is called with, leaves out.

    A paired model (``paired_views``: ``model(images, tokens) -> (z_image, z_text)``) is called
    with several inputs of ``b`` rows each; micro-batch k is then rows ``[k*m, (k+1)*m)`` of
    every input, and the outputs come back as a tuple of leaves.
    """

    def __init__(self, s: TrainState, local_batch: int) -> None:
        super().__init__()
        self._s, self._local_batch = s, local_batch  # (a plain attribute: not a submodule)
        self.paired_views = getattr(unwrap(s.model), "paired_views", False)
        self.calls: list[_Call] = []

    def forward(self, *xs: Tensor) -> Tensor | tuple[Tensor, ...]:
        s = self._s
        call = _Call(xs, micro_batch_rows(xs[0].shape[0], self._local_batch, s.micro_batch))
        model = _without_ddp(s.model)
        with torch.no_grad(), frozen_running_stats(model):
            outs = []
            for rows in call.rows:
                call.rng.append(_rng_state(s.device))
                outs.append(_as_outputs(model(*(x[rows.to(x.device)] for x in xs))))
        leaves = []
        for i, first in enumerate(outs[0]):
            out = first.new_empty((xs[0].shape[0], *first.shape[1:]))
            for rows, o in zip(call.rows, outs, strict=True):
                out[rows.to(out.device)] = o[i]
            leaves.append(out.requires_grad_())
        call.leaves = tuple(leaves)
        self.calls.append(call)
        return call.leaves[0] if len(call.leaves) == 1 else call.leaves


def cached_forward_backward(
    s: TrainState, views: Sequence[Tensor], labels: Tensor | None = None
) -> Tensor:
    """Loss of the local batch (detached), with every parameter's ``.grad`` accumulated.

    The gradients are those of ``criterion.forward_views(model, views)`` under the BatchNorm
    semantics in the module docstring; with an fp16 scaler they are scaled like the plain step's
    (the caller unscales). ``labels`` reach a loss that ``needs_labels`` (they are per sample,
    not per micro-batch: the loss runs once on the whole local batch). Call with zeroed
    gradients; the caller reduces the loss's own gradients and steps the optimizer.
    """
    # Passes 1 + 2: the loss's own forward_views, the model replaced by the micro-batch embedder.
    embedder = _EmbedInMicroBatches(s, views[0].shape[0])
    with s.amp.autocast():
        loss = s.criterion.forward_views(embedder, views, **label_kwargs(s.criterion, labels))
    if not embedder.calls:
        raise GradCacheError(
            f"{type(s.criterion).__name__}.forward_views never called the model on a batch, so "
            "the cached step cannot replay its encoder; unset train.micro_batch_size"
        )
    rng_after = _rng_state(s.device)
    scaler = s.amp.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()  # to the leaves only

    # Pass 3: replay each micro-batch with a graph and its pass-1 RNG; DDP syncs on the last one.
    replays = [(call, k) for call in embedder.calls for k in range(len(call.rows))]
    for n, (call, k) in enumerate(replays):
        _set_rng_state(call.rng[k], s.device)
        last = n == len(replays) - 1
        ddp = isinstance(s.model, DistributedDataParallel)
        with s.model.no_sync() if ddp and not last else contextlib.nullcontext():
            with s.amp.autocast():
                outs = _as_outputs(s.model(*(x[call.rows[k].to(x.device)] for x in call.xs)))
            grads = [
                (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))[
                    call.rows[k].to(leaf.device)
                ].to(out.dtype)
                for leaf, out in zip(call.leaves, outs, strict=True)
            ]
            torch.autograd.backward(outs, grads)
    _set_rng_state(rng_after, s.device)  # the RNG continues as after the loss's forward
    return loss.detach()
