"""Global BatchNorm: batch statistics over every rank's samples, on any backend (gloo or NCCL).

``model.sync_batchnorm: true`` swaps every BatchNorm of the training model for
:class:`GlobalBatchNorm` (:func:`convert_to_global_bn`). In training mode, inside a process group
of more than one rank, each layer normalises by the mean and variance of the *global* batch:

* forward: one ``all_reduce`` of ``[sum, sum of squares, count]`` per channel (a single stacked
  float64 tensor, built from each rank's numerically stable mean and variance), so ranks may even
  hold different numbers of rows;
* backward: one ``all_reduce`` of ``[sum dy, sum dy*x_hat]``, which makes the input gradient the
  gradient of BatchNorm over the global batch. The weight and bias gradients stay local sums, as
  for every other parameter: DDP averages them, like the loss's gradients.

With DDP's gradient average this is exactly one process on the concatenated batch (tested on 2
and 3 gloo ranks: ``tests/test_global_bn.py``). Running statistics are updated with the global
mean and unbiased variance, as ``nn.BatchNorm`` on the concatenated batch would, so they are the
same on every rank. Eval mode uses the running statistics and never communicates; with one process
(no group, or a group of one) the layer is plain ``F.batch_norm``.

Unlike ``nn.SyncBatchNorm`` (CUDA only) it runs on CPU tensors, so gloo workers get the same
meaning of ``model.sync_batchnorm`` as NCCL ones. Every rank must call a layer in training mode the
same number of times (true for DDP training; the cached-gradient step runs the same micro-batches
on every rank). :func:`convert_to_local_bn` turns the layers back into the original BatchNorm
classes: MoCo's key encoder uses that, because its shuffle-BN needs per-rank statistics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _acc_dtype(x: Tensor) -> torch.dtype:
    # statistics in at least float32 (bf16/fp16 activations under autocast), float64 kept
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _global_moments(x: Tensor, group: Any) -> tuple[Tensor, Tensor, float]:
    """Global per-channel mean and biased variance of ``x`` over all ranks (float64), and the
    global row count."""
    channels = x.shape[1]
    n_local = x.numel() // channels if channels else 0
    if n_local:  # the fused per-channel kernel of nn.BatchNorm (CPU and CUDA)
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        mean, var = mean.double(), var.double()
    else:  # an empty local batch still joins the collective
        mean = var = torch.zeros(channels, dtype=torch.float64, device=x.device)
    count = torch.full((1,), float(n_local), dtype=torch.float64, device=x.device)
    # n*mean and n*(var + mean^2) are the sum and the sum of squares; built from the stable local
    # moments and combined in float64, the global variance does not cancel catastrophically.
    stats = torch.cat([mean * n_local, (var + mean * mean) * n_local, count])
    dist.all_reduce(stats, group=group)
    n = float(stats[-1])
    if n == 0:
        raise ValueError("GlobalBatchNorm: the global batch is empty")
    g_mean = stats[:channels] / n
    g_var = (stats[channels : 2 * channels] / n - g_mean * g_mean).clamp_min(0)
    return g_mean, g_var, n


def _affine(
    x: Tensor, mean: Tensor, var: Tensor, scale: Tensor, shift: Tensor, eps: float
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * scale + shift`` per channel, in one fused pass (the
    elementwise kernel of ``nn.BatchNorm`` in eval mode)."""
    return F.batch_norm(x, mean, var, scale, shift, False, 0.0, eps)


