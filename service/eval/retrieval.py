"""Image→text and text→image retrieval recall@k on (image, caption) pairs.

**Repeated captions.** Captions often repeat (the CIFAR-derived captions are a few templates per
class, so hundreds of images share one string; web alt text repeats too). Identical strings are one
target, never competing copies of it: the text gallery is the *distinct* caption strings.

- image→text: each image queries the distinct captions; a hit at k when its own caption string
  is among the k most similar.
- text→image: each distinct caption queries all images; a hit at k when any image paired with
  that caption string is among the k most similar.

Ranks count only strictly more similar gallery items (ties resolve in the target's favour).
Recall@k is the fraction of queries with a hit at k (0–1), named ``i2t_recall_at_{k}`` /
``t2i_recall_at_{k}``: MLflow metric names may not contain ``@``.

>>> ids, distinct = caption_groups(["a cat", "a dog", "a cat"])
>>> ids.tolist(), distinct
([0, 1, 0], ['a cat', 'a dog'])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)


def caption_groups(captions: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """``(ids [n], distinct)``: caption ``i`` is ``distinct[ids[i]]`` (first-seen order)."""
    index: dict[str, int] = {}
    ids = [index.setdefault(c, len(index)) for c in captions]
    return torch.tensor(ids, dtype=torch.long), list(index)


@torch.no_grad()
def image_to_text_ranks(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    caption_ids: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``[n]``: how many distinct captions are strictly more similar to image ``i`` than its own
    caption ``text_embeddings[caption_ids[i]]`` (0 = retrieved first)."""
    images = F.normalize(image_embeddings.float(), dim=1)
    texts = F.normalize(text_embeddings.float(), dim=1)
    ranks = []
    for start in range(0, images.shape[0], chunk_size):
        sims = images[start : start + chunk_size] @ texts.T
        own = sims.gather(1, caption_ids[start : start + chunk_size, None].to(sims.device))
        ranks.append((sims > own).sum(dim=1).cpu())
    return torch.cat(ranks)


@torch.no_grad()
def text_to_image_ranks(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    caption_ids: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``[m]``: for distinct caption ``j``, how many images are strictly more similar to it than
    the most similar of the images paired with it. Every caption needs at least one image."""
    images = F.normalize(image_embeddings.float(), dim=1)
    texts = F.normalize(text_embeddings.float(), dim=1)
    caption_ids = caption_ids.to(images.device)
    ranks = []
    for start in range(0, texts.shape[0], chunk_size):
        sims = texts[start : start + chunk_size] @ images.T  # [chunk, n]
        query_ids = torch.arange(start, start + sims.shape[0], device=sims.device)
        paired = caption_ids[None, :] == query_ids[:, None]
        if not paired.any(dim=1).all():
            raise ValueError("every caption of the text gallery needs at least one paired image")
        best = sims.masked_fill(~paired, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append((sims > best).sum(dim=1).cpu())
    return torch.cat(ranks)


def retrieval_recall(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    caption_ids: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """``{"i2t_recall_at_{k}", "t2i_recall_at_{k}"}`` for each ``k``: images ``[n, d]``,
    *distinct* captions ``[m, d]`` and ``caption_ids [n]`` (image ``i`` is paired with caption
    ``caption_ids[i]``, see :func:`caption_groups`).

    >>> images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    >>> texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> recall = retrieval_recall(images, texts, torch.tensor([0, 1, 1]), ks=(1, 2))
    >>> recall["i2t_recall_at_1"], recall["i2t_recall_at_2"]  # image 2 is nearer caption 0
    (0.6666666865348816, 1.0)
    >>> recall["t2i_recall_at_1"], recall["t2i_recall_at_2"]
    (1.0, 1.0)
    """
    if image_embeddings.shape[0] != caption_ids.shape[0]:
        raise ValueError(
            f"{image_embeddings.shape[0]} images but {caption_ids.shape[0]} caption ids"
        )
    i2t = image_to_text_ranks(image_embeddings, text_embeddings, caption_ids)
    t2i = text_to_image_ranks(image_embeddings, text_embeddings, caption_ids)
    out = {f"i2t_recall_at_{k}": float((i2t < k).float().mean()) for k in ks}
    out.update({f"t2i_recall_at_{k}": float((t2i < k).float().mean()) for k in ks})
    return out
