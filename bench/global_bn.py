"""What global BatchNorm (``model.sync_batchnorm``) costs per training step on CPU gloo workers.

W processes (default 2) in one gloo group, one thread each (as Ray Train workers with
``cpus_per_worker: 1``), each holding two DDP training states built from the same config: global
BN on and off. The real ``service.train.train_step`` (2 views -> small CNN + BN head -> NT-Xent
-> AdamW) runs on synthetic images, the two modes interleaved step by step (the order alternating)
so that both see the same machine load. Defaults: the smoke config's model and global batch
(``jobs/configs/smoke-cpu.yaml``: small CNN width 32, head 256-128, 256 images = 2 x 128, 32 px).

One JSON line per mode (rank 0's ``step_s`` median, ``step_min_s``, images/s, ``cpu_s``: the
median CPU seconds of the step, which waiting at a collective does not add to), then a summary
line with the ratios on/off of those, and the load average before and after. On a shared box the
wall-clock ratio includes waiting for the other, descheduled rank at global BN's extra sync points
(2 per BN layer per step); ``ratio_cpu`` is the work the layers add. Compare the two modes of one
run, not runs.

    python bench/global_bn.py --workers 2 --batch 256 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from service.config import Config, LossConfig, ModelConfig, TrainConfig
from service.train import build_state, train_step

MODES = {"global_bn_on": True, "global_bn_off": False}


def smoke_config(sync: bool, batch: int, workers: int) -> Config:
    return Config(
        model=ModelConfig(arch="small_cnn", proj_hidden_dim=256, proj_out_dim=128,
                          sync_batchnorm=sync),
        loss=LossConfig(name="ntxent", temperature=0.2),
        train=TrainConfig(global_batch_size=batch, num_workers=workers, optimizer="adamw",
                          lr=2e-3, weight_decay=1e-4, amp="off"),
    )  # fmt: skip


def _worker(rank: int, args: argparse.Namespace, workdir: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=args.workers
    )
    try:
        _measure(rank, args)
    finally:
        dist.destroy_process_group()


def _measure(rank: int, args: argparse.Namespace) -> None:
    cpu, b = torch.device("cpu"), args.batch // args.workers
    steps = args.warmup + args.steps

    def wrap(model: nn.Module) -> nn.Module:
        return DistributedDataParallel(model)

    states = {}
    for mode, sync in MODES.items():
        torch.manual_seed(0)
        config = smoke_config(sync, args.batch, args.workers)
        states[mode] = build_state(config, cpu, steps, rank=rank, world=args.workers, wrap=wrap)
    g = torch.Generator().manual_seed(rank)
    views = list(torch.randn(2, b, 3, args.size, args.size, generator=g))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu_times: dict[str, list[float]] = {mode: [] for mode in MODES}
    load_before = os.getloadavg()
    for i in range(steps):
        order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
        for mode in order:
            dist.barrier()  # both ranks start together: a step's time is not the other's wait
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(states[mode], views)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - start)
                cpu_times[mode].append(time.process_time() - cpu_start)
    if rank != 0:
        return
    rows = {}
    for mode, ts in times.items():
        rows[mode] = {
            "mode": mode, "workers": args.workers, "batch": args.batch, "size": args.size,
            "threads_per_worker": args.threads, "steps": len(ts),
            "step_s": statistics.median(ts), "step_min_s": min(ts),
            "images_per_s": args.batch / statistics.median(ts),
            "cpu_s": statistics.median(cpu_times[mode]), "torch": torch.__version__,
        }  # fmt: skip
        print(json.dumps(rows[mode]), flush=True)
    on, off = rows["global_bn_on"], rows["global_bn_off"]
    summary = {
        "summary": "global_bn_on / global_bn_off",
        "ratio_median": on["step_s"] / off["step_s"],
        "ratio_min": on["step_min_s"] / off["step_min_s"],
        "ratio_cpu": on["cpu_s"] / off["cpu_s"],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="global batch (source images)")
    parser.add_argument("--size", type=int, default=32, help="view side (px)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="global-bn-bench-") as workdir:
        mp.spawn(_worker, args=(args, workdir), nprocs=args.workers, join=True)


if __name__ == "__main__":
    main()
