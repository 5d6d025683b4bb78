"""Peak memory and step time: the plain step vs cached-gradient steps (train.micro_batch_size).

The real ``service.train.train_step`` (2 views -> encoder + head -> NT-Xent -> AdamW), one worker,
synthetic 32 px inputs, at a fixed batch and several micro-batch sizes. Every configuration runs
in a fresh subprocess, so the CPU high-water mark (``ru_maxrss``) belongs to it alone; on CUDA the
peak is ``max_memory_allocated`` after a reset. One JSON line per configuration:

- ``setup_rss_mib``: high-water RSS after imports, model, optimizer and inputs (before any step);
- ``peak_rss_mib`` / ``step_rss_mib``: high-water RSS after the steps, and its growth over setup:
  what the step itself needs (activations of the graph, gradients, Adam state);
- ``peak_gpu_mib``: CUDA only; ``step_s``, ``images_per_s`` (source images, 2 views each).

    python bench/gradcache.py --arch resnet18 --batch 128 --micro 0 16 64 --steps 2

``--micro 0`` is the plain step; ``step_s`` is the fastest timed step (the CPU box is shared).
Peak memory of the cached step should follow the micro-batch (plus the model's fixed costs), not
the batch; its time pays one more forward (~1.3x).

``--probe``: the largest per-worker batch that fits a memory cap, with and without caching. For
each ``--micro``, the per-worker batch doubles from ``--batch`` to ``--max-batch``; each probe
is one step (no warm-up) in a fresh subprocess, killed as soon as its peak RSS (``VmHWM``,
polled every 50 ms) passes ``--cap-gib``; the child's ``RLIMIT_AS`` (cap + 8 GiB of address
space) is a backstop, so a probe can never take the machine's memory. A probe fits when it
finishes under the cap; the ladder stops at the first that does not. One process stands for one
worker: the global batch is ``--workers`` x the per-worker batch (the other workers' all-gathered
embeddings, O(B x D), are not in this process; ``--chunk`` keeps the loss's B x B logits out).

    python bench/gradcache.py --probe --arch small_cnn --batch 512 --max-batch 65536 \
        --micro 0 256 --cap-gib 10 --chunk 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from service.config import Config, LossConfig, ModelConfig, TrainConfig
from service.train import build_state, train_step


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(
    arch: str, batch: int, micro: int | None, steps: int, warmup: int = 1, chunk: int | None = None
) -> dict:
    """One configuration in this process: ``warmup`` untimed steps, then ``steps`` timed ones."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = Config(
        model=ModelConfig(arch=arch, proj_hidden_dim=2048),
        loss=LossConfig(temperature=0.2, chunk_size=chunk),
        train=TrainConfig(
            global_batch_size=batch, num_workers=1, optimizer="adamw", lr=1e-3,
            lr_scaling="none", amp="off", epochs=1, micro_batch_size=micro,
        ),
    )  # fmt: skip
    state = build_state(config, device, steps_per_epoch=steps + 1, gather_distributed=False)
    views = list(torch.randn(2 * batch, 3, 32, 32, device=device).chunk(2))
    setup_rss = _max_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):  # allocates gradients and the optimizer state
        train_step(state, views)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = train_step(state, views)  # syncs on the loss (all-reduced mean)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = min(times)  # best of: the box is shared, slower repeats are other people's load
    peak_rss = _max_rss_mib()
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "arch": arch,
        "batch": batch,
        "micro_batch_size": micro,
        "chunk_size": chunk,
        "setup_rss_mib": round(setup_rss, 1),
        "peak_rss_mib": round(peak_rss, 1),
        "step_rss_mib": round(peak_rss - setup_rss, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if device.type == "cuda"
        else None,
        "step_s": round(seconds, 3),
        "step_times_s": [round(t, 3) for t in times],
        "images_per_s": round(batch / seconds, 1),
        "loss": loss,
        "torch": torch.__version__,
    }


def _hwm_mib(pid: int) -> float:
    """Peak RSS so far of a live process (``VmHWM``), 0 when it has already gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024  # kB


def run_capped(cmd: list[str], cap_mib: float) -> tuple[dict | None, float, str]:
    """Run ``cmd``; kill it once its peak RSS passes ``cap_mib``. (last JSON line, peak, why)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _hwm_mib(proc.pid))
            if peak > cap_mib:
                proc.kill()
                proc.wait()
                return None, peak, f"over the cap ({peak:.0f} MiB > {cap_mib:.0f})"
            time.sleep(0.05)
        out.seek(0)
        lines = out.read().strip().splitlines()
    if proc.returncode != 0:
        return None, peak, f"exit {proc.returncode}: {lines[-1] if lines else ''}"[:300]
    result = json.loads(lines[-1])
    return result, max(peak, result["peak_rss_mib"]), "fits"


def probe(args: argparse.Namespace) -> None:
    """Per micro-batch size: double the per-worker batch until a step no longer fits the cap."""
    cap_mib = args.cap_gib * 1024
    for micro in args.micro:
        largest, batch = None, args.batch
        while batch <= args.max_batch:
            cmd = [sys.executable, __file__, "--one", "--arch", args.arch, "--batch", str(batch)]
            cmd += ["--micro", str(micro), "--steps", "1", "--warmup", "0"]
            cmd += ["--as-limit-gib", str(args.cap_gib + 8)]  # backstop: address space
            cmd += ["--chunk", str(args.chunk)] if args.chunk else []
            start = time.perf_counter()
            result, peak, why = run_capped(cmd, cap_mib)
            row = {
                "probe": args.arch, "micro_batch_size": micro or None, "batch_per_worker": batch,
                "global_batch": args.workers * batch, "fits": result is not None,
                "peak_rss_mib": round(peak, 1), "why": why,
                "wall_s": round(time.perf_counter() - start, 1),
                "step_s": result["step_s"] if result else None,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            if result is None:
                break
            largest, batch = batch, batch * 2
        summary = {"largest": args.arch, "micro_batch_size": micro or None, "cap_gib": args.cap_gib}
        summary["batch_per_worker"] = largest
        summary["global_batch"] = largest and args.workers * largest
        print(json.dumps(summary), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--micro", type=int, nargs="+", default=[0, 16, 64], help="0: plain")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--chunk", type=int, default=0, help="loss.chunk_size (0: unchunked)")
    parser.add_argument("--probe", action="store_true", help="largest batch under --cap-gib")
    parser.add_argument("--max-batch", type=int, default=65536, help="--probe: per worker")
    parser.add_argument("--cap-gib", type=float, default=10.0, help="--probe: peak RSS per worker")
    parser.add_argument("--workers", type=int, default=2, help="--probe: global = workers x batch")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--as-limit-gib", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_limit_gib:
        limit = int(args.as_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if args.one:
        micro = args.micro[0] or None
        result = measure(args.arch, args.batch, micro, args.steps, args.warmup, args.chunk or None)
        print(json.dumps(result), flush=True)
        return
    if args.probe:
        probe(args)
        return
    for micro in args.micro:
        cmd = [sys.executable, __file__, "--one", "--arch", args.arch, "--batch", str(args.batch)]
        cmd += ["--micro", str(micro), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--chunk", str(args.chunk)] if args.chunk else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
