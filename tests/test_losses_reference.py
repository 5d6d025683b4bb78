"""Plain, loop-based reference implementations of every loss (and sanity tests of them).

These are written for obviousness, not speed: explicit loops over anchors and the textbook
formulas. The single-process and distributed loss tests compare ``service.losses`` against them.
All inputs are *global* batches (what one worker would see with the concatenated batch).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=1, keepdim=True)


def ref_ntxent(views: list[Tensor], temperature: float) -> Tensor:
    """Multi-positive NT-Xent: per anchor, mean over positives of (-pos + LSE over all others)."""
    zs = [_unit(v) for v in views]
    n_views, n = len(zs), zs[0].shape[0]
    everything = torch.cat(zs)  # row u*n + j
    terms = []
    for v in range(n_views):
        for i in range(n):
            anchor = zs[v][i]
            others = [r for r in range(n_views * n) if r != v * n + i]
            lse = torch.logsumexp(everything[others] @ anchor / temperature, dim=0)
            per_positive = [lse - anchor @ zs[u][i] / temperature for u in range(n_views) if u != v]
            terms.append(torch.stack(per_positive).mean())
    return torch.stack(terms).mean()


def ref_symmetric(a: Tensor, b: Tensor, scale: Tensor | float) -> Tensor:
    """CLIP: mean of the a->b and b->a cross-entropies with the diagonal as labels."""
    a, b = _unit(a), _unit(b)
    n = a.shape[0]
    ab, ba = [], []
    for i in range(n):
        ab.append(-torch.log_softmax(scale * (b @ a[i]), dim=0)[i])
        ba.append(-torch.log_softmax(scale * (a @ b[i]), dim=0)[i])
    return 0.5 * (torch.stack(ab).mean() + torch.stack(ba).mean())


def ref_moco(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo: -log softmax([q.k, q.queue] / T)[0], averaged."""
    q, k = _unit(q), _unit(k.detach())
    losses = []
    for i in range(q.shape[0]):
        logits = torch.cat([(q[i] @ k[i]).view(1), queue @ q[i]]) / temperature
        losses.append(-torch.log_softmax(logits, dim=0)[0])
    return torch.stack(losses).mean()


def ref_enqueue(queue: Tensor, ptr: int, keys: Tensor) -> tuple[Tensor, int]:
    """Write normalised keys one by one at the ring pointer."""
    queue = queue.clone()
    for key in _unit(keys.detach().to(queue.dtype)):
        queue[ptr] = key
        ptr = (ptr + 1) % queue.shape[0]
    return queue, ptr


def ref_hard_negative(views: list[Tensor], temperature: float, top_k: int) -> Tensor:
    """Denominator = the positives + the top_k most similar negatives of each anchor."""
    zs = [_unit(v) for v in views]
    n_views, n = len(zs), zs[0].shape[0]
    terms = []
    for v in range(n_views):
        for i in range(n):
            anchor = zs[v][i]
            positives = torch.stack(
                [anchor @ zs[u][i] / temperature for u in range(n_views) if u != v]
            )
            negatives = torch.stack(
                [
                    anchor @ zs[u][j] / temperature
                    for u in range(n_views)
                    for j in range(n)
                    if j != i
                ]
            )
            hardest = torch.sort(negatives, descending=True).values[:top_k]
            lse = torch.logsumexp(torch.cat([positives, hardest]), dim=0)
            terms.append(lse - positives.mean())
    return torch.stack(terms).mean()


def ref_debiased(z1: Tensor, z2: Tensor, temperature: float, tau_plus: float) -> Tensor:
    """Chuang et al. 2020, written like their reference code (exp space, explicit clamp)."""
    zs = [_unit(z1), _unit(z2)]
    n = z1.shape[0]
    n_neg = 2 * n - 2
    losses = []
    for v in range(2):
        for i in range(n):
            anchor = zs[v][i]
            pos = torch.exp(anchor @ zs[1 - v][i] / temperature)
            neg = torch.stack(
                [
                    torch.exp(anchor @ zs[u][j] / temperature)
                    for u in range(2)
                    for j in range(n)
                    if j != i
                ]
            )
            ng = (-tau_plus * n_neg * pos + neg.sum()) / (1 - tau_plus)
            ng = torch.clamp(ng, min=n_neg * math.e ** (-1 / temperature))
            losses.append(-torch.log(pos / (pos + ng)))
    return torch.stack(losses).mean()


# --- sanity checks of the references themselves -------------------------------------------------


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _simclr_cross_entropy(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """The classic SimCLR NT-Xent as a 2N-way cross-entropy with the diagonal removed."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def test_ref_ntxent_two_views_is_simclr_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    assert torch.allclose(ref_ntxent([z1, z2], 0.3), _simclr_cross_entropy(z1, z2, 0.3))


def test_ref_ntxent_hand_computed_two_samples() -> None:
    # Toy case: positives identical, negatives orthogonal -> closed form.
    e1, e2 = (
        torch.tensor([1.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
    )
    z = torch.stack([e1, e2])
    t = 0.5
    # Each anchor: positive logit 1/t, two negatives with logit 0.
    expected = -(1 / t) + math.log(math.exp(1 / t) + 2.0)
    assert ref_ntxent([z, z.clone()], t).item() == pytest.approx(expected)


def test_ref_debiased_with_tau_zero_is_ntxent() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
    )
    assert torch.allclose(ref_debiased(z1, z2, 0.5, 0.0), ref_ntxent([z1, z2], 0.5))


def test_ref_hard_negative_with_all_negatives_is_ntxent() -> None:
    g = torch.Generator().manual_seed(2)
    views = [_randn(g, 4, 3) for _ in range(3)]
    assert torch.allclose(ref_hard_negative(views, 0.4, top_k=3 * 4 - 3), ref_ntxent(views, 0.4))


def test_ref_symmetric_matches_clip_formula() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    logits = 10.0 * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    labels = torch.arange(5)
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert torch.allclose(ref_symmetric(a, b, 10.0), clip)
