"""SimCLR augmentation of a whole uint8 batch at once, on plain torch ops (CPU or CUDA tensors).

The per-image pipeline in :mod:`service.data.augment` pays ~70 µs of Python dispatch per op per
32 px image; here every op is a handful of tensor calls for the whole batch, with independent
random parameters per sample and per view. It is the same pipeline, op for op and in
distribution: crop+resize → flip → colour jitter (p = ``jitter_p``, the four ops in a random
order per sample, as torchvision) → grayscale (p = ``grayscale_p``) → Gaussian blur (p = 0.5,
only with ``augment.blur``) → normalise.

Fixed ops whatever the draws: the per-view parameters travel as one float tensor
(``ViewParams.packed``) and every op reads its per-row factors and masks from it, so the ops
per batch do not grow with per-sample branching (crop + flip: two batched matmuls; each of the
four jitter steps: one blend of every row - brightness, contrast or saturation by per-row
weights - and a masked hue shift; grayscale and blur masked). On a GPU every row runs every op
and ``torch.where`` keeps its own: fixed shapes, no host sync, so the whole pipeline is replayed
from a CUDA graph per input shape (``cuda_graph``; eager after a failed capture). On the CPU
the hue shift, grayscale and blur run on their rows alone (``on_rows(compact=True)``), as the
work, not the op count, is what costs there. Equal to the earlier per-group pipeline
(tests/batch_augment_reference.py) for the same seed to float rounding (<= 2e-6 measured on
normalised CPU views: the hue's last multiply-add is two ops now).

Randomness: all parameters are drawn on the **CPU** from one ``torch.Generator`` (a few numbers
per view), in a fixed order, then moved to the batch's device with the image work. So the same
seed and the same input give the same parameters on every device: identical output on the same
device, and CPU vs CUDA equal up to float rounding. Drawing on the CPU also keeps the data-
dependent choices (which rows get jitter, blur, ...) off the GPU, so nothing waits for it.

On the same parameters every op equals torchvision's float kernel to float32 rounding. It
differs from the PIL pipeline that augment.py runs only where PIL rounds: intermediate results
stay ``float32`` instead of uint8 after every op (crop, brightness <= 1/255; contrast and
saturation <= 2/255) and the hue shift is float instead of PIL's 8-bit HSV (<= 6/255); measured
in tests/test_batch_augment.py.

>>> import torch
>>> from service.config import AugmentConfig
>>> augment = BatchSimCLRAugment(AugmentConfig(), image_size=32, seed=0)
>>> images = torch.randint(0, 256, (8, 3, 40, 36), dtype=torch.uint8)
>>> views = augment(images)  # n_views = augment.n_views (AugmentConfig.n_views = 2)
>>> len(views), tuple(views[0].shape), views[0].dtype
(2, (8, 3, 32, 32), torch.float32)
>>> torch.equal(views[0], BatchSimCLRAugment(AugmentConfig(), 32, seed=0)(images)[0])
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

from service.config import AugmentConfig
from service.data.augment import blur_kernel_size, jitter_strengths, simclr_transform, view_size
from service.data.errors import DataError

# SimCLR / torchvision RandomResizedCrop defaults.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
BLUR_P = 0.5
# Rows augmented together: cache-sized on the CPU (3 x 32 x 32 float32 = 12 KiB a row).
CHUNK_ROWS = 256
BLUR_SIGMA = (0.1, 2.0)
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
LUMA = (0.2989, 0.587, 0.114)
# Column order of ViewParams.factors and the op ids in ViewParams.order (torchvision's fn_idx).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
# Columns of ViewParams.packed(): a view's parameters as one float32 row.
BOX, FLIP, JITTER, FACTORS, ORDER, GRAY, BLUR, SIGMA = (
    slice(0, 4), 4, 5, slice(6, 10), slice(10, 14), 14, 15, 16
)  # fmt: skip
PARAM_WIDTH = 17
# Input shapes whose pipeline is kept captured in a CUDA graph: each keeps its own memory pool
# (the pipeline's intermediates, a few float copies of the views: tens of MB for 1,024 views of
# 32 px, GBs at 224 px), so a full batch and an epoch's last, smaller one; others run eagerly.
MAX_GRAPHS = 2


class Pixels(NamedTuple):
    """Decoded uint8 images ``[B, 3, S, S]`` and each one's extent ``sizes`` ``[B, 2]`` (h, w):
    a non-square image is stored whole, its longer side ``S``, at the top left (the rest is
    padding no crop reaches); a square one fills the tensor."""

    images: torch.Tensor
    sizes: torch.Tensor


@dataclass(frozen=True)
class ViewParams:
    """Random parameters of ``n`` views, one row per view (CPU tensors).

    ``boxes`` are torchvision's crop parameters ``(top, left, height, width)`` in source pixels.
    ``factors`` are (brightness, contrast, saturation, hue) and ``order`` the permutation of the
    four ops applied to that row; both are ignored where ``jitter`` is False.
    """

    boxes: torch.Tensor  # [n, 4] int64
    flip: torch.Tensor  # [n] bool
    jitter: torch.Tensor  # [n] bool
    factors: torch.Tensor  # [n, 4] float32
    order: torch.Tensor  # [n, 4] int64
    grayscale: torch.Tensor  # [n] bool
    blur: torch.Tensor  # [n] bool
    sigma: torch.Tensor  # [n] float32

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, rows: slice | torch.Tensor) -> ViewParams:
        return ViewParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def packed(self) -> torch.Tensor:
        """``[n, PARAM_WIDTH]`` float32, one row per view, columns ``BOX``, ``FLIP``,
        ``JITTER``, ``FACTORS``, ``ORDER``, ``GRAY``, ``BLUR``, ``SIGMA``: what the pipeline
        reads, so a batch's parameters reach a GPU in one copy (a CUDA graph's static buffer in
        one ``copy_``). Box pixels, flags and op ids are small integers: exact in float32.

        >>> p = sample_view_params(AugmentConfig(), 3, 32, 32, torch.Generator().manual_seed(0))
        >>> torch.equal(p.packed()[:, ORDER].long(), p.order), tuple(p.packed().shape)
        (True, (3, 17))
        """
        flags = torch.stack([self.flip, self.jitter], dim=1).float()
        tail = torch.stack([self.grayscale.float(), self.blur.float(), self.sigma.float()], dim=1)
        columns = [self.boxes.float(), flags, self.factors.float(), self.order.float(), tail]
        return torch.cat(columns, dim=1)


# ---------------------------------------------------------------------------- parameter draws


def sample_crop_boxes(
    n: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = CROP_RATIO,
) -> torch.Tensor:
    """``[n, 4]`` crop boxes ``(top, left, h, w)``: ``RandomResizedCrop.make_params`` for ``n``
    draws at once (its 10 tries in parallel, the first valid one kept, else its centre crop).
    ``height``/``width``: the images' size, or one per row (``[n]``: each image's own extent,
    so crops cover the whole of a non-square image, as torchvision's do)."""
    f64 = dict(dtype=torch.float64)
    height = torch.as_tensor(height, dtype=torch.long).expand(n)
    width = torch.as_tensor(width, dtype=torch.long).expand(n)
    area = (height * width).to(torch.float64)[:, None]
    target = torch.empty(n, CROP_TRIES, **f64).uniform_(*scale, generator=generator) * area
    log_ratio = torch.empty(n, CROP_TRIES, **f64)
    aspect = log_ratio.uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    w = (target * aspect).sqrt().round().long()  # round half to even, as Python's round
    h = (target / aspect).sqrt().round().long()
    ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = ok.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(dim=1)
    offsets = torch.rand(n, 2, generator=generator, **f64)
    top = (offsets[:, 0] * (height - h + 1)).long()
    left = (offsets[:, 1] * (width - w + 1)).long()
    fh, fw = _centre_crop_size(height, width, ratio)
    boxes = torch.stack([top, left, h, w], dim=1)
    fallback = torch.stack([(height - fh) // 2, (width - fw) // 2, fh, fw], dim=1)
    return torch.where(found[:, None], boxes, fallback)


def _centre_crop_size(
    height: torch.Tensor, width: torch.Tensor, ratio: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's fallback (a centre crop within the ratio bounds), per row."""
    in_ratio = width.double() / height.double()
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fh = torch.where(narrow, (width / min(ratio)).round().long(), height)
    fw = torch.where(wide, (height * max(ratio)).round().long(), width)
    return fh, fw


def sample_view_params(
    cfg: AugmentConfig,
    n: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    generator: torch.Generator,
) -> ViewParams:
    """Draw the parameters of ``n`` independent views of ``height x width`` images.

    Every draw is made whatever the config (disabled ops are masked off afterwards), so one
    seed gives the same crops whether or not e.g. blur is on."""
    boxes = sample_crop_boxes(n, height, width, (cfg.min_scale, 1.0), generator)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < p

    flip = coin(0.5)
    jitter = coin(cfg.jitter_p) & (cfg.strength > 0)
    *factor_strengths, hue = jitter_strengths(cfg.strength)  # ColorJitter's ranges, as torchvision
    low = torch.tensor([max(0.0, 1 - x) for x in factor_strengths] + [-hue])
    high = torch.tensor([1 + x for x in factor_strengths] + [hue])
    factors = low + (high - low) * torch.rand(n, 4, generator=generator)
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # uniform random permutation
    grayscale = coin(cfg.grayscale_p)
    blur = coin(BLUR_P) & cfg.blur
    sigma = torch.empty(n).uniform_(*BLUR_SIGMA, generator=generator)
    return ViewParams(boxes, flip, jitter, factors, order, grayscale, blur, sigma)


# ------------------------------------------------------------------------ crop, resize, flip


def resize_weights(
    start: torch.Tensor,
    length: torch.Tensor,
    in_size: int,
    out_size: int,
    reverse: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[n, out_size, in_size]`` matrices that crop ``[start, start + length)`` out of an axis of
    ``in_size`` pixels and resize it to ``out_size``: torch's antialiased bilinear
    (``interpolate(antialias=True)``, PIL's BILINEAR) - a triangle filter whose support widens
    with the downscale factor, renormalised over the pixels inside the crop (which also gives
    plain bilinear's edge clamping when upscaling). Rows where ``reverse`` get their output
    pixels in reverse order (a flip, for free)."""
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    device = start.device
    scale = length / out_size
    support = scale.clamp(min=1.0)
    out_pixel = torch.arange(out_size, device=device, dtype=torch.float32)[:, None] + 0.5
    if reverse is not None:
        flipped = reverse.to(device)[:, None, None]
        out_pixel = torch.where(flipped, out_size - out_pixel, out_pixel)
    centre = start + scale * out_pixel
    pixel = torch.arange(in_size, device=device, dtype=torch.float32) + 0.5
    weights = (1 - ((pixel - centre) / support).abs()).clamp_(min=0)
    weights *= ((pixel >= start) & (pixel < start + length)).float()  # [n, 1, in]: small
    return weights / weights.sum(dim=-1, keepdim=True)


def resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop each image of ``[n, 3, H, W]`` (uint8 → scaled to [0, 1], or float) to its box
    (``[n, 4]`` top, left, h, w), resize to ``size x size`` and flip the rows where ``flip``:
    ``F.horizontal_flip(F.resized_crop(..., antialias=True))`` per row, as float32.

    Two batched matmuls with per-row interpolation matrices (flip = reversed columns): exact
    (antialiased when downscaling), as fast on the CPU as ``grid_sample`` (no antialias, reads
    outside the crop at its edges) and ~7x faster than ``roi_align``; see bench/augment.py.
    Square images (the decoded slots) get both axes' matrices from one ``resize_weights``.
    """
    n, c, height, width = images.shape
    flip = torch.zeros(len(boxes), dtype=torch.bool) if flip is None else flip
    boxes, flip = to_device([boxes, flip], images.device)
    if height == width:  # rows [0, n): the y axis, [n, 2n): the x axis
        starts, lengths = boxes[:, :2].t().reshape(-1), boxes[:, 2:].t().reshape(-1)
        reverse = torch.cat([torch.zeros_like(flip), flip])
        wy, wx = resize_weights(starts, lengths, height, size, reverse=reverse).split(n)
    else:
        wy = resize_weights(boxes[:, 0], boxes[:, 2], height, size)
        wx = resize_weights(boxes[:, 1], boxes[:, 3], width, size, reverse=flip)
    if not images.is_floating_point():
        wy = wy / 255.0  # uint8 → [0, 1] folded into the matrix
    columns = torch.bmm(images.float().reshape(n, c * height, width), wx.transpose(1, 2))
    return wy[:, None] @ columns.view(n, c, height, size)


# ------------------------------------------------------------------------------ colour ops
# Float images in [0, 1], one factor per row: torchvision's float kernels, batched. The ops end
# in ``_``: they may overwrite their input (in-place passes are ~2x faster on the CPU); use
# ``x = op_(x, f)``.


def _per_row(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _blend_(x: torch.Tensor, other: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``clamp(f·x + (1 - f)·other, 0, 1)`` (``other`` None = 0)."""
    f = _per_row(factor, x)
    x.mul_(f)
    if other is not None:
        x.add_(other * (1 - f))
    return x.clamp_(0, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """``[n, 1, H, W]`` grayscale of ``[n, 3, H, W]`` (ITU-R 601-2, torchvision's weights and
    order of operations)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def adjust_brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend_(x, None, factor)


def adjust_contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend_(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend_(x, luma(x), factor)


def adjust_hue_(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (in turns, [-0.5, 0.5]). S and V do not change, so the
    RGB → HSV → RGB round trip collapses to: hue ``h`` in sextants [0, 6) from RGB as
    torchvision/PIL, then each channel as ``min + (max - min)·ramp(h)`` with the fully
    saturated colour's ramps ``R = |h - 3| - 1``, ``G = 2 - |h - 2|``, ``B = 2 - |h - 4|``
    clamped to [0, 1]. Equal to torchvision's kernel to float rounding and ~4x faster on the
    CPU: which channel is the max is selected with ``sign`` arithmetic, not bool masks or
    ``torch.where``, and ``mod 6`` with ``floor``, not ``remainder`` (those are ~10x slower
    per element on the CPU than plain float arithmetic). ~25 batched ops (a GPU kernel each),
    the three channels' ramps at once."""
    r, g, b = x.unbind(dim=1)
    low, high = x.amin(dim=1), x.amax(dim=1)  # (torch.aminmax: ~8x slower on the CPU)
    spread = high - low  # V·S
    not_r = torch.sign(high - r)  # 0 where red is the max (it wins ties, as in torchvision)
    not_g = torch.sign(high - g)
    # max = g: 2 + (b - r)/spread; max = b: 4 + (r - g)/spread; max = r: (g - b)/spread
    from_g = (b - r).add_(spread, alpha=2)
    from_gb = (r - g).add_(spread, alpha=4).sub_(from_g).mul_(not_g).add_(from_g)
    from_r = g - b
    sextant = from_gb.sub_(from_r).mul_(not_r).add_(from_r)
    sextant.div_(spread.clamp(min=1e-12)).add_(_per_row(shift, x)[:, 0], alpha=6)
    hue = sextant.div(6).floor_().mul_(-6).add_(sextant).unsqueeze_(1)  # mod 6, [n, 1, H, W]
    centre, slope, offset = _hue_ramps(x.device, x.dtype)  # the three channels at once
    ramp = (hue - centre).abs_().mul_(slope).add_(offset).clamp_(0, 1)
    return ramp.mul_(spread.unsqueeze(1)).add_(low.unsqueeze(1))  # (broadcast addcmul: slow)


def _hue_ramps(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[3, 1, 3, 1, 1]``: per channel the ramp's centre, slope and offset (R = |h - 3| - 1,
    G = 2 - |h - 2|, B = 2 - |h - 4|), made once per device and dtype (a CUDA graph cannot
    hold the host → device copy; the warm-up before a capture makes them)."""
    key = (device, dtype)
    if key not in _HUE_RAMPS:
        ramps = torch.tensor([[3.0, 2.0, 4.0], [1.0, -1.0, -1.0], [-1.0, 2.0, 2.0]], dtype=dtype)
        _HUE_RAMPS[key] = ramps.view(3, 1, 3, 1, 1).to(device)
    return _HUE_RAMPS[key]


_HUE_RAMPS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


JITTER_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness_,
    adjust_contrast_,
    adjust_saturation_,
    adjust_hue_,
)


def on_rows(
    x: torch.Tensor,
    rows: torch.Tensor,
    op: Callable[..., torch.Tensor],
    *per_row: torch.Tensor,
    compact: bool,
) -> torch.Tensor:
    """``x`` with the row-wise ``op(x, *per_row)`` on the rows where ``rows`` (bool ``[n]``),
    the others as they were; ``per_row``: ``[n]`` arguments. ``compact``: on those rows alone,
    in place (``index_select`` / ``index_copy_``: work in proportion to them, the CPU's way;
    needs ``rows`` on the CPU or a device sync); else on every row, then ``torch.where``
    (fixed shapes, no sync: a CUDA graph can hold it). ``op`` must not write to its input.

    >>> x = torch.zeros(3, 1, 2, 2)
    >>> on_rows(x, torch.tensor([True, False, True]), torch.add, torch.ones(3, 1, 1, 1),
    ...         compact=False)[:, 0, 0, 0]
    tensor([1., 0., 1.])
    """
    if not compact:
        return torch.where(rows.view(-1, 1, 1, 1), op(x, *per_row), x)
    index = rows.nonzero()[:, 0]
    if len(index):
        picked = [t.index_select(0, index) for t in (x, *per_row)]
        x.index_copy_(0, index, op(*picked))
    return x


def _blend_step_(
    x: torch.Tensor, factor: torch.Tensor, to_mean: torch.Tensor, to_luma: torch.Tensor
) -> torch.Tensor:
    """One jitter step's blend on every row, in place: ``clamp(f·x + (1 - f)·other, 0, 1)``,
    ``other`` black (brightness), the grey mean (contrast) or the grey image (saturation),
    picked by the per-row weights ``to_mean = (1 - f)·[contrast]``, ``to_luma = (1 - f)·
    [saturation]``. Each op's own product appears once and the others add exact zeros, so it
    equals ``adjust_*_`` bit for bit; ``f = 1`` (a hue step, a row without jitter) is a no-op."""
    grey = luma(x)
    other = grey * _per_row(to_luma, x)
    other += grey.mean(dim=(1, 2, 3), keepdim=True) * _per_row(to_mean, x)
    return x.mul_(_per_row(factor, x)).add_(other).clamp_(0, 1)


def color_jitter_rows(
    x: torch.Tensor,
    factors: torch.Tensor,
    order: torch.Tensor,
    rows: torch.Tensor,
    compact: bool | None = None,
) -> torch.Tensor:
    """ColorJitter on ``rows`` (bool ``[n]``) of ``x``, each row's four ops in its ``order``,
    with a fixed number of batched ops whatever the rows drew: at each of the 4 steps one
    blend of every row (``_blend_step_``: brightness, contrast or saturation, or a no-op) then
    the hue shift of the rows whose step it is (``on_rows``; ``compact`` by default on the CPU,
    where the hue is the costly op). Tensors on ``x``'s device (or the CPU); may overwrite
    ``x``: use the result."""
    compact = x.device.type == "cpu" if compact is None else compact
    factors, order, rows = (t.to(x.device) for t in (factors, order, rows))
    blend = rows[:, None] & (order != HUE)  # [n, 4]: step s of row r blends
    step_factor = torch.where(blend, factors.gather(1, order).to(x.dtype), 1.0)
    keep = 1 - step_factor
    to_mean, to_luma = keep * (order == CONTRAST), keep * (order == SATURATION)
    hue = rows[:, None] & (order == HUE)
    for step in range(4):
        x = _blend_step_(x, step_factor[:, step], to_mean[:, step], to_luma[:, step])
        x = on_rows(x, hue[:, step], adjust_hue_, factors[:, HUE], compact=compact)
    return x


def grayscale(x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W]`` grey images (``luma`` in every channel; a view, broadcast)."""
    return luma(x).expand(-1, 3, -1, -1)


# ---------------------------------------------------------------------- blur and normalise


def gaussian_kernels(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """``[n, kernel_size]`` normalised 1-D Gaussians (torchvision's ``_get_gaussian_kernel1d``)."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, kernel_size, device=sigma.device)
    return torch.softmax(-((x / sigma.float()[:, None]) ** 2), dim=1)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each row of ``[n, C, H, W]`` with its own ``sigma``: reflect padding (torchvision),
    separable depthwise convolutions with per-row kernels (one grouped conv per axis)."""
    n, c, h, w = x.shape
    (sigma,) = to_device([sigma], x.device)
    # each row's kernel for its c channels; expand, not repeat_interleave(int), which may sync
    kernels = gaussian_kernels(kernel_size, sigma)[:, None].expand(n, c, kernel_size)
    kernels = kernels.reshape(n * c, kernel_size)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def _blur(kernel_size: int, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return gaussian_blur(x, kernel_size, sigma)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place."""
    m, s = to_device([torch.tensor(list(mean)), torch.tensor(list(std))], x.device)
    return x.sub_(m.to(x.dtype).view(1, 3, 1, 1)).div_(s.to(x.dtype).view(1, 3, 1, 1))


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Small CPU tensors (parameters, row indices) → ``device`` in one pinned, non-blocking copy
    (grouped by dtype). A plain ``.to("cuda")`` from pageable memory synchronises the stream,
    so a copy per op would make the CPU wait for the GPU a dozen times per batch."""
    if device.type == "cpu" or all(t.device == device for t in tensors):
        return [t.to(device) for t in tensors]
    out: list[torch.Tensor] = list(tensors)
    for dtype in {t.dtype for t in tensors}:
        picked = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in picked])
        flat = flat.pin_memory() if device.type == "cuda" else flat
        parts = flat.to(device, non_blocking=True).split([tensors[i].numel() for i in picked])
        for i, part in zip(picked, parts, strict=True):
            out[i] = part.view(tensors[i].shape)
    return out


# ------------------------------------------------------------------------------ the pipeline


def _render_rows(
    render: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    params: torch.Tensor,
) -> torch.Tensor:
    """``render`` of ``len(params)`` views, row ``r`` a view of ``images[r % B]``."""
    index = torch.arange(len(params), device=images.device) % len(images)
    return render(images.index_select(0, index), params)


class CudaGraphed:
    """``fn(images, params)`` for one input shape, captured in a CUDA graph: each call copies
    its inputs into the graph's static buffers, replays the whole pipeline (one launch for
    its ~180 kernels instead of ~180 launches from Python) and returns a copy of the static
    output (the next replay overwrites it). Built on the first batch: warm-up on a side
    stream (cuBLAS/cuDNN handles, allocator), as ``torch.cuda.graph`` requires, then capture.
    ``fn`` must not sync, copy from the host or draw random numbers (the parameters are
    drawn on the CPU and arrive in ``params``)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        params: torch.Tensor,
    ) -> None:
        self.images, self.params = images.clone(), params.clone()  # the static inputs
        stream = torch.cuda.Stream(images.device)
        stream.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(self.images, self.params)
        torch.cuda.current_stream(images.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = fn(self.images, self.params)

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        self.images.copy_(images)
        self.params.copy_(params)
        self.graph.replay()
        return self.out.clone()


class BatchSimCLRAugment:
    """SimCLR views of a uint8 batch ``[B, 3, H, W]`` (CPU or CUDA) → ``n_views`` normalised
    ``float32`` tensors ``[B, 3, S, S]`` on the same device; parameters independent per sample
    and per view, drawn from a CPU ``torch.Generator`` (``seed``; ``None`` draws the seed from
    torch's global RNG, so ``torch.manual_seed`` makes it reproducible too).

    Each process (DataLoader worker, Train rank) needs its own seed, else they draw the same
    views. ``sample`` + ``apply`` run the pipeline with given parameters (tests, previews).
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        image_size: int,
        *,
        n_views: int | None = None,
        seed: int | None = None,
        cuda_graph: bool = True,
    ) -> None:
        simclr_transform(cfg, image_size)  # the config rules live there: same errors, one place
        self.cfg = cfg
        self.image_size = view_size(cfg, image_size)  # the views' side (augment.crop_size)
        self.n_views = cfg.n_views if n_views is None else n_views
        if self.n_views < 1:
            raise DataError(f"n_views must be >= 1, got {self.n_views}")
        self.blur_kernel = blur_kernel_size(self.image_size)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator().manual_seed(seed)
        self.cuda_graph = cuda_graph  # on CUDA: replay the pipeline from a graph (False: eager)
        self._graphs: dict[tuple, CudaGraphed] = {}
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def sample(self, n: int, height: int | torch.Tensor, width: int | torch.Tensor) -> ViewParams:
        """Parameters of ``n`` views of ``height x width`` images, or of images of their own
        sizes (``[n]`` tensors; advances the generator)."""
        return sample_view_params(self.cfg, n, height, width, self.generator)

    def apply(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """The pipeline with given parameters: ``[n, 3, S, S]`` float32, row ``r`` a view of
        ``images[r % B]``. On the CPU rows go through in chunks of ``CHUNK_ROWS``, so the ~60
        elementwise passes of a chunk stay in cache (~1.5x faster than whole-batch passes); on
        a GPU the whole batch goes at once, its parameters in one copy, the pipeline a fixed
        sequence of kernels replayed from a CUDA graph (``cuda_graph``)."""
        packed = params.packed()
        if images.device.type != "cpu":
            (packed,) = to_device([packed], images.device)
            return self._on_device(images, packed)
        out = torch.empty(len(params), 3, self.image_size, self.image_size)
        for start in range(0, len(params), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            source = images.index_select(0, torch.arange(len(params))[rows] % len(images))
            out[rows] = self.render(source, packed[rows])
        return out

    def render(
        self, source: torch.Tensor, params: torch.Tensor, compact: bool | None = None
    ) -> torch.Tensor:
        """Views of ``source`` ``[n, 3, H, W]`` (uint8, row ``r`` the image of view ``r``)
        with ``params`` ``[n, PARAM_WIDTH]`` (``ViewParams.packed``) on its device. The same
        ops whatever the rows drew (masks, per-row factors): on a GPU every row runs every op
        and ``torch.where`` keeps its own (fixed shapes); ``compact`` (default: on the CPU)
        runs the hue shift, grayscale and blur on their rows alone (``on_rows``)."""
        compact = source.device.type == "cpu" if compact is None else compact
        x = resized_crop(source, params[:, BOX], self.image_size, params[:, FLIP] > 0)
        factors, order = params[:, FACTORS], params[:, ORDER].long()
        if self.cfg.strength > 0 and self.cfg.jitter_p > 0:  # config, not draws: fixed ops
            x = color_jitter_rows(x, factors, order, params[:, JITTER] > 0, compact)
        if self.cfg.grayscale_p > 0:
            x = on_rows(x, params[:, GRAY] > 0, grayscale, compact=compact)
        if self.cfg.blur:
            blur = partial(_blur, self.blur_kernel)
            x = on_rows(x, params[:, BLUR] > 0, blur, params[:, SIGMA], compact=compact)
        mean, std = self._mean_std(x.device)
        return x.sub_(mean).div_(std)

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``augment.mean`` / ``std`` as ``[1, 3, 1, 1]`` tensors on ``device``, made once (a
        CUDA graph cannot hold the host → device copy)."""
        if device not in self._constants:
            stats = torch.tensor([list(self.cfg.mean), list(self.cfg.std)]).view(2, 1, 3, 1, 1)
            self._constants[device] = tuple(to_device([stats], device)[0].unbind(0))
        return self._constants[device]

    def _on_device(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``render`` of the whole batch on a GPU: from a CUDA graph captured per input shape
        (``MAX_GRAPHS`` at most, then eagerly), or eagerly (not CUDA, ``cuda_graph=False``, or
        after a capture failed: a warning, once)."""
        fn = partial(_render_rows, self.render)
        key = (images.device, images.dtype, tuple(images.shape), len(params))
        wanted = self.cuda_graph and images.device.type == "cuda"
        if wanted and (key in self._graphs or len(self._graphs) < MAX_GRAPHS):
            try:
                if key not in self._graphs:
                    self._mean_std(images.device)  # the constants exist before the capture
                    self._graphs[key] = CudaGraphed(fn, images, params)
                return self._graphs[key](images, params)
            except RuntimeError as error:  # e.g. an op that cannot be captured: stay correct
                warnings.warn(
                    f"batched augmentation: CUDA graph capture failed ({error}); "
                    "running it eagerly from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.cuda_graph = False
                self._graphs.clear()
        return fn(images, params)

    def __call__(
        self, images: torch.Tensor | Pixels, sizes: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``n_views`` views of every image; ``sizes`` ``[B, 2]`` (or ``Pixels``): each image's
        extent (h, w) at the top left of its slot, crops drawn within it."""
        if isinstance(images, Pixels):
            images, sizes = images
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"expected a batch [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise DataError(f"expected uint8 images, got {images.dtype}")
        b, _, height, width = images.shape
        if sizes is not None:  # row r of the views is a view of image r % b
            extent = sizes.to("cpu", torch.long).repeat(self.n_views, 1)
            height, width = extent[:, 0], extent[:, 1]
        views = self.apply(images, self.sample(self.n_views * b, height, width))
        return list(views.split(b))

    def __repr__(self) -> str:
        return (
            f"BatchSimCLRAugment(image_size={self.image_size}, n_views={self.n_views}, "
            f"cfg={self.cfg})"
        )
