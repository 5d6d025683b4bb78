"""Frozen-encoder evaluation: feature extraction, weighted kNN (cosine), linear probe, and the
offline protocol that runs both on a labelled train/test Parquet pair; image–text zero-shot
classification and retrieval recall (per epoch and beside a random-init model); representation
health (alignment, uniformity, effective rank, spread, positive gap; the collapse verdict)."""

from service.eval.features import EvalRows, extract_features, pixel_features
from service.eval.health import (
    MIN_EFFECTIVE_RANK,
    MIN_STD_FRACTION,
    alignment,
    collapse_reason,
    dimension_std,
    effective_rank,
    image_text_health,
    positive_gap,
    representation_health,
    target_gap,
    uniformity,
)
from service.eval.image_text import (
    CaptionedImages,
    ImageTextMonitor,
    evaluate_beside_random_init,
    image_text_metrics,
    image_text_problems,
    load_captioned_images,
    monitor_metric_names,
)
from service.eval.knn import knn_predict, knn_top1
from service.eval.linear import linear_probe_top1
from service.eval.offline import (
    evaluate_beside_random,
    evaluate_encoder,
    evaluation_metrics,
    same_dataset,
)
from service.eval.retrieval import caption_groups, retrieval_recall
from service.eval.zeroshot import zeroshot_classifier, zeroshot_predict, zeroshot_top1

__all__ = [
    "MIN_EFFECTIVE_RANK",
    "MIN_STD_FRACTION",
    "CaptionedImages",
    "EvalRows",
    "ImageTextMonitor",
    "alignment",
    "caption_groups",
    "collapse_reason",
    "dimension_std",
    "effective_rank",
    "evaluate_beside_random",
    "evaluate_beside_random_init",
    "evaluate_encoder",
    "evaluation_metrics",
    "extract_features",
    "image_text_health",
    "image_text_metrics",
    "image_text_problems",
    "knn_predict",
    "knn_top1",
    "linear_probe_top1",
    "load_captioned_images",
    "monitor_metric_names",
    "pixel_features",
    "positive_gap",
    "representation_health",
    "retrieval_recall",
    "same_dataset",
    "target_gap",
    "uniformity",
    "zeroshot_classifier",
    "zeroshot_predict",
    "zeroshot_top1",
]
