"""SimCLR augmentations (torchvision ``transforms.v2``), the eval transform, multi-view wrapping,
and the ``augment`` section's rules.

The colour-jitter strength ``s`` (``augment.strength``) and ``augment.min_scale`` are what Ray Tune
searches, so they enter the pipeline in exactly one place each: :func:`jitter_strengths` (also
what the batched pipeline, :mod:`service.data.batch_augment`, draws its factors from) and the
``RandomResizedCrop`` in :func:`simclr_transform`. Both readers build their transform here. The
rules for the section live here too (:func:`augment_config_problems`, gathered by preflight); the
transforms raise the same messages for the values they use.

Transforms take an RGB ``PIL.Image`` (from :func:`service.data.decode.decode_image`): at 32 px the
PIL kernels are ~1.5x faster than the tensor ones, so conversion to a tensor happens last.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from service.config import AugmentConfig
from service.data.errors import DataError

# torchvision requires hue jitter <= 0.5, i.e. 0.2 * s <= 0.5 (jitter_strengths).
MAX_STRENGTH = 2.5
MIN_CROP_SIZE = 8  # the small CNN halves the map three times


def jitter_strengths(strength: float) -> tuple[float, float, float, float]:
    """SimCLR's colour jitter for strength ``s``: (brightness, contrast, saturation, hue) =
    (0.8s, 0.8s, 0.8s, 0.2s), in torchvision ``ColorJitter``'s sense (a factor in
    ``[max(0, 1 - x), 1 + x]``, a hue shift in ``[-x, x]``).

    >>> jitter_strengths(0.5)
    (0.4, 0.4, 0.4, 0.1)
    """
    s = float(strength)
    return 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s


def _strength_problem(strength: float) -> str | None:
    if 0 <= strength <= MAX_STRENGTH:
        return None
    return (
        f"augment.strength must be in [0, {MAX_STRENGTH}] (hue jitter 0.2*s <= 0.5), got {strength}"
    )


def _min_scale_problem(min_scale: float) -> str | None:
    if 0 < min_scale <= 1:
        return None
    return f"augment.min_scale must be in (0, 1], got {min_scale}"


def _mean_std_problem(mean: Sequence[float], std: Sequence[float]) -> str | None:
    if len(mean) == 3 and len(std) == 3 and min(std, default=0) > 0:
        return None
    return f"augment.mean/std must be 3 values with std > 0, got {mean}/{std}"


def _raise_if(problem: str | None) -> None:
    if problem is not None:
        raise DataError(problem)


def augment_config_problems(a: AugmentConfig) -> list[str]:
    """What is wrong with the ``augment`` section (empty when nothing).

    >>> augment_config_problems(AugmentConfig(strength=3.0))
    ['augment.strength must be in [0, 2.5] (hue jitter 0.2*s <= 0.5), got 3.0']
    """
    problems = [_strength_problem(a.strength), _min_scale_problem(a.min_scale)]
    if a.n_views < 2:
        problems.append(f"augment.n_views must be >= 2, got {a.n_views}")
    if a.crop_size is not None and a.crop_size < MIN_CROP_SIZE:
        problems.append(
            f"augment.crop_size must be >= {MIN_CROP_SIZE} px (or null for data.image_size), "
            f"got {a.crop_size}"
        )
    for key in ("grayscale_p", "jitter_p"):
        if not 0 <= getattr(a, key) <= 1:
            problems.append(f"augment.{key} must be in [0, 1], got {getattr(a, key)}")
    problems.append(_mean_std_problem(a.mean, a.std))
    return [problem for problem in problems if problem is not None]


def color_jitter(strength: float) -> v2.ColorJitter | None:
    """SimCLR's ColorJitter(0.8s, 0.8s, 0.8s, 0.2s); ``None`` for s = 0 (no jitter at all)."""
    _raise_if(_strength_problem(strength))
    if strength == 0:
        return None
    brightness, contrast, saturation, hue = jitter_strengths(strength)
    return v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)


