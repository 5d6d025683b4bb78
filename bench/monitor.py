"""What the per-epoch validation monitor costs: decoding its rows every epoch (the old path) vs
decoding them once and keeping them as uint8 (issue 26 item 2).

Two ``KnnMonitor``s of the same config and model, ``decode_once=False`` and ``True``, called
``--epochs`` times each, interleaved call by call (the order alternating) so that both see the
same machine load. The first call of the decode-once monitor includes its one decode; the later
ones cost the forward only. Defaults: the smoke config (bundled CIFAR-10 subset: bank = the
4,500 training rows, 500 validation rows, small CNN at random init), one thread as the monitor
of a 1-CPU worker (``--threads`` to change it).

One JSON line per epoch and path (``seconds``, and ``cpu_s``: this process's CPU seconds, which
a loaded box's waiting does not add to), then a summary line: each path's first-epoch and median
later-epoch seconds (wall and CPU), their ratios, whether both gave the same metrics, and the
load average (``uptime``) before and after.

    python bench/monitor.py --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from service.config import load_config
from service.models import unwrap
from service.train import KnnMonitor, build_state

PATHS = {"decode_every_epoch": False, "decode_once": True}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="jobs/configs/smoke-cpu.yaml")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    config = load_config(args.config, args.set)
    torch.manual_seed(config.train.seed)
    s = build_state(config, torch.device("cpu"), steps_per_epoch=1, gather_distributed=False)
    model = unwrap(s.model)
    monitors = {name: KnnMonitor(config, decode_once=once) for name, once in PATHS.items()}
    seconds: dict[str, list[float]] = {name: [] for name in PATHS}
    cpu: dict[str, list[float]] = {name: [] for name in PATHS}
    metrics: dict[str, dict[str, float]] = {}
    for epoch in range(args.epochs):
        order = list(PATHS) if epoch % 2 == 0 else list(reversed(PATHS))
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            metrics[name] = monitors[name](model, torch.device("cpu"))
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(json.dumps({"path": name, "epoch": epoch + 1,
                              "seconds": round(seconds[name][-1], 3),
                              "cpu_s": round(cpu[name][-1], 3)}), flush=True)  # fmt: skip
    later = {name: statistics.median(v[1:] or v) for name, v in seconds.items()}
    later_cpu = {name: statistics.median(v[1:] or v) for name, v in cpu.items()}
    print(json.dumps({
        "summary": "monitor seconds per epoch", "config": args.config, "overrides": args.set,
        "bank_rows": len(monitors["decode_once"].bank.pixels),
        "val_rows": len(monitors["decode_once"].val.pixels), "threads": args.threads,
        **{f"{n}_first_s": round(v[0], 3) for n, v in seconds.items()},
        **{f"{n}_later_median_s": round(v, 3) for n, v in later.items()},
        "speedup_later": round(later["decode_every_epoch"] / later["decode_once"], 2),
        **{f"{n}_later_median_cpu_s": round(v, 3) for n, v in later_cpu.items()},
        "speedup_later_cpu": round(
            later_cpu["decode_every_epoch"] / later_cpu["decode_once"], 2
        ),
        "same_metrics": metrics["decode_once"] == metrics["decode_every_epoch"],
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
