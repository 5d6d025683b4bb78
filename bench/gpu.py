"""The prepared GPU visit of issue 23 (item 3): one script, at most 9 minutes on one H100 or H200,
full CIFAR-10, through the service's own Ray loop. The parts run in this order, so that a run cut
off early still reports the first ones:

a. the bare step (``bench/train_step.py``'s ``measure``: ResNet-18, bf16, channels_last, batch
   512; with cudnn.benchmark off, as the loop runs, and on) beside the whole Ray loop's training
   images/s on the same model, batch, optimiser and precision (``run_pretraining``: embedded Ray,
   1 worker, NCCL, decoded once + batched augmentation on the GPU, MLflow on, monitor off), and
   the share of the loop's time spent waiting for data; both loop figures are the loop's own
   per-epoch reports (``images_per_s``, ``data_wait_s``), the first (warm-up) epoch left out;
b. quality: ``jobs/configs/cifar10-resnet18-5min-gpu.yaml`` for (up to) 5 minutes of training, then
   the test split's kNN (ours: k=200 weighted; dkobak's: k=10 cosine majority) and linear probe
   beside random init (the protocol of ``service/eval/offline.py``, features on the GPU), and the
   validation-kNN curve against training minutes beside dkobak/simclr-cifar10's two published
   points → ``quality.png``;
c. one cached-gradient run (``train.micro_batch_size`` 512) through the loop at a global batch
   whose plain step would not fit the card (estimated from the measured bf16 step).

Every finished part prints one JSON line naming the device (also appended to
``OUT/results.jsonl``); a part that fails prints ``{"part": ..., "error": ...}`` and the next one
runs. Training budgets shrink to what ``--deadline-s`` leaves (the lines say so); at the deadline
the script prints a last line and exits 3.

    bash bench/gpu.sh                                           # the GPU machine: install + this
    PYTHONPATH=. python bench/gpu.py --out /tmp/gpu             # a GPU box with the deps
    PYTHONPATH=. python bench/gpu.py --dry-run --out /tmp/dry   # CPU: the plumbing, tiny data
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/gpu.py` from anywhere: this checkout's service
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CONFIGS = REPO / "jobs" / "configs"
# the copy carried to the GPU machine (bench/gpu_pack.sh), then the shared one beside the checkout
DATA_DIRS = (REPO / ".gpudata", REPO.parent / "shared" / "data")
BUNDLED = REPO / "service" / "data" / "bundled"
# dkobak/simclr-cifar10, ResNet-18, batch 1024, one A100: test kNN (k=10, cosine), as issue 23
# quotes them
ANCHOR = (
    {"minutes": 20.0, "epochs": 100, "knn10": 0.832},
    {"minutes": 99.0, "epochs": 500, "knn10": 0.903},
)
GOAL = {"knn10": 0.83, "minutes": 5.0, "loop_vs_bare": 0.9, "data_wait_fraction": 0.1}
# bench/train_step.py on one H100 (docs/benchmarks.md): ResNet-18, bf16 + channels_last, batch
# 512, 2 views: peak 2,606 MiB, i.e. ~5.1 MiB per source image for a plain step.
PLAIN_MIB_PER_IMAGE = 2606 / 512


@dataclass(frozen=True)
class Plan:
    """The sizes of one visit: the GPU's, or the CPU dry run's (tiny model, data and budgets)."""

    device: str
    bare: dict[str, Any]  # bench/train_step.py measure() arguments
    loop_minutes: float
    quality_minutes: float  # at most; less when the deadline does not leave it
    cache_minutes: float
    cache_micro: int
    cache_batch: int | None  # None: from the card's memory
    every: dict[str, Any] = field(default_factory=dict)  # overrides of every run
    quality: dict[str, Any] = field(default_factory=dict)  # overrides of part b
    # seconds part b needs beside its training budget, and what part c needs in all
    quality_overhead_s: float = 0.0
    cache_reserve_s: float = 0.0
    eval_limit: int | None = None  # rows of each split in part b's test protocol (None: all)


GPU_PLAN = Plan(
    device="cuda",
    bare={"arch": "resnet18", "batch": 512, "amp": "bf16", "channels_last": True, "steps": 30},
    loop_minutes=0.4,
    quality_minutes=5.0,
    cache_minutes=0.5,
    cache_micro=512,
    cache_batch=None,
    every={"train.use_gpu": True, "train.cpus_per_worker": 8},
    quality_overhead_s=90.0,  # start-up ~20 s, ~10 monitor passes ~30 s, test protocol ~40 s
    cache_reserve_s=75.0,  # start-up ~25 s + 0.5 min of training + slack
)

DRY_PLAN = Plan(
    device="cpu",
    bare={
        "arch": "small_cnn",
        "batch": 32,
        "amp": "off",
        "channels_last": False,
        "steps": 1,
        "width": 8,
        "proj_hidden": 64,
    },  # fmt: skip
    loop_minutes=0.02,
    quality_minutes=0.02,
    cache_minutes=0.02,
    cache_micro=16,
    cache_batch=64,
    every={
        "train.use_gpu": False,
        "train.cpus_per_worker": 1,
        "train.amp": "off",
        "model.arch": "small_cnn",
        "model.width": 8,
        "model.proj_hidden_dim": 64,
        "model.channels_last": False,
        "train.epochs": 2,
        "data.limit": 256,
        "train.global_batch_size": 32,
    },  # fmt: skip
    quality={"eval.knn_max_train": 64, "eval.knn_every_epochs": 1, "eval.linear_epochs": 1},
    eval_limit=256,
)


class Bench:
    """The visit's shared state: where it writes, which device, the clock and the deadline."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args, self.plan, self.started = args, plan, time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.train, self.test = data_paths(args.data, args.dry_run)
        self.device = torch.device(plan.device)
        cuda = plan.device == "cuda" and torch.cuda.is_available()  # not: tests of the GPU plan
        self.device_name = torch.cuda.get_device_name() if cuda else "cpu"
        self.part = "start"
        self.loop_rate: float | None = None  # part a's loop images/s (sizes part b's monitor)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.args.deadline_s - self.elapsed()

    def emit(self, **fields: Any) -> dict[str, Any]:
        """One JSON line on stdout and in ``OUT/results.jsonl``, with the part and device."""
        line = {"part": self.part, "device": self.device_name, **fields,
                "elapsed_s": round(self.elapsed(), 1)}  # fmt: skip
        text = json.dumps(line, default=str)
        print(text, flush=True)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(text + "\n")
        return line

    def run_overrides(self, name: str, minutes: float) -> dict[str, Any]:
        """What every pretraining of the visit sets: its data, store, name, budget, no
        registration and no test-split pass in finalize (part b evaluates the test split)."""
        return {
            "data.train": self.train, "data.test": None,
            "train.num_workers": 1, "train.max_failures": 0, "train.epochs": 1000,
            "train.time_budget_minutes": minutes, "train.run_name": f"gpu-{name}",
            "train.storage_path": str(self.work / "ray_results"),
            "mlflow.tracking_uri": f"sqlite:///{self.work / 'mlflow.db'}",
            "mlflow.experiment": "gpu-bench", "mlflow.registered_model_name": None,
            **self.plan.every,
        }  # fmt: skip


