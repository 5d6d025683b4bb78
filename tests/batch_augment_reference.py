"""The batched SimCLR augmentation's eager pipeline as it was before issue 23 (frozen): the
reference that the fused pipeline in service.data.batch_augment must equal for the same seed
(within float tolerance), in tests/test_batch_augment.py and side by side in bench/augment.py.

It runs the same per-op kernels (crop, jitter ops, luma, blur, normalise) with the old
orchestration: rows picked with ``nonzero`` / ``index_select`` / ``index_copy_`` per op and per
jitter step (16 groups), so its op count grows with the per-sample branching.
"""

from __future__ import annotations

import torch

from service.data.batch_augment import (
    CHUNK_ROWS,
    JITTER_OPS,
    BatchSimCLRAugment,
    ViewParams,
    gaussian_blur,
    luma,
    normalize,
    resize_weights,
    to_device,
)


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
            jittered = JITTER_OPS[op_id](
                x.index_select(0, idx), factors.index_select(0, idx)[:, op_id]
            )
            x.index_copy_(0, idx, jittered)
    return x


def _reference_views(
    augment: BatchSimCLRAugment, source: torch.Tensor, params: ViewParams
) -> torch.Tensor:
    x = reference_resized_crop(source, params.boxes, augment.image_size, params.flip)
    reference_color_jitter_rows(x, params.factors, params.order, params.jitter)
    gray, blur = params.grayscale.nonzero()[:, 0], params.blur.nonzero()[:, 0]
    gray_idx, blur_idx = to_device([gray, blur], x.device)
    if len(gray):
        x.index_copy_(0, gray_idx, luma(x.index_select(0, gray_idx)).expand(-1, 3, -1, -1))
    if len(blur):
        sigma = params.sigma[blur]
        blurred = gaussian_blur(x.index_select(0, blur_idx), augment.blur_kernel, sigma)
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
        out[rows] = _reference_views(augment, images.index_select(0, index), params[rows])
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
