"""One decoded copy of the training rows shared through Ray's object store
(``data.share_decoded``): the copy a worker maps must be exactly what it would have decoded
itself, give the same batches, and a copy of other rows must be refused. Real local Ray."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from service.config import BUNDLED_DATA_DIR, load_config
from service.data.decoded import (
    SharedDecodedMismatchError,
    decode_rows,
    decoded_key,
    load_shared,
    share_decoded,
    share_training_rows,
    training_key,
    training_rows,
)
from service.data.pipeline import prepare
from service.train.batches import TrainBatches
from service.train.inputs import WorkerInputs

TEST_SUBSET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"
CAPTIONS = BUNDLED_DATA_DIR / "cifar10-test-captions.parquet"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # address="local": always a fresh private instance, never someone's running cluster.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _config(**overrides):
    return load_config(
        overrides={
            "data.train": str(TEST_SUBSET), "data.limit": 128, "augment.backend": "batched",
            "data.augment_device": "cpu", "train.global_batch_size": 32,
            "train.num_workers": 2, **overrides,
        }
    )  # fmt: skip


def test_shared_copy_is_the_rows_a_worker_decodes(ray_local):
    config = _config()
    shared, why = share_training_rows(config)
    assert shared is not None, why
    assert shared.key == training_key(config) and shared.key.rows == 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-writable-array warning escapes
        mapped = load_shared(shared, training_key(config))
    own = decode_rows(str(TEST_SUBSET), training_rows(config), 32)
    assert mapped.images.dtype == torch.uint8 and mapped.labels.dtype == torch.int64
    assert torch.equal(mapped.images, own.images)
    assert torch.equal(mapped.labels, own.labels)
    assert mapped.texts is None and mapped.stats.total == 128


def test_batches_from_the_shared_copy_equal_decoding_in_the_worker(ray_local, tmp_path, capsys):
    config = _config()
    shared, _ = share_training_rows(config)
    for rank in range(2):
        own = TrainBatches(WorkerInputs(config, str(tmp_path), "t"), rank, 2)
        prepared = prepare(config, world=2, shared=shared)
        assert prepared.mode == "shared"
        inputs = WorkerInputs(config, str(tmp_path), "t", data=prepared)
        mapped = TrainBatches(inputs, rank, 2)
        assert mapped.steps_per_epoch == own.steps_per_epoch == 4
        for epoch in (0, 1):  # same rows, same seeded augmentation: identical views and labels
            for (v1, l1), (v2, l2) in zip(own.epoch(epoch), mapped.epoch(epoch), strict=True):
                assert torch.equal(l1, l2)
                assert all(torch.equal(a, b) for a, b in zip(v1, v2, strict=True))
    assert "[data] shared decoded copy from the driver: 128 rows" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides",
    [{"data.limit": 96}, {"train.seed": 7}, {"data.image_size": 24}, {"data.val_fraction": 0.2}],
)
def test_a_copy_of_other_rows_is_refused(ray_local, tmp_path, overrides):
    shared, _ = share_training_rows(_config())
    other = _config(**overrides)
    with pytest.raises(SharedDecodedMismatchError, match="refusing to train on other rows"):
        prepared = prepare(other, world=2, shared=shared)
        TrainBatches(WorkerInputs(other, str(tmp_path), "t", data=prepared), 0, 2)


def test_key_tells_files_rows_and_sizes_apart():
    rows = np.arange(10)
    key = decoded_key("a.parquet", rows, 32)
    assert key == decoded_key("a.parquet", rows.copy(), 32)
    assert key != decoded_key("b.parquet", rows, 32)
    assert key != decoded_key("a.parquet", rows + 1, 32)  # same count, other rows
    assert key != decoded_key("a.parquet", rows, 64)
    assert key != decoded_key("a.parquet", rows, 32, text_column="text")


def test_captions_travel_with_the_shared_copy(ray_local):
    rows = np.arange(20)
    own = decode_rows(str(CAPTIONS), rows, 32, text_column="text")
    key = decoded_key(str(CAPTIONS), rows, 32, "text")
    mapped = load_shared(share_decoded(own, key), key)
    assert mapped.texts == own.texts and torch.equal(mapped.images, own.images)


def test_when_nothing_is_shared():
    for overrides, reason in [
        ({"data.share_decoded": False}, "data.share_decoded=false"),
        ({"augment.backend": "torchvision"}, "augment.backend=batched"),
        ({"data.reader": "ray"}, "torch reader"),
    ]:
        shared, why = share_training_rows(_config(**overrides))  # decided before Ray is needed
        assert shared is None and reason in why, why
