"""SimCLR augmentation throughput: batched tensors (service.data.batch_augment) vs per-image PIL.

    python bench/augment.py [--data PATH] [--limit 5000] [--size 32] [--views 2] [--threads 1]

The images are decoded once; every line then times augmentation only, on the same decoded
images, side by side in one run (JSON lines). "images" are source images, each giving
``--views`` views. ``images_per_cpu_s`` (images per second of this process's CPU time) is the
per-core figure to compare on a busy machine; ``images_per_s`` is wall-clock; ``loadavg_1m``
is the machine's load at that moment. Lines:

- ``crop``: µs per view of three batched crop+resize methods (matmul - the one used -,
  ``roi_align``, ``grid_sample``), to justify the choice;
- ``pil``: ``MultiViewTransform(simclr_transform(...))`` per image + stacking into a batch;
- ``lightly``: lightly's ``SimCLRTransform`` per image, when lightly is installed (``.[bench]``);
- ``batched``: ``BatchSimCLRAugment`` on CPU at batch 256 and 512;
- ``batched_cuda``: the same with the batch on the GPU, only when CUDA is available.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from service.config import BUNDLED_DATA_DIR, AugmentConfig  # noqa: E402
from service.data import (  # noqa: E402
    BatchSimCLRAugment,
    MultiViewTransform,
    decode_image,
    read_image_table,
    simclr_transform,
)
from service.data.batch_augment import (  # noqa: E402
    CHUNK_ROWS,
    resized_crop,
    sample_crop_boxes,
)


def _emit(record: dict) -> None:
    record["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(record), flush=True)


def _timed(
    fn: Callable[[], object], sync: Callable[[], None] = lambda: None
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    sync()
    cpu0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - cpu0


def _record(name: str, n: int, args: argparse.Namespace, wall: float, cpu: float, **extra) -> None:
    _emit(
        {
            "reader": name,
            **extra,
            "images": n,
            "views": args.views,
            "image_size": args.size,
            "threads": torch.get_num_threads(),
            "seconds": round(wall, 3),
            "images_per_s": round(n / wall, 1),
            "cpu_s": round(cpu, 3),
            "images_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
        }
    )


def bench_per_image(name: str, transform, pil_images: list, args: argparse.Namespace) -> None:
    def run() -> None:
        for start in range(0, len(pil_images), 256):  # stacked per batch, as collate_views does
            views = [transform(image) for image in pil_images[start : start + 256]]
            [torch.stack(v) for v in zip(*views, strict=True)]

    torch.manual_seed(0)
    wall, cpu = _timed(run)
    _record(name, len(pil_images), args, wall, cpu)


def bench_batched(images: torch.Tensor, args: argparse.Namespace, batch: int) -> None:
    augment = BatchSimCLRAugment(AugmentConfig(), args.size, n_views=args.views, seed=0)
    augment(images[:batch])  # warm-up (allocator, kernels)

    def run() -> None:
        for start in range(0, len(images), batch):
            augment(images[start : start + batch])

    wall, cpu = _timed(run)
    _record("batched", len(images), args, wall, cpu, device="cpu", batch=batch)


def bench_cuda(images: torch.Tensor, args: argparse.Namespace) -> None:
    gpu = images.cuda()
    sync = torch.cuda.synchronize
    for batch in (512, 1024, 4096):
        augment = BatchSimCLRAugment(AugmentConfig(), args.size, n_views=args.views, seed=0)
        augment(gpu[:batch])

        def run(augment=augment, batch=batch) -> None:
            for _ in range(3):
                for start in range(0, len(gpu), batch):
                    augment(gpu[start : start + batch])

        wall, cpu = _timed(run, sync)
        _record(
            "batched_cuda",
            3 * len(gpu),
            args,
            wall,
            cpu,
            device=torch.cuda.get_device_name(),
            batch=batch,
            views_per_s=round(3 * len(gpu) * args.views / wall, 1),
        )


def bench_crop_methods(images: torch.Tensor, args: argparse.Namespace, n: int = CHUNK_ROWS) -> None:
    """µs per view (CPU time, best of 20) of crop + resize + flip of ``n`` views (one chunk of
    the CPU pipeline), three batched ways."""
    b, _, height, width = images[:n].shape
    source = images[:n]
    boxes = sample_crop_boxes(n, height, width, (0.2, 1.0), torch.Generator().manual_seed(0))
    flip = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5
    size = args.size

    def roi() -> torch.Tensor:  # bilinear at 2x2 points per bin: no antialias
        x = source.float() / 255
        top, left, h, w = boxes.double().unbind(1)
        rois = torch.stack([torch.arange(n).double(), left, top, left + w, top + h], 1)
        out = roi_align(x, rois.float(), (size, size), 1.0, sampling_ratio=2, aligned=True)
        return torch.where(flip[:, None, None, None], out.flip(-1), out)

    def grid() -> torch.Tensor:  # bilinear, no antialias, reads outside the crop at its edges
        x = source.float() / 255
        top, left, h, w = boxes.float().unbind(1)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -w / width, w / width)
        theta[:, 1, 1] = h / height
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 2] = (2 * top + h) / height - 1
        g = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
        return F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=False)

    methods = {"matmul": lambda: resized_crop(source, boxes, size, flip), "roi_align": roi}
    methods["grid_sample"] = grid
    us = {}
    for name, fn in methods.items():
        fn()
        us[name] = round(min(_timed(fn)[1] for _ in range(20)) / n * 1e6, 2)
    exact = resized_crop(source[:1], boxes[:1], size, flip[:1])[0]
    ref = TF.resized_crop(source[0].float() / 255, *boxes[0].tolist(), [size, size])
    ref = TF.horizontal_flip(ref) if flip[0] else ref
    _emit(
        {
            "bench": "crop",
            "us_per_view_cpu": us,
            "views": n,
            "image_size": size,
            "matmul_max_abs_err_vs_torchvision": float((exact - ref).abs().max()),
        }
    )


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(BUNDLED_DATA_DIR / "cifar10-train-subset.parquet"))
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _emit(
        {
            "bench": "augment",
            "uptime": _uptime(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "data": args.data,
        }
    )
    table = read_image_table(args.data, columns=["image"], limit=args.limit)
    pil_images = [decode_image(b) for b in table.column("image").to_pylist()]
    images = torch.stack([TF.pil_to_tensor(image) for image in pil_images])  # same size (CIFAR)

    bench_crop_methods(images, args)
    cfg = AugmentConfig(n_views=args.views)
    bench_per_image(
        "pil", MultiViewTransform(simclr_transform(cfg, args.size), args.views), pil_images, args
    )
    try:
        from lightly.transforms import SimCLRTransform
    except ImportError:
        _emit({"reader": "lightly", "skipped": "lightly not installed (pip install -e '.[bench]')"})
    else:
        lightly = SimCLRTransform(input_size=args.size, gaussian_blur=0.0, min_scale=cfg.min_scale)
        bench_per_image("lightly", lightly, pil_images, args)
    for batch in (256, 512):
        bench_batched(images, args, batch)
    if torch.cuda.is_available():
        bench_cuda(images, args)
    _emit({"bench": "augment", "end_uptime": _uptime()})


if __name__ == "__main__":
    main()
