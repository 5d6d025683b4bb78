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

**BatchNorm semantics.** Each micro-batch (``m`` samples x all views) is normalised by its own
statistics, in both passes (so pass 3 reproduces pass 1 exactly); the result equals a step that
forwards each micro-batch with a graph and backpropagates the full-batch loss once. The running
statistics are frozen in pass 1 and updated in pass 3, i.e. once per sample (``num_batches_tracked``
grows by the number of micro-batches). With ``model.sync_batchnorm`` the statistics of micro-batch
``k`` are synchronised over the ``k``-th micro-batches of all ranks (``W*m*V`` images); every rank
runs the same number of micro-batches, so the collectives match. This is *not* the plain step's
normalisation over the local (or global) batch: BN statistics over fewer samples are a known source
of degraded contrastive training; prefer SyncBN or a head without BN with small micro-batches.

Which losses: every loss whose ``forward_views`` is the base one (encoder over all views
concatenated), and MoCo, whose key encoder runs without a graph (pass 1 only) and whose queue is
written once in pass 2. A loss that overrides ``forward_views`` in an unknown way is refused (the
step cannot know which part of it is the encoder).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from service.config import Config
from service.losses import LOSS_CLASSES, ContrastiveLoss, MoCoLoss
from service.train.state import TrainState


class GradCacheError(ValueError):
    """The configured loss or micro-batch size cannot run as an exact cached-gradient step."""


@dataclass(frozen=True)
class _Split:
    """A loss's ``forward_views`` cut into the part with parameters to train and the rest.

    ``online`` views (the first ``n_online``, None: all) go through the model together, one
    forward per micro-batch; ``frozen(criterion, micro_views)`` returns the embeddings of the other
    views, computed without a graph (MoCo's key encoder), in pass 1 only.
    """

    n_online: int | None
    frozen: Callable[[ContrastiveLoss, Sequence[Tensor]], list[Tensor]] | None = None


def _moco_keys(criterion: ContrastiveLoss, views: Sequence[Tensor]) -> list[Tensor]:
    return [criterion._attached()(views[1])]  # MomentumEncoder: no grad


# Keyed by the forward_views *function* a loss class uses, so a subclass that inherits it is
# covered and one that overrides it is refused.
_SPLITS: dict[Callable, _Split] = {
    ContrastiveLoss.forward_views: _Split(n_online=None),
    MoCoLoss.forward_views: _Split(n_online=1, frozen=_moco_keys),
}


def _split_for(loss_cls: type) -> _Split | None:
    return _SPLITS.get(loss_cls.forward_views)


def gradcache_problems(config: Config) -> list[str]:
    """Why ``train.micro_batch_size`` cannot run with this config (empty: it can, or it is off)."""
    m = config.train.micro_batch_size
    if m is None:
        return []
    problems = []
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        problems.append(f"train.micro_batch_size must be a positive integer or null, got {m!r}")
    cls = LOSS_CLASSES.get(config.loss.name)
    if cls is not None and _split_for(cls) is None:
        problems.append(
            f"train.micro_batch_size is not supported by loss.name={config.loss.name!r} "
            f"({cls.__name__}): it overrides forward_views, so the cached step cannot tell its "
            "encoder forward from the loss and could not be exact; unset train.micro_batch_size"
        )
    return problems


def uses_gradcache(s: TrainState, local_batch: int) -> bool:
    """True when ``train.micro_batch_size`` is set and smaller than the local batch."""
    m = s.config.train.micro_batch_size
    return m is not None and m < local_batch


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

    ``track_running_stats=False`` in training mode is exactly that in ``_BatchNorm`` and
    ``SyncBatchNorm``: no running buffers passed to ``batch_norm``, no ``num_batches_tracked``
    increment. Restored on exit, also on error.
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


def _online_forward(model: nn.Module, views: Sequence[Tensor], n_online: int) -> Tensor:
    """The model over the online views of one micro-batch in one forward (view-major rows)."""
    return model(torch.cat(list(views[:n_online])))


def cached_forward_backward(s: TrainState, views: Sequence[Tensor]) -> Tensor:
    """Loss of the local batch (detached), with every parameter's ``.grad`` accumulated.

    The gradients are those of ``criterion.forward_views(model, views)`` under the BatchNorm
    semantics in the module docstring; with an fp16 scaler they are scaled like the plain step's
    (the caller unscales). Call with zeroed gradients; the caller reduces the loss's own gradients
    and steps the optimizer.
    """
    problems = gradcache_problems(s.config)
    split = _split_for(type(s.criterion))
    if split is None and not problems:
        problems = [f"{type(s.criterion).__name__} overrides forward_views"]
    if problems:
        raise GradCacheError("; ".join(problems))
    m, b = s.config.train.micro_batch_size, views[0].shape[0]
    n_online = len(views) if split.n_online is None else split.n_online
    bounds = [(i, min(i + m, b)) for i in range(0, b, m)]
    micro = [[v[i:j] for v in views] for i, j in bounds]

    # Pass 1: embeddings without a graph, RNG state saved per micro-batch.
    rng, online, frozen = [], [], []
    with torch.no_grad(), s.amp.autocast(), frozen_running_stats(s.model):
        for mv in micro:
            rng.append(_rng_state(s.device))
            out = _online_forward(_without_ddp(s.model), mv, n_online)
            online.append(out.chunk(n_online))
            frozen.append(split.frozen(s.criterion, mv) if split.frozen else [])
    rng_after = _rng_state(s.device)

    # Pass 2: the loss over the whole local batch once (gathers across ranks), backward to the
    # embeddings (and the loss's own parameters) only.
    leaves = [torch.cat([o[v] for o in online]).requires_grad_() for v in range(n_online)]
    keys = [torch.cat([f[v] for f in frozen]) for v in range(len(frozen[0]))]
    with s.amp.autocast():
        loss = s.criterion(*leaves, *keys)
    scaler = s.amp.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    cache = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    del leaves, online, frozen

    # Pass 3: replay each micro-batch with a graph and the same RNG; DDP syncs on the last one.
    last = len(micro) - 1
    for k, ((i, j), mv) in enumerate(zip(bounds, micro, strict=True)):
        _set_rng_state(rng[k], s.device)
        sync = k == last or not isinstance(s.model, DistributedDataParallel)
        with contextlib.nullcontext() if sync else s.model.no_sync():
            with s.amp.autocast():
                out = _online_forward(s.model, mv, n_online)
            out.backward(torch.cat([g[i:j] for g in cache]).to(out.dtype))
    _set_rng_state(rng_after, s.device)  # the RNG continues as after one pass over the batch
    return loss.detach()
