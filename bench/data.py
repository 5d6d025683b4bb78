"""Data throughput: decode + SimCLR augmentation, images per second per CPU core, both readers,
both augmentation backends (``augment.backend``: per-image torchvision, batched on tensors).

    python bench/data.py [--data PATH] [--views 2] [--size 32] [--batch 256] [--ray-cpus 2]

Every reader line has ``reader``, ``backend``, ``views``, ``image_size``, ``images_per_s`` and
``images_per_cpu_s``. ``torch-decoded`` is the batched backend's decode-once path: the one-off
decode is reported as ``decode_s`` and the epoch rate excludes it (it is paid once per run, not
per epoch); ``ray`` lines name their shuffle (``none``, ``local``: block order + local buffer,
the reader's default; ``random_shuffle``: a full shuffle). ``lightly`` (per-image
``SimCLRTransform``) is measured when lightly is installed (``.[bench]``).

Prints one JSON line per configuration. "images" are source images: each yields ``--views``
augmented views. ``cores`` is what the configuration may use for decode + augment (the
DataLoader's main process or its worker processes; the CPUs given to Ray), so
``images_per_s_per_core`` is wall-clock throughput / cores. On a busy machine wall-clock numbers
shrink with the load; ``images_per_cpu_s`` (images per second of CPU time actually consumed:
this process, its DataLoader workers, or its Ray worker processes) does not, so it is the
per-core figure to compare. ``loadavg_1m`` records the machine's load at the time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from service.config import BUNDLED_DATA_DIR, AugmentConfig  # noqa: E402
from service.data import (  # noqa: E402
    BatchSimCLRAugment,
    ParquetImageDataset,
    augment_ray_dataset,
    decode_image,
    decode_rows,
    iter_image_batches,
    iter_view_batches,
    make_dataloader,
    read_image_table,
    read_ray_dataset,
    simclr_transform,
)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped DataLoader workers
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid → (parent pid, command name, CPU seconds so far), from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / tick)
    return table


def _ray_worker_cpu_seconds() -> float:
    """CPU time of this driver's Ray worker processes (descendants named ``ray::...``)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            if table[child][1].startswith("ray::"):
                total += table[child][2]
    return total