def blur_kernel_size(image_size: int) -> int:
    """~10% of the image side, odd, at least 3 (SimCLR: 23 px at 224 px)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    _raise_if(_mean_std_problem(mean, std))
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def view_size(cfg: AugmentConfig, image_size: int) -> int:
    """Side of a training view: ``augment.crop_size``, else the data's ``image_size``.

    >>> view_size(AugmentConfig(crop_size=16), 32), view_size(AugmentConfig(), 32)
    (16, 32)
    """
    return cfg.crop_size or image_size


def simclr_transform(cfg: AugmentConfig, image_size: int) -> v2.Compose:
    """One random SimCLR view of an RGB PIL image → normalised ``float32`` tensor ``[3, S, S]``
    (``S = view_size(cfg, image_size)``).

    >>> from PIL import Image
    >>> t = simclr_transform(AugmentConfig(strength=0.5), image_size=32)
    >>> t(Image.new("RGB", (40, 30))).shape
    torch.Size([3, 32, 32])
    """
    _raise_if(_min_scale_problem(cfg.min_scale))
    size = view_size(cfg, image_size)
    ops: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    jitter = color_jitter(cfg.strength)
    if jitter is not None and cfg.jitter_p > 0:
        ops.append(v2.RandomApply([jitter], p=cfg.jitter_p))
    if cfg.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=cfg.grayscale_p))
    if cfg.blur:
        kernel = blur_kernel_size(size)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose(ops + _normalize(cfg.mean, cfg.std))


def _eval_geometry(image_size: int) -> list[v2.Transform]:
    return [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Deterministic transform for kNN / linear eval and embedding: resize the shorter side to
    ``image_size``, centre-crop to ``image_size`` x ``image_size``, normalise."""
    return v2.Compose(_eval_geometry(image_size) + _normalize(mean, std))


def eval_pixels(image: Any, image_size: int) -> torch.Tensor:
    """The geometric half of :func:`eval_transform` (resize, centre crop) of an RGB PIL image as
    uint8 ``[3, S, S]``: what an evaluation decodes once and keeps; :func:`eval_normalize` on a
    batch of these gives exactly ``eval_transform``'s tensors.

    >>> from PIL import Image
    >>> image = Image.new("RGB", (40, 30), (200, 100, 0))
    >>> batch = eval_pixels(image, 16)[None]
    >>> batch.dtype, torch.equal(eval_normalize([0.5] * 3, [0.25] * 3)(batch)[0],
    ...                          eval_transform(16, [0.5] * 3, [0.25] * 3)(image))
    (torch.uint8, True)
    """
    return v2.functional.pil_to_tensor(v2.Compose(_eval_geometry(image_size))(image))


def eval_normalize(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The rest of :func:`eval_transform` on uint8 ``[b, 3, S, S]`` batches of
    :func:`eval_pixels`: float in [0, 1], then normalised."""
    return v2.Compose(_normalize(mean, std)[1:])  # ToImage: the input is a tensor already


def split_at_to_image(transform: v2.Compose) -> tuple[v2.Compose, v2.Compose]:
    """Split a transform built here into its PIL → PIL head and its tensor tail (ToDtype,
    Normalize), so a batch reader can run the tail once on a stacked ``[b, 3, H, W]`` uint8 batch
    instead of per view: same numbers, a quarter less time per view at 32 px."""
    ops = list(transform.transforms)
    cut = next((i for i, op in enumerate(ops) if isinstance(op, v2.ToImage)), None)
    if cut is None:
        raise ValueError(f"transform has no ToImage step to split at: {transform}")
    return v2.Compose(ops[:cut]), v2.Compose(ops[cut + 1 :])


class MultiViewTransform:
    """Apply ``transform`` ``n_views`` times independently; returns the list of views.

    >>> from PIL import Image
    >>> views = MultiViewTransform(simclr_transform(AugmentConfig(), 32), n_views=3)
    >>> views = views(Image.new("RGB", (32, 32)))
    >>> len(views), tuple(views[0].shape)
    (3, (3, 32, 32))
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor], n_views: int) -> None:
        if n_views < 1:
            raise DataError(f"n_views must be >= 1, got {n_views}")
        self.transform = transform
        self.n_views = n_views

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [self.transform(image) for _ in range(self.n_views)]

    def __repr__(self) -> str:
        return f"MultiViewTransform(n_views={self.n_views}, transform={self.transform!r})"


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize`` for display: ``[..., 3, H, W]`` → values in [0, 1]."""
    shape = (3, 1, 1)
    m = torch.tensor(list(mean), dtype=images.dtype).view(shape)
    s = torch.tensor(list(std), dtype=images.dtype).view(shape)
    return (images * s + m).clamp(0, 1)
