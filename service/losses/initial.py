"""The step-0 check: is the first loss one a healthy random-init start can give?

A loss records ``FirstBatch`` on its first forward: the cosine similarities of (at most
``MAX_ROWS`` of) this rank's anchors to their local negatives, detached, on the CPU. From them
its ``expected_initial_loss`` adds to log(candidates) (the loss of indistinguishable
embeddings) the **spread term** of this batch: for an anchor with similarities ``s_j`` to its
negatives, ``log mean_j exp((s_j - mean s) / T)`` (about ``var(s) / (2 T^2)`` for small random
similarities). That is the loss when the positive scores like an average negative; at random
init two views of one image are already closer than two images, so a healthy first loss is
*below* it, often far below (the spread alone is +3 at T=0.08 for the smoke model, whose
random-init cosines have sd ~0.2: log(candidates) alone is 46% off there). The batch-hard
triplet loss adds the batch's mean range of distances to its margin instead.

``judge_initial_loss`` therefore flags only what a healthy start cannot show:

- a loss more than ``TOLERANCE`` above that value (positives less similar than negatives, or
  logits scaled wrongly: un-normalised embeddings, the temperature applied twice);
- collapsed embeddings (the first batch's negatives all at cosine ~1);
- a temperature so small for the initial spread that each anchor's softmax starts on under
  ``MIN_EFFECTIVE`` of its candidates (gradients reach only the nearest few negatives).

All of it is a few hundred thousand multiply-adds once per run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_ROWS = 256  # samples per view probed: enough for the spread, cheap at any batch size
TOLERANCE = 0.25  # a first loss this far above the spread-aware value is not a healthy start
MIN_EFFECTIVE = 0.01  # softmax entropy's exp(): fewer than 1% of the candidates is too peaked
COLLAPSED = 0.999  # mean cosine of the negatives at which the embeddings count as one point


@dataclass(frozen=True)
class FirstBatch:
    """Cosine similarities ``[R, M]`` of the probed anchors to their ``M`` local negatives.

    Unpaired losses: every view's rows are anchors, their negatives every view of the *other*
    samples. Paired losses (``a`` against ``b``): row i of ``a`` against ``b_j``, ``j != i``.

    >>> a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> FirstBatch.of((a, a), paired=True).negatives.tolist()
    [[0.0], [0.0]]
    """

    negatives: Tensor

    @classmethod
    def of(cls, views: Sequence[Tensor], paired: bool) -> FirstBatch:
        """The probe of ``views`` (each ``[b, d]``), the first ``MAX_ROWS`` samples of each."""
        rows = [F.normalize(v.detach()[:MAX_ROWS].float().cpu(), dim=1) for v in views]
        n = rows[0].shape[0]
        if paired:
            sims, others = rows[0] @ rows[1].T, ~torch.eye(n, dtype=torch.bool)
        else:
            z = torch.cat(rows)
            sample = torch.arange(z.shape[0]) % n
            sims, others = z @ z.T, sample[:, None] != sample[None, :]
        return cls(sims[others].view(sims.shape[0], -1))

    @property
    def mean(self) -> float:
        return float(self.negatives.mean())

    @property
    def std(self) -> float:
        return float(self.negatives.std()) if self.negatives.numel() > 1 else 0.0

    def spread(self, temperature: float, top_fraction: float = 1.0) -> float:
        """Mean over anchors of ``log mean exp((s - mean s) / T)`` over its negatives, or over
        the ``top_fraction`` most similar of them (centred on the mean of all)."""
        x = self.negatives.double() / temperature
        centred = x - x.mean(dim=1, keepdim=True)
        k = max(1, math.ceil(top_fraction * x.shape[1]))
        top = centred.topk(k, dim=1).values if k < x.shape[1] else centred
        return float((torch.logsumexp(top, dim=1) - math.log(k)).mean())

    def distance_range(self) -> float:
        """Mean over anchors of the farthest minus the nearest negative's Euclidean distance
        (unit vectors): a batch-hard margin loss whose positives score like negatives."""
        distance = (2.0 - 2.0 * self.negatives.double()).clamp_min(0.0).sqrt()
        return float((distance.amax(dim=1) - distance.amin(dim=1)).mean())

    def effective_fraction(self, temperature: float) -> float:
        """exp(entropy) of each anchor's softmax over its negatives, as a fraction of them."""
        logp = torch.log_softmax(self.negatives.double() / temperature, dim=1)
        entropy = -(logp.exp() * logp).sum(dim=1)
        return float(entropy.exp().mean()) / self.negatives.shape[1]


@dataclass(frozen=True)
class InitialLossReport:
    """The first loss, its references and what is wrong (``problem``; None: a healthy start)."""

    loss: float
    reference: float  # the loss of indistinguishable embeddings: log(candidates), or the margin
    expected: float  # the first batch's spread added: the loss of a chance-level positive
    problem: str | None = None
    reference_name: str = "log(candidates)"

    def line(self) -> str:
        """What the training log shows at step 0."""
        text = (
            f"step 0 loss {self.loss:.4f}, expected ~{self.reference_name} = {self.reference:.4f}"
        )
        if self.expected != self.reference:
            text += f", at most ~{self.expected:.4f} with this batch's similarity spread"
        return text + (f"; CHECK THE SETUP: {self.problem}" if self.problem else "")


def judge_initial_loss(
    loss: float,
    reference: float,
    expected: float,
    first: FirstBatch | None,
    temperature: float | None,
) -> InitialLossReport:
    """The report of a first ``loss`` (see the module docstring for the rules); ``temperature``
    None: the loss has no softmax over candidates (margin losses), so no temperature rule."""
    problem = None
    if not math.isfinite(loss):
        problem = f"the loss is {loss}"
    elif first is not None and first.mean > COLLAPSED:
        problem = (
            f"the first batch's embeddings are collapsed (mean cosine {first.mean:.4f} between "
            "different samples): check the model's output and normalisation"
        )
    elif (
        temperature is not None
        and first is not None
        and (first.effective_fraction(temperature) < MIN_EFFECTIVE)
    ):
        problem = (
            f"loss.temperature={temperature:g} is small for the spread of the initial "
            f"similarities (sd {first.std:.3f}): each anchor's softmax starts on "
            f"{100 * first.effective_fraction(temperature):.2f}% of its candidates"
        )
    elif loss > expected * (1 + TOLERANCE):
        problem = (
            f"{100 * (loss / expected - 1):.0f}% above what this batch's similarities allow "
            "(positives scored below negatives, or logits scaled wrongly: un-normalised "
            "embeddings, a temperature applied twice)"
        )
    name = "log(candidates)" if temperature is not None else "margin"
    return InitialLossReport(loss, reference, expected, problem, name)
