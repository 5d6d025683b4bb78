"""Ablations of the seeds' claims in our implementation, small scale on CPU, same time budget:
kNN vs temperature, vs global batch (more negatives should help), and NT-Xent vs MoCo vs hard
negatives. Each row is one time-budgeted pretraining run (``bench/quality.py::run_ours``) then
the protocol: weighted kNN-200 and the linear probe, bank = the training set, queries = the
**test** split (a report, not a selection: recipes are chosen on the validation split).

One JSON line per run; ``--plot`` draws the three panels. What every run holds equal
(``--equal``): ``minutes`` of training (``--minutes``, the default), ``epochs`` (``--epochs N``)
or optimizer ``steps`` (``--steps N``: ``train.max_steps``, the LR schedule over those steps). On a
shared, noisy machine a time budget buys a different number of steps from run to run; equal
epochs or equal steps give every run the same work (the committed table uses epochs). Equal steps
is what the seeds' claims are about when the batch changes: a larger batch then sees more images.

    python bench/ablations.py --minutes 2 --plot docs/images/ablations.png
    python bench/ablations.py --epochs 4 --plot docs/images/ablations.png
    python bench/ablations.py --equal steps --steps 200 --plot docs/images/ablations_steps.png
    python bench/ablations.py --only temperature --minutes 1      # one family
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from quality import run_ours

from service.config import BUNDLED_DATA_DIR

FAMILIES: dict[str, list[dict[str, Any]]] = {
    "temperature": [{"loss.temperature": t} for t in (0.1, 0.2, 0.5, 1.0)],
    "global_batch": [{"train.global_batch_size": b} for b in (128, 256, 512, 1024)],
    "loss": [
        {"loss.name": "ntxent"},
        {"loss.name": "moco", "loss.moco_queue_size": 4096},
        {"loss.name": "hard_negative", "loss.top_k": 64},
    ],
}


def fixed_epochs(epochs: int | None) -> dict[str, Any]:
    """Overrides that replace the time budget by a fixed number of epochs (None: keep it)."""
    if epochs is None:
        return {}
    return {"train.time_budget_minutes": None, "train.warmup_fraction": 0.0,
            "train.epochs": epochs}  # fmt: skip


def fixed_steps(steps: int) -> dict[str, Any]:
    """Overrides that replace the time budget by ``steps`` optimizer steps (``train.max_steps``;
    the epochs an upper bound that is never reached)."""
    return {"train.time_budget_minutes": None, "train.warmup_fraction": 0.0,
            "train.epochs": 10_000, "train.max_steps": steps}  # fmt: skip


def held_equal(args: argparse.Namespace) -> dict[str, Any]:
    """The overrides of ``--equal``: nothing (minutes: the budget), the epochs or the steps."""
    equal = args.equal or ("epochs" if args.epochs is not None else "minutes")
    if equal == "epochs":
        if args.epochs is None:
            raise SystemExit("--equal epochs needs --epochs N")
        return fixed_epochs(args.epochs)
    if equal == "steps":
        if args.steps is None:
            raise SystemExit("--equal steps needs --steps N")
        return fixed_steps(args.steps)
    return {}


def run_row(args: argparse.Namespace, family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One ablation run (``overrides`` on top of what ``--equal`` holds) and its JSON row."""
    started = time.perf_counter()
    held = held_equal(args)
    row = run_ours(args, args.minutes, **overrides, **held)
    if held:  # epochs or steps: no time budget was set, whatever --minutes says
        row.pop("budget_min", None)
    setting = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
    wall = round((time.perf_counter() - started) / 60, 2)
    return {"family": family, "setting": setting, **row, "run_wall_min": wall}


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(families), figsize=(4.5 * len(families), 3.8), dpi=120)
    for ax, family in zip(list(axes) if len(families) > 1 else [axes], families, strict=True):
        mine = [r for r in rows if r["family"] == family]
        labels = [r["setting"] for r in mine]
        ax.bar(labels, [100 * r["test_knn_top1"] for r in mine], color="tab:blue")
        ax.set(title=family, ylabel="kNN-200 top-1 % (test split)")
        ax.tick_params(axis="x", rotation=20)
        ax.set_ylim(bottom=min(100 * r["test_knn_top1"] for r in mine) - 5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="jobs/configs/smoke-cpu.yaml")
    p.add_argument("--train", default=str(BUNDLED_DATA_DIR / "cifar10-train-subset.parquet"))
    p.add_argument("--test", default=str(BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"))
    p.add_argument("--minutes", type=float, default=2.0, help="training budget of every run")
    p.add_argument("--epochs", type=int, default=None, help="fixed epochs instead of a budget")
    p.add_argument("--steps", type=int, default=None, help="fixed optimizer steps (max_steps)")
    p.add_argument(
        "--equal",
        choices=["minutes", "epochs", "steps"],
        default=None,
        help="what every run holds equal (default: epochs with --epochs, else minutes)",
    )
    p.add_argument("--only", choices=list(FAMILIES), nargs="+", default=list(FAMILIES))
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for family in args.only:
        for overrides in FAMILIES[family]:
            rows.append(run_row(args, family, overrides))
            print(json.dumps(rows[-1]), flush=True)
    if args.plot:
        print(json.dumps({"plot": str(plot(rows, args.plot))}))


if __name__ == "__main__":
    main()
