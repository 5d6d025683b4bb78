"""Weighted kNN classifier on frozen features (InstDisc / solo-learn protocol: cosine, k=200)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predict labels of ``test_features`` by a similarity-weighted vote of k nearest neighbours.

    Each neighbour votes with weight ``exp(cos_sim / temperature)``. Test rows are processed in
    chunks so the similarity matrix never exceeds ``chunk_size x n_train``.

    >>> train = torch.eye(3); labels = torch.tensor([0, 1, 2])
    >>> knn_predict(train, labels, torch.tensor([[0.9, 0.1, 0.0]]), k=2).tolist()
    [0]
    """
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    num_classes = int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    predictions = []
    for start in range(0, test_features.shape[0], chunk_size):
        sims = test_features[start : start + chunk_size] @ train_features.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy (0–1) of the weighted kNN classifier."""
    predicted = knn_predict(train_features, train_labels, test_features, k, temperature)
    return float((predicted == test_labels).float().mean())