def data_paths(data_dir: str | None, dry_run: bool) -> tuple[str, str]:
    """CIFAR-10's train and test Parquet: ``--data``, else ``.gpudata/`` (carried to the GPU
    machine), else ``../shared/data/``; the bundled subset in a dry run."""
    if dry_run:
        return (str(BUNDLED / "cifar10-train-subset.parquet"),
                str(BUNDLED / "cifar10-test-subset.parquet"))  # fmt: skip
    dirs = [Path(data_dir)] if data_dir else list(DATA_DIRS)
    for d in dirs:
        if (d / "cifar10-train.parquet").is_file() and (d / "cifar10-test.parquet").is_file():
            return str(d / "cifar10-train.parquet"), str(d / "cifar10-test.parquet")
    raise SystemExit(f"no cifar10-train/test.parquet in {[str(d) for d in dirs]}")


class PeakMemory:
    """The device's largest memory use (all processes: the Ray worker's too) while inside,
    polled every 0.2 s; ``None`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _used_mib(self) -> float:
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_mib = max(self.peak_mib or 0.0, self._used_mib())

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            self.peak_mib = self._used_mib()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.cuda:
            self._thread.join()


def pretrain(bench: Bench, config_file: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``contrastive pretrain`` of ``config_file`` with ``overrides`` (the driver, embedded
    Ray); the run's summary with its per-epoch history (from the last checkpoint) and the
    device's peak memory."""
    from service.config import load_config
    from service.train.checkpoint import load_state
    from service.train.driver import run_pretraining

    config = load_config(CONFIGS / config_file, overrides=overrides)
    started = time.monotonic()
    with PeakMemory(bench.device) as memory:
        summary = run_pretraining(config)
    history = load_state(summary["checkpoint"])["history"]
    return {"config": config, "summary": summary, "history": history,
            "wall_s": time.monotonic() - started, "peak_device_mib": memory.peak_mib}  # fmt: skip


