"""Loss benchmark (not a test): forward+backward seconds and peak RSS, one JSON line per config.

    python bench/loss.py                        # B in {1024, 4096, 16384} + B=65536 chunked
    python bench/loss.py --sizes 1024 --no-big  # quick look

B is the number of *global embeddings* (two views of B/2 samples), so every exact implementation
needs the three B x B x D products measured by the ``floor`` row: the forward logits and the two
backward products (grad wrt anchors and wrt keys). Each configuration runs in a fresh subprocess,
so ``peak_rss_mib`` (ru_maxrss minus a baseline taken after imports and input creation) is that
configuration's own peak. Rows:

* ``floor``: the three matmuls alone (materialising the B x B product once).
* ``ours`` / ``ours_chunk{k}``: ``NTXentLoss`` unchunked / memory-bounded.
* ``seed_loops``: the design notes' "production" InfoNCE: interleaved pairs, positive/negative
  masks built with ``for i in range(B)``, boolean-mask selection, cross-entropy. (The note's
  version forgets to divide the positive logit by the temperature; this one divides, so its loss
  equals ours.)
* ``lightly`` / ``pml``: lightly's and pytorch-metric-learning's ``NTXentLoss``, when installed.

A row may carry ``"skipped": reason`` instead of numbers (too slow, or a predicted peak beyond
half the free memory, extrapolated from the previous size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPERATURE = 0.5
CHUNKS = (1024, 2048)
PEERS = {"lightly": "lightly", "pml": "pytorch_metric_learning"}  # row name -> module


# --- one configuration (runs inside a fresh subprocess) ------------------------------------------


def _step_fn(method: str, b: int, d: int, chunk: int | None) -> Callable[[], float]:
    """A closure doing one forward+backward on fresh leaf tensors, returning the loss value."""
    import torch

    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(b // 2, d, generator=g).requires_grad_()
    z2 = torch.randn(b // 2, d, generator=g).requires_grad_()

    def clear() -> None:
        z1.grad = z2.grad = None

    if method == "floor":
        z = torch.cat([z1, z2]).detach()

        def step() -> float:
            logits = z @ z.T  # forward
            grad_anchors = logits @ z  # backward, wrt anchors
            grad_keys = logits.T @ z  # backward, wrt keys
            return float(grad_anchors[0, 0] + grad_keys[0, 0])

        return step
    if method.startswith("ours"):
        sys.path.insert(0, str(REPO))
        from service.losses import NTXentLoss

        crit = NTXentLoss(TEMPERATURE, gather_distributed=False, chunk_size=chunk)
        loss_fn = crit
    elif method == "seed_loops":
        loss_fn = _seed_loops_ntxent
    elif method == "lightly":
        from lightly.loss import NTXentLoss as LightlyNTXent

        loss_fn = LightlyNTXent(temperature=TEMPERATURE)
    elif method == "pml":
        from pytorch_metric_learning.losses import NTXentLoss as PmlNTXent

        pml = PmlNTXent(temperature=TEMPERATURE)
        labels = torch.arange(b // 2).repeat(2)

        def loss_fn(a, c):
            return pml(torch.cat([a, c]), labels)
    else:
        raise ValueError(f"unknown method {method!r}")

    def step() -> float:
        clear()
        loss = loss_fn(z1, z2)
        loss.backward()
        return float(loss)

    return step


def _seed_loops_ntxent(z1, z2):
    """InfoNCE as in the design notes: interleaved pairs, masks built with Python loops."""
    import torch
    import torch.nn.functional as F

    features = F.normalize(torch.stack([z1, z2], dim=1).reshape(-1, z1.shape[1]), dim=1)
    n = features.shape[0]
    similarity = features @ features.T
    positive = torch.zeros(n, n, dtype=torch.bool)
    for i in range(0, n, 2):  # the notes' loop over samples
        positive[i, i + 1] = True
        positive[i + 1, i] = True
    negative = ~positive
    negative.fill_diagonal_(False)
    logits = similarity / TEMPERATURE
    pos_logits = logits[positive].unsqueeze(1)
    neg_logits = logits[negative].reshape(n, -1)
    labels = torch.zeros(n, dtype=torch.long)
    return F.cross_entropy(torch.cat([pos_logits, neg_logits], dim=1), labels)


def run_one(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    step = _step_fn(cfg["method"], cfg["B"], cfg["D"], cfg.get("chunk_size"))
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times, loss = [], float("nan")
    for i in range(cfg["warmup"] + cfg["reps"]):
        start = time.perf_counter()
        loss = step()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        **cfg,
        "seconds": round(statistics.median(times), 4),
        "seconds_all": [round(t, 4) for t in times],
        "peak_rss_mib": round((peak_kib - base_kib) / 1024, 1),
        "loss": round(loss, 6) if cfg["method"] != "floor" else None,
    }


# --- the driver ----------------------------------------------------------------------------------


def _available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _machine(threads: int) -> dict:
    import platform

    import torch

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mem_available_mib": round(_available_mib()),
    }


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _spawn(cfg: dict, timeout_s: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(cfg)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {**cfg, "skipped": f"timed out after {timeout_s:.0f}s"}
    if proc.returncode != 0:
        return {**cfg, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--big-size", type=int, default=65536)
    parser.add_argument("--big-chunk", type=int, default=2048)
    parser.add_argument("--no-big", action="store_true", help="skip the chunked-only big row")
    parser.add_argument("--timeout", type=float, default=900.0, help="per configuration")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return

    print(json.dumps({"machine": _machine(args.threads)}), flush=True)
    methods: list[tuple[str, int | None]] = [("floor", None), ("ours", None)]
    methods += [(f"ours_chunk{k}", k) for k in CHUNKS]
    methods.append(("seed_loops", None))
    methods += [(m, None) for m in PEERS]
    peers_missing = {m for m, module in PEERS.items() if not _importable(module)}
    previous: dict[str, dict] = {}  # method -> row at the previous size (for extrapolation)
    floors: dict[int, float] = {}
    for size in args.sizes:
        for method, chunk in methods:
            cfg = {
                "method": method,
                "B": size,
                "D": args.dim,
                "chunk_size": chunk,
                "threads": args.threads,
                "warmup": 1,
                "reps": args.reps,
            }
            if method in peers_missing:
                row = {**cfg, "skipped": "not installed"}
            else:
                row = _maybe_skip(cfg, previous.get(method), args.timeout) or _spawn(
                    cfg, args.timeout
                )
            if method == "floor" and "seconds" in row:
                floors[size] = row["seconds"]
            if "seconds" in row and size in floors:
                row["x_floor"] = round(row["seconds"] / floors[size], 2)
            previous[method] = row
            print(json.dumps(row), flush=True)
    if not args.no_big:
        cfg = {
            "method": f"ours_chunk{args.big_chunk}",
            "B": args.big_size,
            "D": args.dim,
            "chunk_size": args.big_chunk,
            "threads": args.threads,
            "warmup": 0,
            "reps": 1,
        }
        row = _spawn(cfg, timeout_s=max(args.timeout, 3600.0))
        full_gib = args.big_size**2 * 4 / 2**30
        row["full_logits_gib"] = round(full_gib, 1)
        row["under_4_gib"] = row.get("peak_rss_mib", float("inf")) < 4096
        print(json.dumps(row), flush=True)


def _maybe_skip(cfg: dict, prev: dict | None, timeout_s: float) -> dict | None:
    """Skip a quadratic method whose extrapolated memory or time would not fit."""
    if prev is None or "seconds" not in prev:
        return None if prev is None else {**cfg, "skipped": "skipped at the previous size"}
    growth = (cfg["B"] / prev["B"]) ** 2
    predicted_mib = prev["peak_rss_mib"] * growth
    predicted_s = prev["seconds"] * growth * (cfg["warmup"] + cfg["reps"])
    if predicted_mib > 0.5 * _available_mib():
        return {
            **cfg,
            "skipped": f"predicted peak {predicted_mib:.0f} MiB (x{growth:.0f} of B={prev['B']}) "
            f"exceeds half the available {_available_mib():.0f} MiB",
        }
    if predicted_s > timeout_s:
        return {**cfg, "skipped": f"predicted {predicted_s:.0f}s exceeds {timeout_s:.0f}s"}
    return None


if __name__ == "__main__":
    main()
