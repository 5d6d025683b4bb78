"""Frozen-encoder evaluation: feature extraction, weighted kNN (cosine), linear probe, and the
offline protocol that runs both on a labelled train/test Parquet pair."""

from service.eval.features import extract_features
from service.eval.knn import knn_predict, knn_top1
from service.eval.linear import linear_probe_top1
from service.eval.offline import (
    evaluate_beside_random,
    evaluate_encoder,
    evaluation_metrics,
    same_dataset,
)

__all__ = [
    "evaluate_beside_random",
    "evaluate_encoder",
    "evaluation_metrics",
    "extract_features",
    "knn_predict",
    "knn_top1",
    "linear_probe_top1",
    "same_dataset",
]
