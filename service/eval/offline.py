"""Offline evaluation protocol (seeds 004): freeze the encoder, extract features on a labelled
train/test Parquet pair, report linear-probe and weighted-kNN top-1 — optionally beside the same
architecture at random init, so a user sees what pretraining bought.

The caller hands in the encoder: where it comes from (a training checkpoint, a registered model)
is the command layer's business, so this module never imports ``service.train``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.config import Config, EvalConfig
from service.eval.features import extract_features
from service.eval.knn import knn_top1
from service.eval.linear import linear_probe_top1

PROBE_METRICS = ("linear_top1", "knn_top1")


def evaluate_encoder(
    encoder: nn.Module,
    transform: Callable,
    train_path: str,
    test_path: str,
    *,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    linear_epochs: int = 30,
    linear_lr: float = 1e-2,
) -> dict[str, Any]:
    """Linear and kNN top-1 of a frozen ``encoder`` (images → [b, d] features).

    When ``train_path`` and ``test_path`` are the same data, the kNN bank and the queries are the
    same rows, so each query is kept out of its own neighbours (``exclude_self``).
    """
    same_data = same_dataset(train_path, test_path)
    train_x, train_y = extract_features(encoder, train_path, transform, label="features train")
    if same_data:
        test_x, test_y = train_x, train_y
    else:
        test_x, test_y = extract_features(encoder, test_path, transform, label="features test")
    if (train_y < 0).any() or (test_y < 0).any():
        raise ValueError(f"evaluation needs a `label` column in both {train_path} and {test_path}")
    knn = knn_top1(train_x, train_y, test_x, test_y, knn_k, knn_temperature, exclude_self=same_data)
    return {
        "linear_top1": linear_probe_top1(
            train_x, train_y, test_x, test_y, epochs=linear_epochs, lr=linear_lr
        ),
        "knn_top1": knn,
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
        "feature_dim": int(train_x.shape[1]),
    }


def same_dataset(a: str, b: str) -> bool:
    """True when two data paths name the same data (same string, or the same local path).

    >>> same_dataset("data/x.parquet", "data/../data/x.parquet"), same_dataset("a", "b")
    (True, False)
    """
    if a == b:
        return True
    if "://" in a or "://" in b:
        return False
    return Path(a).resolve() == Path(b).resolve()


def _probe_settings(e: EvalConfig) -> dict[str, Any]:
    return {
        "knn_k": e.knn_k,
        "knn_temperature": e.knn_temperature,
        "linear_epochs": e.linear_epochs,
        "linear_lr": e.linear_lr,
    }


def evaluate_beside_random(
    encoder: nn.Module,
    transform: Callable,
    train_path: str,
    test_path: str,
    config: Config,
    *,
    random_baseline: bool = False,
    build_random: Callable[[], nn.Module] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_encoder` with ``config.eval``'s probe settings.

    With ``random_baseline``, the same protocol (same ``transform``: input size, normalisation)
    also runs on the encoder's architecture at random init, seeded with ``config.train.seed``;
    its top-1s land under ``baseline_random``. ``build_random`` builds that architecture: pass it
    whenever ``encoder`` was not built from ``config.model`` (a registered encoder records its
    own, ``service.registry.backbone_from_spec``); the default builds ``config.model``.
    """
    settings = _probe_settings(config.eval)
    print(f"[evaluate] extracting features on {train_path} and {test_path}", file=sys.stderr)
    result = evaluate_encoder(encoder, transform, train_path, test_path, **settings)
    if random_baseline:
        torch.manual_seed(config.train.seed)
        random_encoder = (build_random or _builder(config))().eval()
        print("[evaluate] same protocol on the random-init encoder", file=sys.stderr)
        baseline = evaluate_encoder(random_encoder, transform, train_path, test_path, **settings)
        result["baseline_random"] = {k: baseline[k] for k in PROBE_METRICS}
    return result


def _builder(config: Config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from service.models import build_model

        return build_model(config.model).backbone

    return build


def evaluation_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of an evaluation result: ``eval_*`` (+ ``eval_random_*``).

    >>> evaluation_metrics({"linear_top1": 0.5, "knn_top1": 0.25, "n_train": 10})
    {'eval_linear_top1': 0.5, 'eval_knn_top1': 0.25}
    """
    metrics = {f"eval_{k}": float(result[k]) for k in PROBE_METRICS}
    for k, v in result.get("baseline_random", {}).items():
        metrics[f"eval_random_{k}"] = float(v)
    return metrics