def _emit(record: dict) -> None:
    record["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(record), flush=True)


def bench_torch(args: argparse.Namespace, workers: int) -> None:
    cfg = AugmentConfig(n_views=args.views)
    ds = ParquetImageDataset(args.data, simclr_transform(cfg, args.size), n_views=args.views)
    loader = make_dataloader(ds, args.batch, shuffle=True, drop_last=False, num_workers=workers)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for views, _ in loader:
        n += len(views[0])
    elapsed = time.perf_counter() - t0
    del loader  # reaps worker processes, so their CPU time is counted below
    cpu = _cpu_seconds() - cpu0
    cores = max(1, workers)
    _emit(
        {
            "reader": "torch",
            "backend": "torchvision",
            "loader_workers": workers,
            "images": n,
            "views": args.views,
            "image_size": args.size,
            "seconds": round(elapsed, 2),
            "images_per_s": round(n / elapsed, 1),
            "cores": cores,
            "images_per_s_per_core": round(n / elapsed / cores, 1),
            "cpu_s": round(cpu, 2),
            "images_per_cpu_s": round(n / cpu, 1),
        }
    )


def bench_stages(args: argparse.Namespace, n: int = 1000) -> None:
    """Microseconds per view spent in decode and in each op of the SimCLR pipeline (1 core)."""
    table = read_image_table(args.data, columns=["image"], limit=n)
    blobs = table.column("image").to_pylist()
    t0 = time.perf_counter()
    images = [decode_image(b) for b in blobs]
    stages = {"decode": (time.perf_counter() - t0) / n * 1e6}
    transform = simclr_transform(AugmentConfig(), args.size)
    torch.manual_seed(0)
    for op in transform.transforms:
        t0 = time.perf_counter()
        images = [op(x) for x in images]
        name = type(op).__name__
        if name == "RandomApply":
            name += f"({type(op.transforms[0]).__name__}, p={op.p})"
        stages[name] = (time.perf_counter() - t0) / n * 1e6
    _emit(
        {
            "stage_us_per_view": {k: round(v, 1) for k, v in stages.items()},
            "total_us": round(sum(stages.values()), 1),
        }
    )


def _rate_record(
    reader: str, backend: str, args: argparse.Namespace, n: int, elapsed: float, cpu: float,
    **extra: object,
) -> dict:  # fmt: skip
    return {
        "reader": reader,
        "backend": backend,
        **extra,
        "views": args.views,
        "image_size": args.size,
        "images": n,
        "seconds": round(elapsed, 2),
        "images_per_s": round(n / elapsed, 1),
        "cpu_s": round(cpu, 2),
        "images_per_cpu_s": round(n / cpu, 1),
    }


def bench_torch_decoded(args: argparse.Namespace, epochs: int = 3) -> None:
    """Decode once, then per epoch: shuffled index batches → gather → BatchSimCLRAugment (CPU)."""
    cfg = AugmentConfig(n_views=args.views, backend="batched")
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    decoded = decode_rows(args.data, None, args.size)
    decode_s, decode_cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    augment = BatchSimCLRAugment(cfg, args.size, seed=0)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for epoch in range(epochs):
        order = torch.randperm(len(decoded), generator=torch.Generator().manual_seed(epoch))
        for batch in order.split(args.batch):
            views = augment(decoded.images.index_select(0, batch))
            n += len(views[0])
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    decode = {"decode_s": round(decode_s, 2), "decode_cpu_s": round(decode_cpu, 2)}
    _emit(_rate_record("torch-decoded", "batched", args, n, elapsed, cpu, epochs=epochs, **decode))


def bench_lightly(args: argparse.Namespace) -> None:
    """lightly's per-image ``SimCLRTransform`` (2 views) in the same DataLoader, 1 process."""
    try:
        from lightly.transforms import SimCLRTransform
    except ImportError:
        _emit({"reader": "lightly", "skipped": "lightly not installed (pip install .[bench])"})
        return
    transform = SimCLRTransform(input_size=args.size, gaussian_blur=0.0)
    ds = ParquetImageDataset(args.data, transform)
    loader = make_dataloader(ds, args.batch, shuffle=True, drop_last=False)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    n = sum(len(views[0]) for views, _ in loader)
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    _emit(_rate_record("lightly", "SimCLRTransform", args, n, elapsed, cpu))


def _ray_epoch(args: argparse.Namespace, backend: str, shuffle: str) -> int:
    """One pass over the data through the Ray reader; the batched backend augments here."""
    cfg = AugmentConfig(n_views=args.views, backend=backend)
    ds = read_ray_dataset(args.data)
    if shuffle == "random_shuffle":
        ds = ds.random_shuffle()
    ds = augment_ray_dataset(ds, cfg, args.size, args.views, shuffle=shuffle == "local")
    local = shuffle == "local"
    if backend == "torchvision":
        batches = iter_view_batches(ds, args.batch, args.views, drop_last=False, shuffle=local)
        return sum(len(labels) for _, labels in batches)
    augment = BatchSimCLRAugment(cfg, args.size, seed=0)
    n = 0
    for images, _ in iter_image_batches(ds, args.batch, drop_last=False, shuffle=local):
        n += len(augment(images)[0])
    return n


def bench_ray(args: argparse.Namespace) -> None:
    import ray

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        runs = [("torchvision", "local", "cold"), ("torchvision", "none", "warm")]
        runs += [("torchvision", "local", "warm"), ("torchvision", "random_shuffle", "warm")]
        runs += [("batched", "none", "warm"), ("batched", "local", "warm")]
        runs += [("batched", "random_shuffle", "warm")]
        for backend, shuffle, run in runs:  # cold includes starting worker processes
            cpu0, workers0, t0 = _cpu_seconds(), _ray_worker_cpu_seconds(), time.perf_counter()
            n = _ray_epoch(args, backend, shuffle)
            elapsed = time.perf_counter() - t0
            # Workers that exit during the run take their CPU time with them: a lower bound.
            cpu = _cpu_seconds() - cpu0 + _ray_worker_cpu_seconds() - workers0
            _emit(_rate_record("ray", backend, args, n, elapsed, cpu, shuffle=shuffle, run=run))
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(BUNDLED_DATA_DIR / "cifar10-train-subset.parquet"))
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-image work: intra-op threads only add contention
    _emit(
        {
            "bench": "data",
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "data": args.data,
        }
    )
    bench_stages(args)
    if not args.skip_torch:
        for workers in (0, 1):
            bench_torch(args, workers)
        bench_torch_decoded(args)
        bench_lightly(args)
    if not args.skip_ray:
        try:
            bench_ray(args)
        except Exception as exc:  # noqa: BLE001 - report, don't lose the other lines
            _emit({"reader": "ray", "error": f"{type(exc).__name__}: {exc}"[:500]})


if __name__ == "__main__":
    main()
