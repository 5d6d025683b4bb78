"""The batched SimCLR augmentation's eager pipeline as it was before issue 23 (frozen): the
reference that the fused pipeline in service.data.batch_augment must equal for the same seed
(within float tolerance), in tests/test_batch_augment.py and side by side in bench/augment.py.

The old orchestration (rows picked with ``nonzero`` / ``index_select`` / ``index_copy_`` per op
and per jitter step: 16 groups, so its op count grows with the per-sample branching) and the
old crop, hue and blur kernels, copied as they were; the brightness / contrast / saturation /
luma / normalise kernels it shares with the production module did not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.data.batch_augment import (
    CHUNK_ROWS,
    BatchSimCLRAugment,
    ViewParams,
    _per_row,
    adjust_brightness_,
    adjust_contrast_,
    adjust_saturation_,
    gaussian_kernels,
    luma,
    normalize,
    resize_weights,
    to_device,
)


def reference_adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (in turns, [-0.5, 0.5]). S and V do not change, so the
    RGB → HSV → RGB round trip collapses to: hue ``h`` in sextants [0, 6) from RGB as
    torchvision/PIL, then each channel as ``min + (max - min)·ramp(h)`` with the fully
    saturated colour's ramps ``R = |h - 3| - 1``, ``G = 2 - |h - 2|``, ``B = 2 - |h - 4|``
    clamped to [0, 1]. Equal to torchvision's kernel to float rounding and ~4x faster on the
    CPU: which channel is the max is selected with ``sign`` arithmetic, not bool masks or
    ``torch.where``, and ``mod 6`` with ``floor``, not ``remainder`` (those are ~10x slower
    per element on the CPU than plain float arithmetic)."""
    r, g, b = x.unbind(dim=1)
    high = torch.maximum(torch.maximum(r, g), b)
    low = torch.minimum(torch.minimum(r, g), b)
    spread = high - low  # V·S
    not_r = torch.sign(high - r)  # 0 where red is the max (it wins ties, as in torchvision)
    not_g = torch.sign(high - g)
    # max = g: 2 + (b - r)/spread; max = b: 4 + (r - g)/spread; max = r: (g - b)/spread
    from_g = (b - r).add_(spread, alpha=2)
    from_gb = (r - g).add_(spread, alpha=4).sub_(from_g).mul_(not_g).add_(from_g)
    from_r = g - b
    sextant = from_gb.sub_(from_r).mul_(not_r).add_(from_r)
    sextant.div_(spread.clamp(min=1e-12)).add_(_per_row(shift, x)[:, 0], alpha=6)
    hue = sextant.div(6).floor_().mul_(-6).add_(sextant)  # mod 6
    out = torch.empty_like(x)
    for channel, (centre, rising) in enumerate(((3.0, True), (2.0, False), (4.0, False))):
        ramp = (hue - centre).abs_()
        ramp = ramp.sub_(1) if rising else ramp.neg_().add_(2)
        torch.addcmul(low, ramp.clamp_(0, 1), spread, out=out[:, channel])
    return out


REFERENCE_JITTER_OPS = (
    adjust_brightness_,
    adjust_contrast_,
    adjust_saturation_,
    reference_adjust_hue,
)


def reference_gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each row of ``[n, C, H, W]`` with its own ``sigma``: reflect padding (torchvision),
    separable depthwise convolutions with per-row kernels (one grouped conv per axis)."""
    n, c, h, w = x.shape
    (sigma,) = to_device([sigma], x.device)
    kernels = gaussian_kernels(kernel_size, sigma).repeat_interleave(c, dim=0)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def reference_resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor
) -> torch.Tensor:
    """The old crop + resize + flip: one matrix per axis."""
    n, c, height, width = images.shape
    boxes, flip = to_device([boxes, flip], images.device)
    wy = resize_weights(boxes[:, 0], boxes[:, 2], height, size)
    wx = resize_weights(boxes[:, 1], boxes[:, 3], width, size, reverse=flip)
    if not images.is_floating_point():
        wy = wy / 255.0
    columns = torch.bmm(images.float().reshape(n, c * height, width), wx.transpose(1, 2))
    return wy[:, None] @ columns.view(n, c, height, size)


def reference_color_jitter_rows(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """The old ColorJitter: at each of the 4 steps every op on the rows it falls on (16 groups)."""
    groups = [
        (rows & (order[:, step] == op_id)).nonzero()[:, 0]
        for step in range(4)
        for op_id in range(4)
    ]
    factors, *indices = to_device([factors, *groups], x.device)
    for i, idx in enumerate(indices):
        if len(groups[i]):
            op_id = i % 4
            jittered = REFERENCE_JITTER_OPS[op_id](
                x.index_select(0, idx), factors.index_select(0, idx)[:, op_id]
            )
            x.index_copy_(0, idx, jittered)
    return x


def reference_render(
    augment: BatchSimCLRAugment, source: torch.Tensor, params: ViewParams
) -> torch.Tensor:
    """The old per-chunk pipeline: row ``r`` a view of ``source[r]`` (on a GPU: the batch)."""
    x = reference_resized_crop(source, params.boxes, augment.image_size, params.flip)
    reference_color_jitter_rows(x, params.factors, params.order, params.jitter)
    gray, blur = params.grayscale.nonzero()[:, 0], params.blur.nonzero()[:, 0]
    gray_idx, blur_idx = to_device([gray, blur], x.device)
    if len(gray):
        x.index_copy_(0, gray_idx, luma(x.index_select(0, gray_idx)).expand(-1, 3, -1, -1))
    if len(blur):
        sigma = params.sigma[blur]
        blurred = reference_gaussian_blur(x.index_select(0, blur_idx), augment.blur_kernel, sigma)
        x.index_copy_(0, blur_idx, blurred)
    return normalize(x, augment.cfg.mean, augment.cfg.std)


def reference_apply(
    augment: BatchSimCLRAugment, images: torch.Tensor, params: ViewParams
) -> torch.Tensor:
    """The old ``BatchSimCLRAugment.apply``: row ``r`` a view of ``images[r % B]``."""
    b = len(images)
    out = torch.empty(len(params), 3, augment.image_size, augment.image_size, device=images.device)
    chunk = CHUNK_ROWS if images.device.type == "cpu" else max(1, len(params))
    for start in range(0, len(params), chunk):
        rows = slice(start, start + chunk)
        (index,) = to_device([torch.arange(len(params))[rows] % b], images.device)
        out[rows] = reference_render(augment, images.index_select(0, index), params[rows])
    return out


def reference_views(
    augment: BatchSimCLRAugment, images: torch.Tensor, sizes: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The old ``BatchSimCLRAugment.__call__`` (draws from ``augment``'s generator, as it does)."""
    b, _, height, width = images.shape
    if sizes is not None:
        extent = sizes.to("cpu", torch.long).repeat(augment.n_views, 1)
        height, width = extent[:, 0], extent[:, 1]
    views = reference_apply(augment, images, augment.sample(augment.n_views * b, height, width))
    return list(views.split(b))
