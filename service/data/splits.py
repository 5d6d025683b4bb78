"""Which rows of ``data.train`` train the encoder and which are held out for validation.

Recipes and hyperparameters (Tune, the ``champion`` alias, the per-epoch kNN monitor) are chosen
on a validation split; the test split (``data.test``) only gives the final number. Unless
``data.val`` names a file of its own, the validation split is ``data.val_fraction`` of the
training rows, drawn with a seeded permutation and never trained on:

    >>> rows = holdout_split(100, val_fraction=0.1, seed=0)
    >>> len(rows.val), len(rows.train), len(set(rows.val) & set(rows.train))
    (10, 90, 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.config import Config
from service.data.sources import inspect_source


@dataclass(frozen=True)
class SplitRows:
    """Global row ids of ``data.train``: ``train`` in a seeded random order (so any prefix is a
    random subset), ``val`` the held-out rows (empty when there is no held-out split)."""

    train: np.ndarray
    val: np.ndarray

    def train_rows(self, limit: int | None = None) -> np.ndarray:
        """The first ``limit`` training rows (all when None), sorted for sequential reads."""
        return np.sort(self.train[:limit])

    def keeps_every_row(self, limit: int | None = None) -> bool:
        """Nothing held out and nothing cut by ``limit``: a reader may stream the files as they
        are instead of selecting rows (which the Ray reader does eagerly)."""
        return len(self.val) == 0 and (limit is None or limit >= len(self.train))


def holdout_split(num_rows: int, val_fraction: float, seed: int) -> SplitRows:
    """Seeded permutation; the first ``round(val_fraction * num_rows)`` rows are held out."""
    order = np.random.default_rng(seed).permutation(num_rows)
    n_val = int(round(val_fraction * num_rows))
    return SplitRows(train=order[n_val:], val=np.sort(order[:n_val]))


def train_val_rows(config: Config) -> SplitRows:
    """The split ``config`` describes (file footers only). With ``data.val`` set, every row of
    ``data.train`` trains and the validation rows come from that file instead."""
    d = config.data
    num_rows = inspect_source(d.train).num_rows
    fraction = 0.0 if d.val else d.val_fraction
    return holdout_split(num_rows, fraction, config.train.seed)
