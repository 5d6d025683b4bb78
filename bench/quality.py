"""Representation quality per minute of training: pretrain for a wall-clock budget, then the
evaluation protocol, beside the random-init encoder of the same architecture and, when lightly is
installed, peers at the same budget (``--peers``):

- ``lightly_simclr`` / ``lightly_moco``: lightly's SimCLR and MoCo with **their own** CIFAR-10
  recipe (ResNet-18, SGD, their τ, queue and augmentation; ``bench/peers.py``), beside the
  same ResNet-18 at random init;
- ``lightly_blocks``: lightly's transform, head and NT-Xent around **our** recipe (our backbone,
  optimiser, τ), so only the training machinery differs.

Protocol (fixed seeds): freeze the backbone; weighted kNN (k=200, τ=0.1, cosine) and a linear
probe, the full training set as bank / probe training set, the full **test** split as queries.
No choice is made on these numbers (that is what the validation split is for), so the test split
is the right one to report. Each budget is its own run with the LR schedule laid over that budget
(``train.time_budget_minutes``): the curve is "the best encoder in T minutes", not the
checkpoints of one long run.

Prints one JSON line per (method, budget), logs each to MLflow (experiment ``quality-bench``) and
draws accuracy vs training minutes (``--plot``, also logged).

    python bench/quality.py --minutes 2 5 10 --plot docs/images/quality_curve.png
    python bench/quality.py --config jobs/configs/cifar10-cpu-25min.yaml --minutes 25 \\
        --peers lightly_simclr lightly_moco --plot quality_peers.png
    python bench/quality.py --config jobs/configs/smoke-cpu.yaml --minutes 25 --peers
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.config import Config, load_config
from service.data.augment import eval_transform, view_size
from service.eval.offline import evaluate_encoder
from service.models import build_backbone, build_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def protocol(
    encoder: nn.Module, config: Config, train: str, test: str,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """kNN-200 and linear top-1 of a frozen encoder on the test split (bank: the training set).
    ``normalize``: the (mean, std) the encoder was trained with, when not the config's."""
    torch.manual_seed(0)
    mean, std = normalize or (config.augment.mean, config.augment.std)
    transform = eval_transform(config.data.image_size, mean, std)
    result = evaluate_encoder(
        encoder.eval(), transform, train, test, knn_k=200, knn_temperature=0.1,
        linear_epochs=config.eval.linear_epochs, linear_lr=config.eval.linear_lr,
    )  # fmt: skip
    return {"test_knn_top1": result["knn_top1"], "test_linear_top1": result["linear_top1"]}


def bench_config(args: argparse.Namespace, minutes: float, **overrides: Any) -> Config:
    """The named config on the given data, trained for ``minutes`` (every training row trains:
    nothing is selected on these runs, and the test split only gives the final number)."""
    tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in overrides.items())
    own = load_config(args.config).train
    # under a budget, warmup is a fraction of it: a budgeted recipe keeps its own fraction
    warmup = own.warmup_fraction if own.time_budget_minutes else 0.1
    return load_config(args.config, overrides={
        "data.train": args.train, "data.test": args.test, "data.val_fraction": 0.0,
        "train.time_budget_minutes": minutes, "train.epochs": 10_000,
        "train.warmup_fraction": warmup,
        "train.run_name": f"quality-{Path(args.config).stem}-{minutes:g}min{tag}-{time.time():.0f}",
        "mlflow.experiment": "quality-bench", "mlflow.registered_model_name": None,
        **overrides,
    })  # fmt: skip


