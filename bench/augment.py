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
- ``batched_cuda``: the same with the batch on the GPU, only when CUDA is available;
- ``fused``: the old eager pipeline (tests/batch_augment_reference.py) vs the fused one, same
  seed, batch 512 (``--fused-batch``): aten ops dispatched per batch (``torch.profiler``: the
  proxy for CUDA launches; ``kernels`` leaves out views and other ops that launch nothing),
  ms per batch (wall and CPU; the best of ``--rounds`` interleaved rounds), and the largest
  difference between their views. ``form`` ``cpu``: what the CPU runs (chunks of 256 rows,
  compact masks); ``gpu``: what a GPU runs (the whole batch at once, every row through every
  op), here on the CPU;
- ``fused_cuda`` (CUDA only): old eager vs fused eager vs fused from a CUDA graph on the GPU,
  ms per batch (the parameter draws on the CPU included; ``draws_cpu_ms_per_batch`` alone),
  CUDA kernels per batch, and the share of one ResNet-18 bf16 channels_last training step at
  the same batch (bench/train_step.py's ``measure``).

``--fused-only`` prints only the header and the ``fused`` / ``fused_cuda`` lines (the GPU
script's call: ``python bench/augment.py --fused-only``).
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
from tests.batch_augment_reference import reference_render, reference_views  # noqa: E402

# aten ops that launch no kernel (views, metadata, allocation, same-device ``to``).
NO_KERNEL_OPS = {
    f"aten::{name}"
    for name in (
        "view as_strided select slice unsqueeze squeeze unbind reshape _reshape_alias t "
        "transpose permute expand expand_as detach detach_ alias lift_fresh split "
        "split_with_sizes chunk narrow empty empty_like empty_strided to resolve_conj "
        "resolve_neg _unsafe_view result_type"
    ).split()
}


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


def count_ops(fn: Callable[[], object]) -> dict:
    """aten ops of one call: ``aten_ops`` dispatched from Python (not counting the ops they
    call), ``kernels`` the innermost ones that launch work (views, allocations excluded)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if _aten_parents(e) == []]
    leaves = [e for e in events if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    kernels = [e for e in leaves if _launches(e)]
    return {"aten_ops": len(top), "kernels": len(kernels)}


def _aten_parents(event) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None and parent.name.startswith("aten::"):
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def _launches(event) -> bool:
    """Would this innermost CPU op launch a kernel on a GPU? Not views and allocations, not
    the copy that wraps a Python number into a tensor inside an op (``x - 1``: a kernel
    argument on a GPU), not the output fill of a CPU reduction."""
    parents = _aten_parents(event)
    if event.name in NO_KERNEL_OPS:
        return False
    if event.name == "aten::copy_" and "aten::to" in parents[:-1]:
        return False  # a `to` inside another op: a wrapped scalar
    return not (event.name == "aten::fill_" and parents and parents[0] == "aten::sum")


def _per_batch_ms(fn: Callable[[int], object], n_batches: int, sync=lambda: None) -> dict:
    """ms per batch (wall, and CPU of this process) over ``n_batches`` calls ``fn(i)``."""
    fn(0)  # warm-up
    wall, cpu = _timed(lambda: [fn(i) for i in range(n_batches)], sync)
    return {
        "ms_per_batch": round(wall / n_batches * 1e3, 2),
        "cpu_ms_per_batch": round(cpu / n_batches * 1e3, 2),
    }


def bench_fused(images: torch.Tensor, args: argparse.Namespace) -> None:
    """Old eager vs fused pipeline on this CPU: op counts and ms per batch, one run. The
    ``cpu`` form is the whole call (draws included: both draw the same); the ``gpu`` form
    the image work of one batch with given parameters (the draws stay on the CPU there; the
    old one's count includes its ~50 CPU-side row-group ops, which launched nothing)."""
    cfg, batch = AugmentConfig(n_views=args.views), args.fused_batch
    n_batches = max(1, len(images) // batch)
    batches = [images[i * batch : (i + 1) * batch] for i in range(n_batches)]
    new, old = (BatchSimCLRAugment(cfg, args.size, seed=0) for _ in range(2))
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(new(batches[0]), reference_views(old, batches[0]), strict=True)
    )
    params = new.sample(args.views * batch, *batches[0].shape[2:])
    packed, source = params.packed(), batches[0].repeat(args.views, 1, 1, 1)
    forms: dict[tuple[str, str], Callable[[int], object]] = {
        ("cpu", "old"): lambda i: reference_views(old, batches[i]),
        ("cpu", "new"): lambda i: new(batches[i]),
        ("gpu", "old"): lambda i: reference_render(old, source, params),
        ("gpu", "new"): lambda i: new.render(source, packed, compact=False),
    }
    times: dict[tuple[str, str], list[dict]] = {key: [] for key in forms}
    for _ in range(args.rounds):  # interleaved rounds, the best of each: a busy box's noise
        for key, fn in forms.items():
            times[key].append(_per_batch_ms(fn, n_batches))
    for (form, pipeline), fn in forms.items():
        best = {k: min(t[k] for t in times[form, pipeline]) for k in times[form, pipeline][0]}
        _emit(
            {
                "bench": "fused", "form": form, "pipeline": pipeline, "device": "cpu",
                "batch": batch, "views": args.views, "image_size": args.size,
                "threads": torch.get_num_threads(), **count_ops(lambda fn=fn: fn(0)),
                **best, "rounds": args.rounds, "max_abs_diff_new_vs_old": diff,
            }
        )  # fmt: skip


def bench_fused_cuda(
    images: torch.Tensor, args: argparse.Namespace, device: torch.device | None = None
) -> None:
    """On the GPU: old eager, fused eager, fused from a CUDA graph; ms per batch, kernels per
    batch (CUDA profiler; a graph's replayed kernels included where CUPTI reports them), and
    the share of a ResNet-18 bf16 channels_last step at the same batch. ``device`` cpu: a dry
    run of the plumbing (no graph, no kernels counted)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.train_step import measure

    device = device or torch.device("cuda")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cudnn.benchmark = True  # as bench/train_step.py and the training loop
    cfg, batch = AugmentConfig(n_views=args.views), args.fused_batch
    gpu = images.to(device)
    n_batches = max(1, len(gpu) // batch)
    batches = [gpu[i * batch : (i + 1) * batch] for i in range(n_batches)]
    step_ms = measure("resnet18", batch, "bf16" if cuda else "off", cuda, None, args.steps, device)
    step_ms = step_ms["step_s"] * 1e3
    ref = reference_views(BatchSimCLRAugment(cfg, args.size, seed=0), batches[0])
    old = BatchSimCLRAugment(cfg, args.size, seed=0)
    drawer, (height, width) = BatchSimCLRAugment(cfg, args.size, seed=1), images.shape[2:]
    draws = _per_batch_ms(  # the CPU-side part of every pipeline: the draws (and packing)
        lambda i: drawer.sample(args.views * batch, height, width).packed(), max(n_batches, 20)
    )
    runs = {
        "old_eager": lambda i: reference_views(old, batches[i % n_batches]),
        "fused_eager": BatchSimCLRAugment(cfg, args.size, seed=0, cuda_graph=False),
        "fused_graph": BatchSimCLRAugment(cfg, args.size, seed=0),
    }
    for name, augment in runs.items():
        diff = None
        if name != "old_eager":  # its first draws are ref's (same seed); captures the graph
            views = augment(batches[0])
            diff = max(float((a - b).abs().max()) for a, b in zip(views, ref, strict=True))
        fn = augment if name == "old_eager" else (lambda i, a=augment: a(batches[i % n_batches]))
        times = _per_batch_ms(fn, max(n_batches, 20), sync)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            fn(0)
            sync()
        on_device = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
        kernels = [n for n in on_device if not n.startswith(("Memcpy", "Memset"))]
        _emit(
            {
                "bench": "fused_cuda", "pipeline": name,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "batch": batch, "views": args.views, "image_size": args.size,
                "cuda_kernels": len(kernels), "cuda_copies": len(on_device) - len(kernels),
                **times, "draws_cpu_ms_per_batch": draws["cpu_ms_per_batch"],
                "resnet18_bf16_cl_step_ms": round(step_ms, 2),
                "share_of_step": round(times["ms_per_batch"] / step_ms, 4),
                "graphs_captured": len(getattr(augment, "_graphs", {})),
                "max_abs_diff_vs_old": diff,
            }
        )  # fmt: skip


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
    parser.add_argument("--fused-batch", type=int, default=512, help="batch of the fused lines")
    parser.add_argument("--fused-only", action="store_true", help="only the fused lines")
    parser.add_argument("--steps", type=int, default=20, help="ResNet-18 steps timed (CUDA)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds of the fused lines")
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

    bench_fused(images, args)
    if torch.cuda.is_available():
        bench_fused_cuda(images, args)
    if args.fused_only:
        _emit({"bench": "augment", "end_uptime": _uptime()})
        return
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
