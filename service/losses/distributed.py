"""Rank / world size and all-gathers for the losses: the only module that calls collectives.

``gather_with_grad`` uses the functional collectives' autograd all-gather, whose backward is a
reduce-scatter (sum) of the gathered gradient. That is the property the exact distributed loss
needs: every rank's loss depends on every rank's embeddings, so the gradient that reaches rank r's
embeddings must be the *sum* of the contributions from all ranks' losses. Known ways to get this
wrong: a hand-written ``GatherLayer`` whose backward keeps only its own slice without summing
(lightly #1528), or a plain ``dist.all_gather`` that silently cuts the graph (open_clip #980).

Unequal local batch sizes are rejected, not padded: DDP averages per-rank gradients with equal
weights, which equals the global-batch gradient only when every rank holds the same number of
samples. Use ``drop_last=True`` (or the per-worker batch from ``Config``) upstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from service.losses.errors import LossInputError


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device(like: Tensor) -> torch.device:
    # gloo only moves CPU tensors; NCCL only CUDA ones. Small metadata follows the backend.
    return torch.device("cpu") if dist.get_backend() == "gloo" else like.device


def all_gather_ints(values: list[int], like: Tensor) -> Tensor:
    """All-gather a short list of ints from every rank: returns ``[world, len(values)]`` (CPU).

    Every rank must pass a list of the same length. Used for cheap metadata checks (batch sizes,
    non-finite counts) so that all ranks can raise the same error together instead of deadlocking.
    """
    local = torch.tensor(values, dtype=torch.int64, device=_collective_device(like))
    if not is_distributed():
        return local.unsqueeze(0).cpu()
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return torch.stack(out).cpu()


def check_equal_shapes(
    shape: dict[str, int], like: Tensor, what: str, extra: Sequence[int] = ()
) -> Tensor:
    """The one cross-rank shape check: raise ``LossInputError`` on every rank if shapes differ.

    ``shape`` names this rank's local sizes (e.g. ``{"views": 2, "batch": 4, "dim": 128}``; every
    rank passes the same names). ``extra`` ints (e.g. non-finite row counts) ride along in the
    same all-gather, so a caller needs one collective for all its checks. Returns the gathered
    ``[world, len(shape) + len(extra)]`` table (one row when not distributed).
    """
    values = [*shape.values(), *extra]
    table = all_gather_ints(values, like)
    sizes = table[:, : len(shape)]
    if not bool((sizes == sizes[0]).all()):
        described = ", ".join(
            f"rank {rank}: " + " ".join(f"{name}={n}" for name, n in zip(shape, row, strict=True))
            for rank, row in enumerate(sizes.tolist())
        )
        raise LossInputError(
            f"{what}: ranks have different local shapes ({described}); every rank must hold the "
            "same local batch (use drop_last=True) so that DDP's gradient average equals the "
            "global-batch gradient"
        )
    return table


def _row_layout(x: Tensor) -> dict[str, int]:
    # What concatenation along dim 0 needs to agree on: the rank of x and the size of one row.
    return {"dims": x.dim(), "batch": x.shape[0] if x.dim() else 0, "row_numel": x[:1].numel()}


def average_gradients(params: Iterable[Tensor]) -> None:
    """All-reduce and average over ranks the ``.grad`` of ``params`` that have one.

    For parameters that DDP does not see (a learnable temperature in the loss). Every rank must
    hold gradients for the same parameters, in the same order. No-op when not distributed.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world


# Known distributed bugs that ``contrastive check --drill NAME`` can switch on for one run, so a
# user sees the check catch them on their own cluster (``simulated_bug``).
SIMULATED_BUGS = ("gather_without_grad",)
_simulated: set[str] = set()


@contextmanager
def simulated_bug(name: str | None) -> Iterator[None]:
    """Within the block, ``gather_with_grad`` behaves like the bug ``name`` (None: no bug).

    ``gather_without_grad``: a plain all-gather with this rank's own rows put back, the common
    hand-written version (open_clip #980, lightly #1528): the forward and the loss are right, but
    the gradient of the other ranks' losses never reaches this rank's embeddings.
    """
    if name is not None and name not in SIMULATED_BUGS:
        raise ValueError(f"unknown simulated bug {name!r}; known: {', '.join(SIMULATED_BUGS)}")
    if name is not None:
        _simulated.add(name)
    try:
        yield
    finally:
        _simulated.discard(name or "")


def _gather_keeping_only_local_grad(x: Tensor, check_sizes: bool) -> Tensor:
    gathered = gather_no_grad(x, check_sizes)
    start = dist.get_rank() * x.shape[0]
    return torch.cat([gathered[:start], x, gathered[start + x.shape[0] :]])


def gather_with_grad(x: Tensor, check_sizes: bool = True) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably.

    The backward sums the gathered gradient across ranks (reduce-scatter), so rank r's ``x``
    receives the gradient of *every* rank's loss with respect to it. Returns ``x`` unchanged when
    torch.distributed is not initialised or the world has one rank.

    >>> import torch
    >>> gather_with_grad(torch.ones(2, 3)).shape  # not distributed: identity
    torch.Size([2, 3])
    """
    if not is_distributed():
        return x
    if _simulated:  # contrastive check --drill gather_without_grad
        return _gather_keeping_only_local_grad(x, check_sizes)
    if check_sizes:
        check_equal_shapes(_row_layout(x), x, "gather_with_grad")
    from torch.distributed import _functional_collectives as fc

    # all_gather_tensor_autograd is a deprecated alias of all_gather_single_autograd in 2.14.
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather(x.contiguous(), 0, dist.group.WORLD)
    # Wait now and hand back a plain tensor: keeps the async subclass out of downstream kernels.
    return out.wait() if isinstance(out, fc.AsyncCollectiveTensor) else out


def broadcast_from_rank0(x: Tensor) -> Tensor:
    """Rank 0's ``x`` on every rank (same shape and dtype everywhere); ``x`` when not distributed.

    E.g. MoCo's shuffle-BN permutation: every rank must index the gathered batch the same way.
    """
    if not is_distributed():
        return x
    out = x.detach().to(_collective_device(x)).clone()  # never overwrite the caller's x
    dist.broadcast(out, src=0)
    return out.to(x.device)


def gather_no_grad(x: Tensor, check_sizes: bool = True) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 without autograd (e.g. MoCo queue keys)."""
    if not is_distributed():
        return x.detach()
    if check_sizes:
        check_equal_shapes(_row_layout(x), x, "gather_no_grad")
    x = x.detach().contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)
