"""kNN and linear probe against straightforward references."""

import torch
import torch.nn.functional as F

from service.eval.knn import knn_predict, knn_top1
from service.eval.linear import linear_probe_top1


def _reference_knn(train, train_y, test, k, t):
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    out = []
    for row in test:
        sims = train @ row
        idx = sims.argsort(descending=True)[:k]
        votes = {}
        for i in idx.tolist():
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0.0) + float((sims[i] / t).exp())
        out.append(max(votes, key=votes.get))
    return torch.tensor(out)


def test_knn_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g), torch.randn(70, 16, generator=g)
    train_y = torch.randint(0, 5, (300,), generator=g)
    expected = _reference_knn(train, train_y, test, k=20, t=0.1)
    assert torch.equal(
        knn_predict(train, train_y, test, k=20, temperature=0.1, chunk_size=16), expected
    )


def test_knn_and_linear_separate_clusters_but_not_noise() -> None:
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 32, generator=g) * 4
    y_train, y_test = (
        torch.randint(0, 4, (400,), generator=g),
        torch.randint(0, 4, (200,), generator=g),
    )
    x_train = centers[y_train] + torch.randn(400, 32, generator=g)
    x_test = centers[y_test] + torch.randn(200, 32, generator=g)
    assert knn_top1(x_train, y_train, x_test, y_test, k=50) > 0.95
    assert linear_probe_top1(x_train, y_train, x_test, y_test, epochs=20) > 0.95
    noise = torch.randn(400, 32, generator=g)
    assert knn_top1(noise, y_train, torch.randn(200, 32, generator=g), y_test, k=50) < 0.5
