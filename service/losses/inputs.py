"""Input checks and float32 preparation shared by every loss.

All checks that depend on data (batch sizes, non-finite rows) are exchanged across ranks in one
small all-gather, so every rank raises the same ``LossInputError`` instead of some ranks raising
and the others hanging in the embedding all-gather.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.losses import distributed
from service.losses.errors import LossInputError, NonFiniteEmbeddingError


def check_temperature(temperature: float, name: str = "temperature") -> float:
    """Return ``temperature`` as a float, or raise if it is not a finite positive number."""
    try:
        value = float(temperature)
    except (TypeError, ValueError) as exc:
        raise LossInputError(f"{name} must be a positive number, got {temperature!r}") from exc
    if not (value > 0 and math.isfinite(value)):
        raise LossInputError(f"{name} must be > 0 and finite, got {temperature!r}")
    return value


def check_chunk_size(chunk_size: int | None, name: str = "chunk_size") -> int | None:
    """``None`` (no chunking) or a positive int number of key columns per block."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise LossInputError(f"{name} must be a positive integer or None, got {chunk_size!r}")
    return int(chunk_size)


def problems(*checks: tuple[Any, ...]) -> list[str]:
    """The messages of the checks that fail: each ``(check, *args)`` is called and its
    ``LossInputError`` collected, so one range rule serves the constructor (raise) and the
    config (``loss.<key>`` problems, nothing built).

    >>> problems((check_temperature, 0.5, "loss.temperature"),
    ...          (check_temperature, -1.0, "loss.temperature"))
    ['loss.temperature must be > 0 and finite, got -1.0']
    """
    found = []
    for check, *args in checks:
        try:
            check(*args)
        except LossInputError as exc:
            found.append(str(exc))
    return found


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 stays float64: logits never in 16 bit."""
    return torch.promote_types(x.dtype, torch.float32)


def as_views(views: Sequence[Tensor] | tuple[Sequence[Tensor]]) -> tuple[Tensor, ...]:
    """Accept ``crit(z1, z2)`` as well as ``crit([z1, z2])``."""
    if len(views) == 1 and isinstance(views[0], (list, tuple)):
        return tuple(views[0])
    return tuple(views)


@contextlib.contextmanager
def full_precision(views: Sequence[Tensor]) -> Iterator[None]:
    """Disable autocast for the loss: its matmuls must run in the (up-cast) input dtype."""
    first = next((v for v in views if isinstance(v, Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    if device.type in {"cpu", "cuda", "xpu", "mps"}:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


@dataclass(frozen=True)
class Batch:
    """Where this rank's rows sit in the gathered keys."""

    rank: int  # 0 when not gathering
    world: int  # 1 when not gathering
    local: int  # rows per view on this rank

    @property
    def global_size(self) -> int:
        return self.local * self.world


def check_views(
    views: Sequence[Tensor],
    *,
    loss: str,
    gather: bool,
    exact_views: int | None = None,
    min_global_batch: int = 2,
) -> Batch:
    """Validate the views locally and across ranks; returns this rank's place in the batch.

    Raises ``LossInputError`` for: fewer than two views (or not ``exact_views``), non-2-D views,
    views with different shapes, unequal local batches across ranks, non-finite rows (naming the
    view, the rank and the row count) and a global batch below ``min_global_batch``.

    >>> import torch
    >>> check_views([torch.randn(4, 8), torch.randn(4, 8)], loss="demo", gather=True)
    Batch(rank=0, world=1, local=4)
    """
    if len(views) < 2:
        raise LossInputError(f"{loss} needs at least two views, got {len(views)}")
    if exact_views is not None and len(views) != exact_views:
        raise LossInputError(f"{loss} takes exactly {exact_views} views, got {len(views)}")
    for i, v in enumerate(views):
        if not isinstance(v, Tensor):
            raise LossInputError(f"{loss}: view {i} is a {type(v).__name__}, not a Tensor")
        if v.dim() != 2:
            raise LossInputError(
                f"{loss}: view {i} must be [batch, dim], got shape {tuple(v.shape)}"
            )
    shapes = [tuple(v.shape) for v in views]
    if len(set(shapes)) != 1:
        raise LossInputError(f"{loss}: views must have the same shape, got {shapes}")
    b, d = shapes[0]
    bad = [int((~torch.isfinite(v.detach())).any(dim=1).sum()) for v in views]
    first_bad = next((i for i, n in enumerate(bad) if n), -1)
    use_world = gather and distributed.is_distributed()
    rank, world = (distributed.get_rank(), distributed.get_world_size()) if use_world else (0, 1)

    # One small all-gather: the shape check plus [first bad view, its bad rows, total bad rows].
    shape = {"views": len(views), "batch": b, "dim": d}
    bad_stats = [first_bad, bad[first_bad] if first_bad >= 0 else 0, sum(bad)]
    if use_world:
        table = distributed.check_equal_shapes(shape, views[0], loss, extra=bad_stats)
    else:
        table = torch.tensor([[*shape.values(), *bad_stats]])
    for r, (view, rows, total) in enumerate(table[:, len(shape) :].tolist()):
        if total:
            where = f" on rank {r}" if world > 1 else ""
            raise NonFiniteEmbeddingError(
                f"{loss}: non-finite embeddings{where}: view {view} has {rows} row(s) with "
                f"NaN/inf ({total} such row(s) across all views); check the encoder / AMP scaling"
            )
    batch = Batch(rank=rank, world=world, local=b)
    if batch.global_size < min_global_batch:
        raise LossInputError(
            f"{loss}: global batch of {batch.global_size} sample(s) (local {b} x {world} "
            f"rank(s)) has no negatives; need at least {min_global_batch}"
        )
    return batch


def normalized(v: Tensor) -> Tensor:
    """L2-normalise rows in at least float32."""
    return F.normalize(v.to(compute_dtype(v)), dim=1)


def local_anchors_and_keys(views: Sequence[Tensor], batch: Batch) -> tuple[Tensor, Tensor, int]:
    """Normalise and stack the (checked) views; gather them from every rank as keys.

    The NT-Xent family's layout. Returns ``(z, keys, self_offset)``: ``z`` is ``[V*b, d]``
    view-major (row ``v*b + i`` is view v of local sample i), ``keys`` is the rank-major
    concatenation of every rank's ``z`` (``[W*V*b, d]``), and this rank's rows start at
    ``self_offset = rank * V*b``. ``batch`` is what ``check_views`` returned for ``views``.
    """
    z = torch.cat([normalized(v) for v in views])
    keys = distributed.gather_with_grad(z, check_sizes=False) if batch.world > 1 else z
    return z, keys, batch.rank * z.shape[0]
