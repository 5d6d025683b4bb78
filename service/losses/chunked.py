"""Row-wise log-sum-exp of ``x @ keys.T`` with an optional self-exclusion band, optionally streamed.

This is the heavy part of every InfoNCE-style loss: for each anchor row ``x_i`` (already scaled by
1/temperature) the log of the partition function over all keys, leaving out the anchor's own
embedding. Everything else (positive logits) is O(n*d) and done with plain autograd.

``masked_logsumexp`` is a custom ``autograd.Function`` in two modes:

* ``chunk_size=None``: one block. The forward keeps ``e = exp(logits - rowmax)`` and the row sums
  for the backward; the backward folds the softmax normalisation and the incoming gradient into
  O(n*d) row scalings, so it is two matmuls and no extra pass over the n x m matrix.
* ``chunk_size=k``: streams over key blocks of k columns with a running (max, sum) pair and saves
  only ``x``, ``keys`` and the n log-sum-exps. The backward recomputes each block. Peak extra
  memory is O(n*k) instead of O(n*m); gradients w.r.t. ``x`` and ``keys`` are exact.

Self-exclusion: anchor row i is excluded from key column ``self_offset + i`` (the layout used by the
losses: local anchors sit at ``rank * n`` inside the gathered keys). The excluded logit is set to a
large negative *finite* value, whose exp is exactly 0: no -inf, so no NaN in any backward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from service.losses.errors import LossInputError

# exp(MASKED - anything reasonable) == 0.0 exactly in float32/float64, and it is finite.
MASKED = -1.0e30


def _mask_band(block: Tensor, start: int, self_offset: int | None) -> None:
    """In place: ``block[i, self_offset + i - start] = MASKED`` wherever that column is in block."""
    if self_offset is None:
        return
    n, k = block.shape
    first = max(0, start - self_offset)  # first anchor row whose self column is >= start
    last = min(n, start + k - self_offset)  # one past the last row whose self column is < start+k
    if last > first:
        col = first + self_offset - start
        block[first:last, col : col + (last - first)].fill_diagonal_(MASKED)


class _MaskedLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, keys: Tensor, self_offset: int | None, chunk_size: int | None
    ) -> Tensor:
        m = keys.shape[0]
        ctx.self_offset = self_offset
        if chunk_size is None or chunk_size >= m:
            logits = x @ keys.T
            _mask_band(logits, 0, self_offset)
            row_max = logits.amax(dim=1)
            e = logits.sub_(row_max[:, None]).exp_()  # in place: reuse the logits' memory
            row_sum = e.sum(dim=1)
            ctx.chunk_size = None
            ctx.save_for_backward(x, keys, e, row_sum)
            return row_max + row_sum.log()
        run_max = run_sum = None
        for start in range(0, m, chunk_size):
            block = x @ keys[start : start + chunk_size].T
            _mask_band(block, start, self_offset)
            block_max = block.amax(dim=1)
            block_sum = block.sub_(block_max[:, None]).exp_().sum(dim=1)
            del block  # free before the next block's matmul allocates
            if run_max is None:
                run_max, run_sum = block_max, block_sum
            else:
                new_max = torch.maximum(run_max, block_max)
                run_sum = (
                    run_sum * (run_max - new_max).exp() + block_sum * (block_max - new_max).exp()
                )
                run_max = new_max
        lse = run_max + run_sum.log()
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(x, keys, lse)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse: Tensor):  # type: ignore[override]
        # d lse_i / d logit_ij = p_ij = softmax_j. With g the incoming gradient:
        #   grad_x = diag(g) P K,   grad_keys = P^T diag(g) X
        # so g (and, unchunked, the 1/row_sum normalisation) only ever scales n x d matrices.
        need_x, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.chunk_size is None:
            x, keys, e, row_sum = ctx.saved_tensors
            scale = (grad_lse / row_sum)[:, None]
            grad_x = scale * (e @ keys) if need_x else None
            grad_k = e.T @ (scale * x) if need_k else None
            return grad_x, grad_k, None, None
        x, keys, lse = ctx.saved_tensors
        k, m = ctx.chunk_size, keys.shape[0]
        g = grad_lse[:, None]
        gx_unscaled = torch.zeros_like(x) if need_x else None
        grad_k = torch.empty_like(keys) if need_k else None
        gx_rows = g * x if need_k else None
        for start in range(0, m, k):
            kb = keys[start : start + k]
            p = x @ kb.T
            _mask_band(p, start, ctx.self_offset)
            p.sub_(lse[:, None]).exp_()
            if need_x:
                gx_unscaled.addmm_(p, kb)
            if need_k:
                torch.mm(p.T, gx_rows, out=grad_k[start : start + k])
            del p
        grad_x = g * gx_unscaled if need_x else None
        return grad_x, grad_k, None, None


def masked_logsumexp(
    x: Tensor, keys: Tensor, self_offset: int | None = None, chunk_size: int | None = None
) -> Tensor:
    """``lse_i = log sum_{j != self_offset + i} exp(x_i . keys_j)`` for every row of ``x``.

    ``x``: ``[n, d]`` anchors (already multiplied by the logit scale); ``keys``: ``[m, d]``.
    ``self_offset``: column of anchor 0's own embedding in ``keys`` (None: exclude nothing).
    ``chunk_size``: stream over key blocks of this many columns (None: one block).

    >>> import torch
    >>> x, k = torch.randn(4, 3), torch.randn(6, 3)
    >>> full = torch.logsumexp(x @ k.T, dim=1)
    >>> torch.allclose(masked_logsumexp(x, k, chunk_size=4), full, atol=1e-6)
    True
    """
    if chunk_size is not None and chunk_size < 1:
        raise LossInputError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    return _MaskedLogSumExp.apply(x, keys, self_offset, chunk_size)
