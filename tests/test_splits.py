"""The validation split is held out from training; the test split is never used for selection."""

from __future__ import annotations

import numpy as np

from service.config import BUNDLED_DATA_DIR, Config, load_config
from service.data import build_train_dataset
from service.data.splits import holdout_split, train_val_rows

TEST_SUBSET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"


def test_default_validation_is_held_out_from_train_not_the_test_split() -> None:
    config = Config()
    assert config.data.val is None and config.data.has_val
    assert "test" not in str(config.data.val)
    rows = train_val_rows(config)
    assert len(rows.val) == round(0.1 * 5000)
    assert not set(rows.val) & set(rows.train)
    dataset = build_train_dataset(config)  # decodes the training rows only
    assert len(dataset) == 5000 - len(rows.val)


def test_split_is_seeded_and_limit_takes_a_random_subset_of_training_rows() -> None:
    a, b = holdout_split(1000, 0.2, seed=3), holdout_split(1000, 0.2, seed=3)
    assert np.array_equal(a.val, b.val) and np.array_equal(a.train, b.train)
    assert not np.array_equal(a.val, holdout_split(1000, 0.2, seed=4).val)
    limited = a.train_rows(100)
    assert len(limited) == 100 and not set(limited) & set(a.val)
    assert limited.max() > 500  # a random subset, not the (class-sorted) head of the file


def test_a_val_file_keeps_every_training_row() -> None:
    config = load_config(None, [f"data.val={TEST_SUBSET}"])
    rows = train_val_rows(config)
    assert len(rows.val) == 0 and len(rows.train) == 5000


def test_ray_reader_streams_unless_rows_are_selected_and_large_selections_are_refused(
    monkeypatch,
) -> None:
    from service.data import checks

    held_out = holdout_split(100, 0.1, seed=0)
    assert not held_out.keeps_every_row() and not held_out.keeps_every_row(limit=50)
    every = holdout_split(100, 0.0, seed=0)
    assert every.keeps_every_row() and every.keeps_every_row(limit=100)
    assert not every.keeps_every_row(limit=50)

    config = load_config(None, ["data.reader=ray"])
    assert checks.data_problems(config) == []
    monkeypatch.setattr(checks, "EAGER_SELECTION_MAX_BYTES", 1000)  # the bundled file is 1.4 MB
    assert any("data.val to a held-out Parquet file" in p for p in checks.data_problems(config))
    config = load_config(
        None, ["data.reader=ray", "data.val_fraction=0",
               f"data.val={TEST_SUBSET}"],
    )  # fmt: skip
    assert checks.data_problems(config) == []