class _GlobalBatchNormFn(torch.autograd.Function):
    """BatchNorm over the global batch; ``forward`` also updates the running buffers in place.

    Built from torch's fused BatchNorm kernels (the CPU has no ``batch_norm_elemt`` /
    ``backward_reduce`` that ``nn.SyncBatchNorm`` uses): per-channel statistics, the eval-mode
    normalisation with the global statistics, and eval-mode backward for the two gradient sums.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        factor: float,
        group: Any,
    ) -> Tensor:
        xa = x.to(_acc_dtype(x))  # bf16/fp16 under autocast: statistics and output in fp32
        mean64, var64, n = _global_moments(xa, group)
        if running_mean is not None and running_var is not None:
            unbiased = var64 * (n / max(n - 1.0, 1.0))  # as nn.BatchNorm: n/(n-1) on the batch
            running_mean.mul_(1 - factor).add_(mean64.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        mean, var = mean64.to(xa.dtype), var64.to(xa.dtype)
        w = weight.to(xa.dtype) if weight is not None else torch.ones_like(mean)
        b = bias.to(xa.dtype) if bias is not None else torch.zeros_like(mean)
        ctx.save_for_backward(xa, w, mean, var)
        ctx.n, ctx.group, ctx.eps = n, group, eps
        ctx.param_dtype = weight.dtype if weight is not None else None
        return _affine(xa, mean, var, w, b, eps).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        xa, w, mean, var = ctx.saved_tensors
        dy = grad_out.to(xa.dtype)
        # sum(dy * x_hat) and sum(dy) per channel in one fused pass: the weight and bias
        # gradients of eval-mode BatchNorm with the global statistics as its running ones
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, xa, w, mean, var, None, None, False, ctx.eps, [False, True, True]
        )
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # The input gradient needs the *global* means of dy and dy*x_hat (every rank's rows
            # moved the statistics); each rank's dy is already d(sum of all ranks' losses)/dy.
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            channels = sum_dy.shape[0]
            mean_dy, mean_dy_xhat = sums[:channels] / ctx.n, sums[channels:] / ctx.n
            # dx = s * (dy - mean(dy) - x_hat * mean(dy*x_hat)), s = w / sqrt(var + eps):
            # the x_hat part in one fused pass from x (stable), then + s * dy
            s = w * torch.rsqrt(var + ctx.eps)
            grad_x = _affine(xa, mean, var, -s * mean_dy_xhat, -s * mean_dy, ctx.eps)
            grad_x.addcmul_(dy, _per_channel(s, dy))
            grad_x = grad_x.to(grad_out.dtype)
        if ctx.param_dtype is not None and ctx.needs_input_grad[1]:
            # local sums: DDP averages them like any other gradient
            grad_w = sum_dy_xhat.to(ctx.param_dtype)
        if ctx.param_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(ctx.param_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics span every rank of ``process_group`` (default: the
    world), for inputs ``[N, C, *]`` (BatchNorm1d/2d/3d shapes). See the module docstring.

    With one process it is exactly ``nn.BatchNorm``:

    >>> bn, ref = GlobalBatchNorm(3), nn.BatchNorm1d(3)
    >>> x = torch.randn(8, 3)
    >>> torch.allclose(bn(x), ref(x)), torch.allclose(bn.running_var, ref.running_var)
    (True, True)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self.local_class: type[_BatchNorm] | None = None  # what convert_to_local_bn restores

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [N, C, ...], got {input.dim()}D")

    def _group(self) -> Any:
        """The group to reduce over, or None when there is no other rank."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else factor
        # as _BatchNorm: batch statistics in training (or without running buffers); the running
        # buffers are updated only in training with track_running_stats
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        group = self._group() if self.training else None  # eval never communicates
        if group is None:
            return F.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, batch_stats, factor,
                self.eps,
            )  # fmt: skip
        return _GlobalBatchNormFn.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group
        )


def _copy_bn_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    # the same Parameter and buffer objects: the state_dict keys and values are unchanged
    if source.affine:
        target.weight, target.bias = source.weight, source.bias
    target.running_mean, target.running_var = source.running_mean, source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    return target


def convert_to_global_bn(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Every BatchNorm in ``module`` (any ``_BatchNorm``, SyncBatchNorm included) replaced by a
    :class:`GlobalBatchNorm` with the same parameters and buffers (like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``). Call before DDP wrapping.

    >>> net = convert_to_global_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    >>> type(net[1]).__name__, type(convert_to_local_bn(net)[1]).__name__
    ('GlobalBatchNorm', 'BatchNorm2d')
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, process_group,
        )  # fmt: skip
        out.local_class = type(module)
        _copy_bn_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, convert_to_global_bn(child, process_group))
    return out


class _AnyRankBatchNorm(nn.BatchNorm1d):
    """Plain BatchNorm accepting ``[N, C, *]`` (a layer built directly as GlobalBatchNorm)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [N, C, ...], got {input.dim()}D")


def convert_to_local_bn(module: nn.Module) -> nn.Module:
    """Every :class:`GlobalBatchNorm` in ``module`` turned back into a per-rank BatchNorm (the
    class it was converted from, same parameters and buffers); everything else unchanged."""
    out = module
    if isinstance(module, GlobalBatchNorm):
        cls = module.local_class
        if cls is None or cls is nn.SyncBatchNorm:
            cls = _AnyRankBatchNorm
        out = cls(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        _copy_bn_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, convert_to_local_bn(child))
    return out
