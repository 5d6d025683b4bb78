"""Zero-shot classification and retrieval recall against plain brute-force references (Python
loops over lists: sort the gallery, look for the target)."""

from __future__ import annotations

import math

import pytest
import torch

from service.eval.retrieval import caption_groups, retrieval_recall
from service.eval.zeroshot import (
    average_prompt_embeddings,
    class_prompts,
    zeroshot_classifier,
    zeroshot_predict,
    zeroshot_top1,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(_unit(a), _unit(b), strict=True))


def test_class_embeddings_are_normalised_means_of_normalised_prompts() -> None:
    g = torch.Generator().manual_seed(0)
    names, templates = ["cat", "dog", "ship"], ["a {}.", "the {}!", "{} photo"]
    table = {p: torch.randn(5, generator=g) for p in class_prompts(names, templates)}
    classes = zeroshot_classifier(lambda ps: torch.stack([table[p] for p in ps]), names, templates)
    for c, name in enumerate(names):
        prompts = [t.format(name) for t in templates]
        mean = [sum(_unit(table[p].tolist())[i] for p in prompts) / 3 for i in range(5)]
        torch.testing.assert_close(classes[c], torch.tensor(_unit(mean)))


def test_prompt_rules() -> None:
    with pytest.raises(ValueError, match="must contain"):
        class_prompts(["cat"], ["a photo"])
    with pytest.raises(ValueError, match="at least one"):
        class_prompts([], ["a {}"])
    assert average_prompt_embeddings(torch.ones(6, 2), 3).shape == (3, 2)


def test_zeroshot_top1_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(1)
    images, classes = torch.randn(40, 6, generator=g), torch.randn(4, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    predicted = [
        max(range(4), key=lambda c: _cos(images[i].tolist(), classes[c].tolist()))
        for i in range(40)
    ]
    assert zeroshot_predict(images, classes).tolist() == predicted
    expected = sum(p == y for p, y in zip(predicted, labels.tolist(), strict=True)) / 40
    assert zeroshot_top1(images, labels, classes) == pytest.approx(expected)


def _reference_recall(images, texts, captions, k):
    """Brute force over lists: i2t over distinct strings, t2i from each distinct string."""
    distinct = list(dict.fromkeys(captions))
    text_of = dict(zip(distinct, texts, strict=True))
    i2t_hits = 0
    for image, own in zip(images, captions, strict=True):
        sims = {c: _cos(image, text_of[c]) for c in distinct}
        rank = sum(1 for c in distinct if sims[c] > sims[own])
        i2t_hits += rank < k
    t2i_hits = 0
    for caption in distinct:
        sims = [_cos(text_of[caption], image) for image in images]
        best = max(s for s, c in zip(sims, captions, strict=True) if c == caption)
        t2i_hits += sum(1 for s in sims if s > best) < k
    return i2t_hits / len(images), t2i_hits / len(distinct)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_recall_matches_brute_force_with_repeated_captions(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pool = [f"a photo of thing {i}" for i in range(15)]
    captions = [pool[int(i)] for i in torch.randint(0, 15, (60,), generator=g)]
    ids, distinct = caption_groups(captions)
    assert [distinct[i] for i in ids.tolist()] == captions
    images = torch.randn(60, 8, generator=g)
    texts = torch.randn(len(distinct), 8, generator=g)
    # make retrieval better than chance so both hits and misses occur
    images += 1.5 * texts[ids]
    recall = retrieval_recall(images, texts, ids, ks=(1, 5, 10))
    for k in (1, 5, 10):
        i2t, t2i = _reference_recall(images.tolist(), texts.tolist(), captions, k)
        assert recall[f"i2t_recall_at_{k}"] == pytest.approx(i2t)
        assert recall[f"t2i_recall_at_{k}"] == pytest.approx(t2i)
    assert 0 < recall["i2t_recall_at_1"] < 1


def test_identical_captions_are_one_target() -> None:
    # Two images share caption "a"; the text gallery holds "a" once, so image 1 retrieves it first
    # even though image 0 is the closer of the pair to it.
    images = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ids, distinct = caption_groups(["a", "a", "b"])
    assert distinct == ["a", "b"]
    recall = retrieval_recall(images, texts, ids, ks=(1,))
    assert recall == {"i2t_recall_at_1": 1.0, "t2i_recall_at_1": 1.0}


def test_retrieval_shape_errors() -> None:
    with pytest.raises(ValueError, match="caption ids"):
        retrieval_recall(torch.ones(3, 2), torch.ones(1, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="paired image"):
        retrieval_recall(torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2, dtype=torch.long))
