"""Zero-shot classification with an image–text model (CLIP's recipe).

Each class name is put into every prompt template ("a photo of a {}."), the prompts are embedded
by the text tower, each class's prompt embeddings are L2-normalised, averaged and re-normalised
(prompt ensembling); an image is assigned the class whose embedding is most similar (cosine).
No classifier is trained: the text tower *is* the classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major (``C * T`` prompts).

    >>> class_prompts(["cat", "dog"], ["a {}.", "the {}!"])
    ['a cat.', 'the cat!', 'a dog.', 'the dog!']
    """
    if not class_names or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"zero-shot templates must contain '{{}}' for the class name: {bad}")
    return [template.format(name) for name in class_names for template in templates]


def average_prompt_embeddings(prompt_embeddings: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C * T, d]`` class-major prompt embeddings → ``[C, d]`` unit class embeddings: each
    prompt normalised, averaged per class, the mean normalised again.

    >>> e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, -1.0], [0.0, -3.0]])
    >>> average_prompt_embeddings(e, 2)
    tensor([[ 0.7071,  0.7071],
            [ 0.0000, -1.0000]])
    """
    per_class = F.normalize(prompt_embeddings.float(), dim=1).reshape(
        num_classes, -1, prompt_embeddings.shape[1]
    )
    return F.normalize(per_class.mean(dim=1), dim=1)


@torch.no_grad()
def zeroshot_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """``[C, d]`` unit class embeddings from the text encoder ``encode_text(prompts) -> [n, d]``.

    >>> fake = lambda texts: torch.tensor([[float(len(t)), 1.0] for t in texts])
    >>> zeroshot_classifier(fake, ["ox", "horse"], ["a {}"]).shape
    torch.Size([2, 2])
    """
    prompts = class_prompts(class_names, templates)
    return average_prompt_embeddings(encode_text(prompts), len(class_names))


def zeroshot_predict(
    image_embeddings: torch.Tensor, class_embeddings: torch.Tensor
) -> torch.Tensor:
    """The most similar class (cosine) of every image: ``[n]`` class indices.

    >>> zeroshot_predict(torch.tensor([[0.9, 0.1], [-1.0, 2.0]]), torch.eye(2)).tolist()
    [0, 1]
    """
    images = F.normalize(image_embeddings.float(), dim=1)
    return (images @ F.normalize(class_embeddings.float(), dim=1).T).argmax(dim=1)


def zeroshot_top1(
    image_embeddings: torch.Tensor, labels: torch.Tensor, class_embeddings: torch.Tensor
) -> float:
    """Top-1 accuracy (0–1) of :func:`zeroshot_predict`; ``labels`` index the class rows."""
    if len(labels) == 0:
        raise ValueError("zero-shot accuracy of no images is undefined")
    predicted = zeroshot_predict(image_embeddings, class_embeddings)
    return float((predicted.cpu() == labels.cpu()).float().mean())
