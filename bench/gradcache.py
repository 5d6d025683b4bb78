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

``--micro 0`` is the plain step. Peak memory of the cached step should follow the micro-batch
(plus the model's fixed costs), not the batch; its time pays one more forward (~1.3x).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from service.config import Config, LossConfig, ModelConfig, TrainConfig
from service.train import build_state, train_step


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(arch: str, batch: int, micro: int | None, steps: int) -> dict:
    """One configuration in this process: warm-up step, then ``steps`` timed steps."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = Config(
        model=ModelConfig(arch=arch, proj_hidden_dim=2048),
        loss=LossConfig(temperature=0.2),
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
    train_step(state, views)  # warm-up (allocates gradients and the optimizer state)
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(state, views)  # syncs on the loss (all-reduced mean)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak_rss = _max_rss_mib()
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "arch": arch,
        "batch": batch,
        "micro_batch_size": micro,
        "setup_rss_mib": round(setup_rss, 1),
        "peak_rss_mib": round(peak_rss, 1),
        "step_rss_mib": round(peak_rss - setup_rss, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if device.type == "cuda"
        else None,
        "step_s": round(seconds, 3),
        "images_per_s": round(batch / seconds, 1),
        "loss": loss,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--micro", type=int, nargs="+", default=[0, 16, 64], help="0: plain")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        micro = args.micro[0] or None
        print(json.dumps(measure(args.arch, args.batch, micro, args.steps)), flush=True)
        return
    for micro in args.micro:
        cmd = [sys.executable, __file__, "--one", "--arch", args.arch, "--batch", str(args.batch)]
        cmd += ["--micro", str(micro), "--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
