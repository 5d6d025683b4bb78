"""Representation health: is the embedding spread out, or collapsing? (docs/training.md)

The numbers the validation monitor logs every monitored epoch (``health_*`` in the history and
MLflow), each a plain function of embedding matrices ``[n, d]`` (rows = samples):

- :func:`alignment` and :func:`uniformity` (Wang & Isola 2020): positives close, everything
  spread over the sphere. Lower is better for both.
- :func:`effective_rank` (Roy & Vetterli 2007): how many directions the embeddings really use,
  ``exp`` of the entropy of the normalised singular values; 1 = one direction, ``min(n, d)`` =
  all equally.
- :func:`dimension_std`: mean over dimensions of the per-dimension standard deviation of the
  L2-normalised embeddings; ``1/sqrt(d)`` for embeddings uniform on the sphere, 0 when collapsed.
- :func:`positive_gap`: mean cosine of a positive pair minus the cosine of the anchor's hardest
  negative; > 0 when positives are told apart from every other sample. :func:`target_gap`: the
  same with image–text pairs (anchors: images, candidates: the distinct captions).

:func:`representation_health` (two augmented views are the positives) and
:func:`image_text_health` (an image and its caption are the positives) give the ``health_*`` row.

:func:`collapse_reason` turns them into a verdict against :data:`MIN_EFFECTIVE_RANK` and
:data:`MIN_STD_FRACTION`.

    >>> import torch
    >>> z = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    >>> round(effective_rank(z)), round(dimension_std(z) * 8**0.5, 1)
    (8, 1.0)
    >>> collapsed = torch.ones(512, 8)
    >>> round(effective_rank(collapsed), 6), dimension_std(collapsed)
    (1.0, 0.0)
    >>> collapse_reason({"health_effective_rank": 1.0, "health_embedding_std": 0.0}, dim=8)
    'effective rank 1.00 < 2 (of 8 dimensions); per-dimension std 0 < 0.1/sqrt(8) = 0.0354'
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

# Below this the embeddings use fewer than two directions: 1 is complete collapse (every row a
# multiple of one vector); a healthy projection uses tens (see docs/training.md).
MIN_EFFECTIVE_RANK = 2.0
# Per-dimension std of unit vectors spread uniformly over the sphere is 1/sqrt(d) (their d
# coordinates have mean 0 and squares summing to 1); a tenth of that means the embeddings sit in
# a small cap around one direction (~0.1 rad for every dimension), i.e. collapsed.
MIN_STD_FRACTION = 0.1
# Rows used for uniformity's n^2 pairwise distances (an even stride through the rows).
UNIFORMITY_MAX_ROWS = 2048


def _unit(z: torch.Tensor) -> torch.Tensor:
    return F.normalize(z.double(), dim=1)


def effective_rank(x: torch.Tensor) -> float:
    """``exp(H(p))`` with ``p = s / sum(s)``, ``s`` the singular values of ``x`` ``[n, d]``
    (not centred: a collapsed matrix, every row the same vector, has rank 1; a zero matrix 0).

    >>> effective_rank(torch.eye(4))
    4.0
    """
    s = torch.linalg.svdvals(x.double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> float:
    """``E ||f(x) - f(x+)||^alpha`` over positive pairs (row ``i`` of ``z1`` and ``z2``), after
    L2 normalisation; 0 = views map to the same point, 4 = opposite points (alpha 2).

    >>> round(alignment(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])), 6)
    2.0
    """
    return float((_unit(z1) - _unit(z2)).norm(dim=1).pow(alpha).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """``log E_{i<j} exp(-t ||z_i - z_j||^2)`` of the L2-normalised rows (Wang & Isola's
    ``t = 2``): 0 when every row is the same point, about ``-4`` for many points spread over a
    high-dimensional sphere. At most :data:`UNIFORMITY_MAX_ROWS` rows (an even stride).

    >>> uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # two antipodal points: -2 * 4
    -8.0
    """
    if len(z) < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {len(z)}")
    z = _unit(z[:: math.ceil(len(z) / UNIFORMITY_MAX_ROWS)])
    logits = torch.pdist(z).pow(2).mul(-t)
    return float(torch.logsumexp(logits, 0) - math.log(len(logits)))


def dimension_std(z: torch.Tensor) -> float:
    """Mean over the ``d`` dimensions of the (population) std across rows of the L2-normalised
    rows: ``1/sqrt(d)`` for points uniform on the sphere, 0 for collapsed ones.

    >>> dimension_std(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # dims: std 1 and 0
    0.5
    """
    return float(_unit(z).std(dim=0, correction=0).mean())


def positive_gap(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Mean over the ``2n`` anchors (both views) of ``cos(anchor, its positive)`` minus the
    largest ``cos(anchor, negative)``, negatives: the other ``2n - 2`` embeddings (both views,
    as NT-Xent's). In ``[-2, 2]``; 0 when collapsed; > 0 when every positive beats every negative.

    >>> a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    >>> round(positive_gap(a, b), 3)
    0.846
    """
    n = len(z1)
    if n < 2:
        raise ValueError(f"positive_gap needs at least 2 pairs, got {n}")
    z = _unit(torch.cat([z1, z2]))
    sim = z @ z.T
    idx = torch.arange(2 * n)
    positive = sim[idx, (idx + n) % (2 * n)]
    sim[idx, idx] = -math.inf
    sim[idx, (idx + n) % (2 * n)] = -math.inf
    return float((positive - sim.max(dim=1).values).mean())


def target_gap(anchors: torch.Tensor, targets: torch.Tensor, target_ids: torch.Tensor) -> float:
    """Mean over the ``n`` anchors of ``cos(anchor i, targets[target_ids[i]])`` minus the largest
    cos to any *other* target: image–text pairs, ``targets`` the distinct captions (identical
    captions are one target, as in retrieval, never a negative of each other). In ``[-2, 2]``;
    0 when collapsed.

    >>> a, t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2]]), torch.eye(2)
    >>> round(target_gap(a, t, torch.tensor([0, 1, 0])), 3)  # 1, 1, (0.981 - 0.196)
    0.928
    """
    if len(targets) < 2:
        raise ValueError(f"target_gap needs at least 2 distinct targets, got {len(targets)}")
    sim = _unit(anchors) @ _unit(targets).T
    idx = torch.arange(len(anchors))
    positive = sim[idx, target_ids]
    sim[idx, target_ids] = -math.inf
    return float((positive - sim.max(dim=1).values).mean())


def representation_health(
    features: torch.Tensor, projections: torch.Tensor, view1: torch.Tensor, view2: torch.Tensor
) -> dict[str, float]:
    """The ``health_*`` history metrics: ``features`` / ``projections``: the backbone features
    and their projections of the validation rows; ``view1`` / ``view2``: projections of two
    augmented views of the same images (row ``i`` of each: the same image)."""
    return {
        "health_alignment": alignment(view1, view2),
        "health_uniformity": uniformity(projections),
        "health_effective_rank": effective_rank(projections),
        "health_backbone_effective_rank": effective_rank(features),
        "health_embedding_std": dimension_std(projections),
        "health_positive_gap": positive_gap(view1, view2),
    }


def image_text_health(
    features: torch.Tensor | None,
    images: torch.Tensor,
    texts: torch.Tensor,
    caption_ids: torch.Tensor,
) -> dict[str, float]:
    """The ``health_*`` row of an image–text model on captioned rows: ``images`` ``[n, d]``
    (joint-space image embeddings), ``texts`` ``[m, d]`` (the *distinct* captions' embeddings,
    ``service.eval.retrieval.caption_groups``), image ``i``'s caption ``texts[caption_ids[i]]``,
    ``features`` the images' backbone features (None: no backbone rank). The positives are the
    image–caption pairs; uniformity, effective rank and per-dimension std are the images';
    ``health_text_effective_rank``: the rows' captions (a repeated caption once per row)."""
    paired = texts[caption_ids]
    row = {
        "health_alignment": alignment(images, paired),
        "health_uniformity": uniformity(images),
        "health_effective_rank": effective_rank(images),
        "health_text_effective_rank": effective_rank(paired),
        "health_embedding_std": dimension_std(images),
        "health_positive_gap": target_gap(images, texts, caption_ids),
    }
    if features is not None:
        row["health_backbone_effective_rank"] = effective_rank(features)
    return row


def collapse_reason(metrics: Mapping[str, float], dim: int) -> str | None:
    """Why ``metrics`` (with ``health_effective_rank`` / ``health_embedding_std`` of ``dim``-d
    projections, and ``health_text_effective_rank`` of an image–text run's captions) count as
    collapsed, or None when they do not (or are absent)."""
    reasons = []
    for key, what in (("health_effective_rank", ""), ("health_text_effective_rank", "text ")):
        rank = metrics.get(key)
        if rank is not None and rank < MIN_EFFECTIVE_RANK:
            reasons.append(
                f"{what}effective rank {rank:.2f} < {MIN_EFFECTIVE_RANK:g} (of {dim} dimensions)"
            )
    std = metrics.get("health_embedding_std")
    floor = MIN_STD_FRACTION / math.sqrt(dim)
    if std is not None and std < floor:
        reasons.append(
            f"per-dimension std {std:.3g} < {MIN_STD_FRACTION:g}/sqrt({dim}) = {floor:.3g}"
        )
    return "; ".join(reasons) or None