def loop_rates(history: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """The loop's training images/s, step time and data-wait share over its trained epochs, from
    its own per-epoch reports (``images_per_s`` over the epoch's data + steps, monitor and
    checkpoint excluded; ``data_wait_s``). The first epoch (cuDNN/allocator warm-up) is left
    out when there are others.

    >>> rows = [{"epoch": 0, "global_step": 0},
    ...         {"epoch": 1, "global_step": 10, "images_per_s": 50.0, "data_wait_s": 1.0},
    ...         {"epoch": 2, "global_step": 20, "images_per_s": 100.0, "data_wait_s": 0.1}]
    >>> loop_rates(rows, batch=10)
    {'images_per_s': 100.0, 'step_ms': 100.0, 'data_wait_fraction': 0.1, 'epochs_used': [2]}
    """
    trained, previous_step = [], 0
    for h in history:
        if h.get("epoch", 0) >= 1 and "images_per_s" in h:
            steps = h["global_step"] - previous_step
            trained.append((h["epoch"], steps, steps * batch / h["images_per_s"], h["data_wait_s"]))
        previous_step = h.get("global_step", previous_step)
    used = trained[1:] if len(trained) > 1 else trained
    steps = sum(u[1] for u in used)
    seconds = sum(u[2] for u in used)
    return {
        "images_per_s": round(steps * batch / seconds, 1),
        "step_ms": round(1000 * seconds / steps, 2),
        "data_wait_fraction": round(sum(u[3] for u in used) / seconds, 4),
        "epochs_used": [u[0] for u in used],
    }


# --- part a: the bare step vs the whole loop --------------------------------------------------


def loop_run(bench: Bench) -> tuple[str, dict[str, Any]]:
    """Part a's pretraining: bench/train_step.py's step (AdamW 1e-3 unscaled, τ 0.2, projection
    2048 → 128, 2 views, the bare step's batch and precision) through the loop, monitor off."""
    p = bench.plan.bare
    return "cifar10-resnet18-gpu.yaml", {
        **bench.run_overrides("a-loop", bench.plan.loop_minutes),
        "data.val_fraction": 0.0, "data.reader": "torch", "train.global_batch_size": p["batch"],
        "train.optimizer": "adamw", "train.lr": 1e-3, "train.lr_scaling": "none",
        "train.warmup_epochs": 0.0, "train.amp": p["amp"],
        "model.proj_hidden_dim": p.get("proj_hidden", 2048), "train.checkpoint_every_epochs": 1000,
    }  # fmt: skip


def part_a(bench: Bench) -> None:
    from bench.train_step import measure

    p = bench.plan.bare
    bare = {}
    for benchmark in [False, True] if bench.device.type == "cuda" else [False]:
        torch.backends.cudnn.benchmark = benchmark  # the loop leaves it off
        row = measure(
            p["arch"], p["batch"], p["amp"], p["channels_last"], None, p["steps"], bench.device,
            width=p.get("width", 32), proj_hidden=p.get("proj_hidden", 2048),
        )  # fmt: skip
        bare[benchmark] = row
        bench.emit(what="bare_step", cudnn_benchmark=benchmark, **row)
    torch.backends.cudnn.benchmark = False
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()  # the Ray worker gets the card
    run = pretrain(bench, *loop_run(bench))
    rates = loop_rates(run["history"], run["config"].train.global_batch_size)
    bench.loop_rate = rates["images_per_s"]
    ratios = {
        f"loop_vs_bare{'_cudnn_benchmark' if b else ''}": round(
            rates["images_per_s"] / row["images_per_s"], 3
        )
        for b, row in bare.items()
    }
    bench.emit(
        what="loop_vs_bare_step", loop=rates, bare_images_per_s=bare[False]["images_per_s"],
        **ratios, goal=f"loop >= {GOAL['loop_vs_bare']:.0%} of the bare step, data wait < "
        f"{GOAL['data_wait_fraction']:.0%}", loop_minutes=bench.plan.loop_minutes,
        epochs=run["history"][-1]["epoch"], wall_s=round(run["wall_s"], 1),
        peak_device_mib=run["peak_device_mib"], batch=run["config"].train.global_batch_size,
    )  # fmt: skip


# --- part b: quality in (up to) 5 minutes --------------------------------------------------


def quality_minutes(bench: Bench) -> float:
    """Part b's training budget: the config's 5 minutes, or what the deadline leaves after part
    b's own overhead and part c (GPU); the dry run's fixed tiny budget."""
    plan = bench.plan
    if bench.device.type != "cuda":
        return plan.quality_minutes
    reserve = plan.cache_reserve_s if "c" in bench.args.parts else 0.0  # `--parts b`: all of it
    left = (bench.remaining() - plan.quality_overhead_s - reserve) / 60
    return round(min(plan.quality_minutes, left), 2)


def monitor_every(bench: Bench, minutes: float, rows: int, batch: int) -> int:
    """Epochs between validation-kNN passes: ~10 points on the curve at part a's loop rate (each
    pass decodes its bank and split again, ~2 s on the GPU machine)."""
    if bench.device.type != "cuda" or not bench.loop_rate:
        return int(bench.plan.quality.get("eval.knn_every_epochs", 10))
    epochs = minutes * 60 * bench.loop_rate / (rows // batch * batch)
    return max(1, math.ceil(epochs / 10))


def quality_run(bench: Bench, minutes: float, every: int) -> tuple[str, dict[str, Any]]:
    """Part b's pretraining: the 5-minute config as it is, on the visit's data and store, with
    ``minutes`` of training and the validation kNN every ``every`` epochs."""
    return "cifar10-resnet18-5min-gpu.yaml", {
        **bench.run_overrides("b-quality", minutes), **bench.plan.quality,
        "eval.knn_every_epochs": every,
    }  # fmt: skip


def part_b(bench: Bench) -> None:
    from service.config import load_config

    minutes = quality_minutes(bench)
    if minutes < 1.0 and bench.device.type == "cuda":
        raise RuntimeError(f"only {minutes:.2f} min of training left before the deadline")
    name = "cifar10-resnet18-5min-gpu.yaml"
    base = load_config(CONFIGS / name, overrides={"data.train": bench.train, **bench.plan.every})
    rows = round(50_000 * (1 - base.data.val_fraction))  # CIFAR-10's training rows, held out
    every = monitor_every(bench, minutes, rows, base.train.global_batch_size)
    run = pretrain(bench, *quality_run(bench, minutes, every))
    config, history = run["config"], run["history"]
    trained = probe_test_split(bench, run["summary"]["checkpoint"], config)
    random = probe_test_split(bench, None, config)
    curve = [[round(h.get("train_minutes", 0.0), 3), round(h["knn_top1"], 4)]
             for h in history if "knn_top1" in h]  # fmt: skip
    train_minutes = history[-1]["train_minutes"]
    png = plot_quality(bench, curve, trained, random, train_minutes, config)
    bench.emit(
        what="quality", config=name, budget_minutes=minutes, train_minutes=round(train_minutes, 3),
        epochs=history[-1]["epoch"], loop=loop_rates(history, config.train.global_batch_size),
        test=trained, random_init=random, val_knn_curve=curve, knn_every_epochs=every,
        val_knn=f"k={config.eval.knn_k} weighted, bank {config.eval.knn_max_train} training rows",
        goal_met=trained["knn10"] >= GOAL["knn10"] and train_minutes <= GOAL["minutes"],
        goal=f"test kNN (k=10 cosine) >= {GOAL['knn10']:.0%} after <= {GOAL['minutes']:g} min",
        anchor=ANCHOR, png=str(png), wall_s=round(run["wall_s"], 1),
        peak_device_mib=run["peak_device_mib"],
    )  # fmt: skip


def probe_test_split(bench: Bench, checkpoint: str | None, config: Any) -> dict[str, float]:
    """The offline protocol (``service/eval/offline.py``: frozen backbone, the whole training
    file as bank / probe set, the test split as queries, ``config.eval``'s kNN and probe
    settings) plus dkobak's kNN (k=10, cosine, majority), features extracted on the device.
    ``checkpoint`` None: the same architecture at random init (seeded)."""
    from service.data.augment import eval_transform
    from service.eval import extract_features, knn_top1, linear_probe_top1
    from service.models import build_model
    from service.train.checkpoint import load_encoder_from_checkpoint

    if checkpoint is None:
        torch.manual_seed(config.train.seed)
        encoder = build_model(config.model).backbone
    else:
        encoder, _ = load_encoder_from_checkpoint(checkpoint)
    encoder = encoder.to(bench.device).eval()
    if config.model.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
    limit = bench.plan.eval_limit
    (x, y), (tx, ty) = (
        extract_features(
            encoder, path, transform, batch_size=1024, device=bench.device, limit=limit
        )
        for path in (bench.train, bench.test)
    )
    e, on = config.eval, bench.device  # kNN on the device: 10k x 50k similarities
    return {
        "knn200": knn_top1(x.to(on), y, tx.to(on), ty, e.knn_k, e.knn_temperature),
        "knn10": knn_top1(x.to(on), y, tx.to(on), ty, 10, vote="majority"),
        "linear": linear_probe_top1(x, y, tx, ty, epochs=e.linear_epochs, lr=e.linear_lr),
    }


def plot_quality(
    bench: Bench,
    curve: list[list[float]],
    test: dict[str, float],
    random: dict[str, float],
    minutes: float,
    config: Any,
) -> Path:
    """Validation kNN against training minutes (log scale), the final test kNNs, random init and
    dkobak/simclr-cifar10's two published points → ``OUT/quality.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    points = [(m, k) for m, k in curve if m > 0]
    if points:
        ax.plot(*zip(*points, strict=True), "o-", color="C0", label=(
            f"ours: validation kNN (k={config.eval.knn_k} weighted, bank "
            f"{config.eval.knn_max_train} rows)"))  # fmt: skip
    ax.plot([minutes], [test["knn10"]], "*", ms=14, color="C3",
            label="ours: test kNN (k=10 cosine, majority)")  # fmt: skip
    ax.plot([minutes], [test["knn200"]], "s", color="C0", label="ours: test kNN (k=200 weighted)")
    ax.plot([a["minutes"] for a in ANCHOR], [a["knn10"] for a in ANCHOR], "D--", color="C1",
            label="dkobak/simclr-cifar10, one A100: test kNN (k=10 cosine)")  # fmt: skip
    for a in ANCHOR:
        ax.annotate(f"{a['epochs']} epochs", (a["minutes"], a["knn10"]), textcoords="offset points",
                    xytext=(-24, -14), fontsize=8)  # fmt: skip
    ax.axhline(random["knn10"], ls=":", color="grey", label="random init: test kNN (k=10)")
    ax.axhline(GOAL["knn10"], color="green", alpha=0.3, label="goal: 83% within 5 min")
    ax.set_xscale("log")
    ax.set_xlim(right=150)
    ax.set(xlabel="training minutes (log scale; monitor and checkpoints excluded)",
           ylabel="top-1 (CIFAR-10)", ylim=(0, 1),
           title=f"SimCLR {config.model.arch} on CIFAR-10: {bench.device_name}"
           + (" (dry run: tiny data)" if bench.args.dry_run else ""))  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = bench.out / "quality.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# --- part c: a cached-gradient run at a batch the card cannot hold plainly --------------------


def cache_batch(bench: Bench) -> tuple[int, float | None]:
    """Part c's global batch and the card's memory (MiB): 16,384 when its plain bf16 step
    (~5.1 MiB per image, measured) would not fit the card, else 32,768 (an H200); at most one
    global batch per epoch of CIFAR-10's 50,000 rows."""
    if bench.plan.cache_batch is not None:
        return bench.plan.cache_batch, None
    total = torch.cuda.get_device_properties(0).total_memory / 2**20
    return (16_384 if 16_384 * PLAIN_MIB_PER_IMAGE > total else 32_768), total


def cache_run(bench: Bench, batch: int, minutes: float) -> tuple[str, dict[str, Any]]:
    """Part c's pretraining: the GradCache recipe (LARS at the sqrt-scaled LR, a fifth of the
    budget to warm it up at this batch) on one worker at global batch ``batch``, monitor off."""
    return "cifar10-resnet18-gradcache-gpu.yaml", {
        **bench.run_overrides("c-gradcache", minutes), "data.val_fraction": 0.0,
        "data.reader": "torch", "train.global_batch_size": batch,
        "train.micro_batch_size": bench.plan.cache_micro, "train.warmup_fraction": 0.2,
        "train.checkpoint_every_epochs": 1000,
        **({"data.limit": 2 * batch} if bench.device.type == "cpu" else {}),
    }  # fmt: skip


def part_c(bench: Bench) -> None:
    minutes = bench.plan.cache_minutes
    if bench.device.type == "cuda":
        minutes = round(min(minutes, (bench.remaining() - 45) / 60), 2)
        if minutes < 0.2:
            raise RuntimeError(f"only {minutes:.2f} min of training left before the deadline")
    batch, total_mib = cache_batch(bench)
    micro = bench.plan.cache_micro
    run = pretrain(bench, *cache_run(bench, batch, minutes))
    history = [h for h in run["history"] if h.get("epoch", 0) >= 1]
    estimate = batch * PLAIN_MIB_PER_IMAGE
    bench.emit(
        what="cached_gradient", global_batch=batch, micro_batch=micro,
        plain_step_estimate_mib=round(estimate), device_total_mib=total_mib,
        fits_without_micro=None if total_mib is None else estimate < total_mib,
        peak_device_mib=run["peak_device_mib"], steps=history[-1]["global_step"],
        train_minutes=round(history[-1]["train_minutes"], 3), budget_minutes=minutes,
        loop=loop_rates(run["history"], batch), loss_first=history[0]["train_loss"],
        loss_last=history[-1]["train_loss"], wall_s=round(run["wall_s"], 1),
    )  # fmt: skip


# --- the visit ------------------------------------------------------------------------------

PARTS: dict[str, Callable[[Bench], None]] = {"a": part_a, "b": part_b, "c": part_c}


def start_line(bench: Bench) -> None:
    import mlflow
    import ray

    from service.train.driver import local_cpus

    bench.emit(
        what="start", dry_run=bench.args.dry_run, torch=torch.__version__,
        cuda=torch.version.cuda, ray=ray.__version__, mlflow=mlflow.__version__,
        python=sys.version.split()[0], cpus=local_cpus(), train=bench.train, test=bench.test,
        work=str(bench.work), deadline_s=bench.args.deadline_s, parts=bench.args.parts,
    )  # fmt: skip


def watch_deadline(bench: Bench) -> None:
    """At ``--deadline-s`` print a last line naming the unfinished part and exit (3): the
    visit must end inside the device call, with what it measured already printed."""

    def expire() -> None:
        bench.emit(error=f"deadline of {bench.args.deadline_s:g} s reached; stopped")
        os._exit(3)

    timer = threading.Timer(max(0.0, bench.remaining()), expire)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu-bench",
                   help="JSON lines + PNG (default: $OUT, else outputs/gpu-bench)")  # fmt: skip
    p.add_argument("--work", default=None, help="runs and MLflow store (default: a temp dir)")
    p.add_argument("--data", default=None, help="folder with cifar10-{train,test}.parquet")
    p.add_argument("--parts", default="abc", help="which parts, in order (default: abc)")
    p.add_argument("--deadline-s", type=float, default=510.0, help="the whole visit's seconds")
    p.add_argument("--dry-run", action="store_true", help="CPU plumbing check, tiny data")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or pass --dry-run")
    # Ray's workers inherit this: they import this checkout's service, as the driver does
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    bench = Bench(args, DRY_PLAN if args.dry_run else GPU_PLAN)
    watch_deadline(bench)
    try:
        start_line(bench)
    except Exception as exc:  # Ray or MLflow missing: the install did not work
        bench.emit(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
        return 2
    failed = 0
    for part in args.parts:
        bench.part = part
        try:
            PARTS[part](bench)
        except Exception as exc:  # one part's failure must not cost the others
            failed += 1
            tail = traceback.format_exc()[-3000:]
            bench.emit(error=f"{type(exc).__name__}: {exc}"[:2000], traceback=tail)
    bench.part = "end"
    bench.emit(what="end", failed_parts=failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
