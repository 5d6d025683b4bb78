"""Offline evaluation protocol (seeds 004): freeze the encoder, extract features on a labelled
train/test Parquet pair, report linear-probe and weighted-kNN top-1 — optionally beside the same
architecture at random init, so a user sees what pretraining bought."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from service.eval.features import extract_features
from service.eval.knn import knn_top1
from service.eval.linear import linear_probe_top1


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
    """Linear and kNN top-1 of a frozen ``encoder`` (images → [b, d] features)."""
    train_x, train_y = extract_features(encoder, train_path, transform)
    test_x, test_y = extract_features(encoder, test_path, transform)
    if (train_y < 0).any() or (test_y < 0).any():
        raise ValueError(f"evaluation needs a `label` column in both {train_path} and {test_path}")
    return {
        "linear_top1": linear_probe_top1(
            train_x, train_y, test_x, test_y, epochs=linear_epochs, lr=linear_lr
        ),
        "knn_top1": knn_top1(train_x, train_y, test_x, test_y, knn_k, knn_temperature),
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
        "feature_dim": int(train_x.shape[1]),
    }


def _load(args: argparse.Namespace):
    """(encoder, transform, config-or-None, model config for a random baseline)."""
    from service.data.augment import eval_transform

    if args.checkpoint:
        from service.train.checkpoint import load_encoder_from_checkpoint

        encoder, config = load_encoder_from_checkpoint(args.checkpoint)
        transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
        return encoder, transform, config
    from service.registry.load import load_encoder

    encoder, transform = load_encoder(args.model)
    return encoder, transform, None


def evaluate_command(args: argparse.Namespace) -> dict[str, Any]:
    """``contrastive evaluate``: JSON-able results (+ ``baseline_random`` when asked)."""
    from service.config import load_config

    encoder, transform, ckpt_config = _load(args)
    config = ckpt_config or load_config(args.config, args.overrides)
    e = config.eval
    kwargs = dict(
        knn_k=e.knn_k,
        knn_temperature=e.knn_temperature,
        linear_epochs=e.linear_epochs,
        linear_lr=e.linear_lr,
    )
    print(f"[evaluate] extracting features on {args.train} and {args.test}", file=sys.stderr)
    result = evaluate_encoder(encoder, transform, args.train, args.test, **kwargs)
    result["source"] = args.checkpoint or args.model
    if args.baseline == "random":
        from service.models import build_model

        torch.manual_seed(config.train.seed)
        random_encoder = build_model(config.model).backbone.eval()
        print("[evaluate] same protocol on the random-init encoder", file=sys.stderr)
        baseline = evaluate_encoder(random_encoder, transform, args.train, args.test, **kwargs)
        result["baseline_random"] = {k: baseline[k] for k in ("linear_top1", "knn_top1")}
    if args.log_to_run:
        from service.tracking.logger import MetricLogger
        from service.tracking.uri import resolve_tracking_uri

        logger = MetricLogger(resolve_tracking_uri(config.mlflow), args.log_to_run)
        metrics = {f"eval_{k}": float(result[k]) for k in ("linear_top1", "knn_top1")}
        if "baseline_random" in result:
            metrics.update(
                {f"eval_random_{k}": float(v) for k, v in result["baseline_random"].items()}
            )
        logger.log_metrics(metrics, step=0)
        logger.flush()
    return result