def run_ours(args: argparse.Namespace, minutes: float, **overrides: Any) -> dict[str, Any]:
    """Our pretraining (``run_pretraining``) for ``minutes``, then the protocol."""
    from service.train.checkpoint import load_encoder_from_checkpoint, load_state
    from service.train.driver import run_pretraining

    config = bench_config(args, minutes, **overrides)
    started = time.perf_counter()
    summary = run_pretraining(config)
    wall = time.perf_counter() - started
    backbone, _ = load_encoder_from_checkpoint(summary["checkpoint"])
    last = load_state(summary["checkpoint"])["history"][-1]
    return {"method": "ours", "config": args.config, "budget_min": minutes, **overrides,
            "wall_min": round(wall / 60, 2), "epochs": last.get("epoch"),
            "global_step": last.get("global_step"),
            **protocol(backbone, config, args.train, args.test)}  # fmt: skip


def run_random(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config)
    torch.manual_seed(config.train.seed)
    backbone = build_model(config.model).backbone
    return {"method": "random_init", "config": args.config, "budget_min": 0.0,
            **protocol(backbone, config, args.train, args.test)}  # fmt: skip


def run_peer(args: argparse.Namespace, minutes: float, name: str) -> dict[str, Any]:
    """A lightly method with lightly's own CIFAR-10 recipe (``bench/peers.py``) for ``minutes``,
    then the protocol (with the recipe's ImageNet normalisation)."""
    from peers import IMAGENET_MEAN, IMAGENET_STD, RECIPES, peer_row, train_peer

    recipe = RECIPES[name]
    trained = train_peer(recipe, args.train, minutes)
    config = load_config(args.config)
    scores = protocol(trained.pop("backbone"), config, args.train, args.test,
                      normalize=(IMAGENET_MEAN, IMAGENET_STD))  # fmt: skip
    return {**peer_row(recipe), "budget_min": minutes, **trained, **scores}


def run_random_peer(args: argparse.Namespace) -> dict[str, Any]:
    """The peers' ResNet-18 at random init, under the same protocol."""
    from peers import IMAGENET_MEAN, IMAGENET_STD, resnet18_backbone

    torch.manual_seed(0)
    config = load_config(args.config)
    scores = protocol(resnet18_backbone(), config, args.train, args.test,
                      normalize=(IMAGENET_MEAN, IMAGENET_STD))  # fmt: skip
    return {"method": "random_init_resnet18", "backbone": "lightly resnet-18",
            "budget_min": 0.0, **scores}  # fmt: skip


