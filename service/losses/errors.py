"""Errors raised by the contrastive losses."""

from __future__ import annotations


class LossInputError(ValueError):
    """Bad loss input or hyperparameter; the message names the offending value.

    Raised identically on every rank when the problem is detected collectively (unequal batch
    sizes, non-finite embeddings on some rank), so no worker is left waiting in a collective.
    """


class NonFiniteEmbeddingError(LossInputError):
    """Some embeddings are NaN/inf (the encoder diverged); raised on every rank together."""
