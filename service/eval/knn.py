"""Weighted kNN classifier on frozen features: cosine similarity, k=200 nearest neighbours,
each voting with weight ``exp(cos / T)`` with T = 0.1 by default (``eval.knn_temperature``).

This is the weighting scheme of InstDisc (Wu et al. 2018) and solo-learn's kNN monitor, but not
their temperature: both use T = 0.07. The numbers here (and every recorded kNN result of this
service) are with T = 0.1; pass ``temperature=0.07`` for their exact protocol.

``vote="majority"``: one vote per neighbour, ties to the lowest label, i.e. scikit-learn's
``KNeighborsClassifier(n_neighbors=k, metric="cosine")``, the protocol of dkobak/simclr-cifar10
(k=10), which the GPU benchmark compares against (``bench/gpu.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Vote = Literal["weighted", "majority"]


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    *,
    exclude_self: bool = False,
    vote: Vote = "weighted",
) -> torch.Tensor:
    """Predict labels of ``test_features`` by a vote of their k nearest neighbours (cosine).

    ``vote="weighted"``: each neighbour votes with weight ``exp(cos_sim / temperature)``;
    ``"majority"``: one vote each (``temperature`` unused), a tie goes to the lowest label, as in
    scikit-learn. Test rows are processed in chunks so the similarity matrix never exceeds
    ``chunk_size x n_train``.

    ``exclude_self``: the bank and the queries are the same data (bank row i *is* query i; the
    bank may be a prefix of the queries, as with a row limit). Each query then never votes for
    itself: with itself in the bank its own label would win at similarity 1, which is training
    accuracy, not kNN accuracy.

    >>> train = torch.eye(3); labels = torch.tensor([0, 1, 2])
    >>> knn_predict(train, labels, torch.tensor([[0.9, 0.1, 0.0]]), k=2).tolist()
    [0]
    >>> knn_predict(train, labels, torch.tensor([[0.1, 0.9, 0.0]]), k=2, vote="majority").tolist()
    [0]
    """
    if vote not in ("weighted", "majority"):
        raise ValueError(f"vote must be 'weighted' or 'majority', got {vote!r}")
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float().to(train_features.device), dim=1)
    num_classes = int(train_labels.max()) + 1
    train_labels = train_labels.to(train_features.device)  # features may live on a GPU
    n_bank = train_features.shape[0]
    if exclude_self and n_bank > test_features.shape[0]:
        raise ValueError(
            f"exclude_self needs the bank ({n_bank} rows) to be the queries "
            f"({test_features.shape[0]} rows) or a prefix of them"
        )
    k = min(k, n_bank - 1 if exclude_self else n_bank)
    if k < 1:
        raise ValueError("kNN needs at least one bank row that is not the query itself")
    predictions = []
    for start in range(0, test_features.shape[0], chunk_size):
        sims = test_features[start : start + chunk_size] @ train_features.T
        if exclude_self:
            _mask_self(sims, start)
        top_sims, top_idx = sims.topk(k, dim=1)
        if vote == "majority":  # argmax below takes the first (lowest) label of a tie
            weights = torch.ones_like(top_sims)
        else:
            weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def _mask_self(sims: torch.Tensor, start: int) -> None:
    """Give query ``start + j`` similarity -inf to bank row ``start + j`` (in place)."""
    rows = torch.arange(sims.shape[0])
    cols = rows + start
    inside = cols < sims.shape[1]
    sims[rows[inside], cols[inside]] = float("-inf")


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    *,
    exclude_self: bool = False,
    vote: Vote = "weighted",
) -> float:
    """Top-1 accuracy (0–1) of the kNN classifier (``exclude_self``, ``vote``: see
    :func:`knn_predict`; set ``exclude_self`` when the bank and the queries are the same data)."""
    predicted = knn_predict(
        train_features, train_labels, test_features, k, temperature,
        exclude_self=exclude_self, vote=vote,
    )  # fmt: skip
    return float((predicted == test_labels.to(predicted.device)).float().mean())