def run_lightly(args: argparse.Namespace, minutes: float) -> dict[str, Any]:
    """SimCLR from lightly's transform, projection head and NT-Xent in a plain single-process
    loop: our backbone and optimiser settings, so only the training machinery differs."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from peers import train_for_budget

    from service.data import ParquetImageDataset, make_dataloader
    from service.losses import resolved_loss_config

    config = load_config(args.config)
    m, a, t = config.model, config.augment, config.train
    torch.manual_seed(t.seed)
    backbone = build_backbone(m.arch, cifar_stem=m.cifar_stem, width=m.width)
    head = SimCLRProjectionHead(backbone.out_dim, m.proj_hidden_dim, m.proj_out_dim)
    transform = SimCLRTransform(
        input_size=view_size(a, config.data.image_size),  # the recipe's training views
        cj_strength=a.strength, min_scale=a.min_scale, gaussian_blur=0.0,
        normalize={"mean": a.mean, "std": a.std},
    )  # fmt: skip
    data = ParquetImageDataset(args.train, transform)
    loader = make_dataloader(data, batch_size=t.global_batch_size, shuffle=True, drop_last=True,
                             num_workers=1)  # fmt: skip
    criterion = NTXentLoss(temperature=resolved_loss_config(config.loss).temperature)
    params = list(backbone.parameters()) + list(head.parameters())
    lr = t.lr * t.global_batch_size / 256
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    # lightly's per-image PIL augmentation counts against the budget, as our data path does
    done = train_for_budget(lambda x0, x1: criterion(head(backbone(x0)), head(backbone(x1))),
                            loader, optimizer, lr, minutes, 0.1, "lightly_blocks")  # fmt: skip
    epochs = math.ceil(done["steps"] / len(loader))  # passes over the data, the last partial
    return {"method": "lightly_blocks", "config": args.config, "budget_min": minutes,
            "epochs": epochs, **protocol(backbone, config, args.train, args.test)}  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy vs training minutes per method (random inits as lines); one budget: bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["budget_min"] > 0]
    methods = list(dict.fromkeys(r["method"] for r in trained))
    one_budget = len({r["budget_min"] for r in trained}) == 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for ax, metric in zip(axes, ("test_knn_top1", "test_linear_top1"), strict=True):
        if one_budget:  # a point per method reads better as bars, random inits beside them
            labels = [f"{r['method']}\n{r['budget_min']:g} min" for r in rows]
            ax.bar(labels, [100 * r[metric] for r in rows], color="tab:blue")
            ax.tick_params(axis="x", rotation=25, labelsize=7)
            ax.set(ylabel=f"{metric} % (CIFAR-10 test split)", title=metric)
        else:
            for i, method in enumerate(methods):
                pts = sorted((r["budget_min"], r[metric]) for r in trained if r["method"] == method)
                ax.plot(*zip(*pts, strict=True), "os^v"[i % 4] + "-", label=method)
            for r in rows:
                if r["budget_min"] == 0:
                    ax.axhline(r[metric], color="grey", ls=":", label=r["method"])
            ax.set(xlabel="training minutes (wall clock, evaluation excluded)",
                   ylabel=f"{metric} (CIFAR-10 test split)", title=metric)  # fmt: skip
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def log_to_mlflow(rows: list[dict[str, Any]], figure: Path | None) -> None:
    import mlflow

    from service.tracking.uri import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri())
    mlflow.set_experiment("quality-bench")
    for row in rows:
        with mlflow.start_run(run_name=f"{row['method']}-{row['budget_min']:g}min"):
            mlflow.log_params({k: v for k, v in row.items() if not isinstance(v, float)})
            mlflow.log_metrics({k: v for k, v in row.items() if isinstance(v, float)})
            if figure is not None:
                mlflow.log_artifact(str(figure), "plots")


RESNET18_PEERS = ("lightly_simclr", "lightly_moco")  # lightly's recipe: its ResNet-18
PEERS = (*RESNET18_PEERS, "lightly_blocks")


def runs_for(peers: list[str]) -> list[Callable[[argparse.Namespace, float], dict[str, Any]]]:
    """Ours, then each peer, for one budget."""
    peer_runs = [run_lightly if name == "lightly_blocks" else partial(run_peer, name=name)
                 for name in peers]  # fmt: skip
    return [run_ours, *peer_runs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="jobs/configs/smoke-cpu.yaml")
    p.add_argument("--train", default=str(SHARED / "cifar10-train.parquet"))
    p.add_argument("--test", default=str(SHARED / "cifar10-test.parquet"))
    p.add_argument("--minutes", type=float, nargs="+", default=[2.0, 5.0])
    p.add_argument("--peers", nargs="*", choices=PEERS, default=["lightly_blocks"],
                   help="lightly peers at the same budgets (none: ours only)")  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, help="write the accuracy-vs-minutes PNG")
    args = p.parse_args()
    try:
        import lightly  # noqa: F401
    except ImportError:
        if args.peers:
            print(json.dumps({"note": "lightly not installed (pip install -e '.[bench]'): "
                                      "peers skipped"}))  # fmt: skip
        args.peers = []
    rows = [run_random(args)]
    if any(name in RESNET18_PEERS for name in args.peers):
        rows.append(run_random_peer(args))
    for row in rows:
        print(json.dumps(row), flush=True)
    for minutes in args.minutes:
        for run in runs_for(args.peers):
            rows.append(run(args, minutes))
            print(json.dumps(rows[-1]), flush=True)
    figure = plot(rows, args.plot) if args.plot else None
    log_to_mlflow(rows, figure)


if __name__ == "__main__":
    main()
