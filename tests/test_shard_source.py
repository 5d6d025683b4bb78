"""WebDataset shards as a data source (service.data.shards) through the one training-data path:
the same rows, batches, checks and features as the same data in Parquet."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from service.config import BUNDLED_DATA_DIR, load_config
from service.data import inspect_source, open_batches, prepare
from service.data.checks import data_problems
from service.data.webdataset import write_shards

TRAIN = BUNDLED_DATA_DIR / "cifar10-train-subset.parquet"
ROWS = 600
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def same_data(tmp_path_factory) -> tuple[str, str]:
    """The first ROWS bundled training rows as one Parquet file and as 3 tar shards."""
    root = tmp_path_factory.mktemp("shards")
    table = pq.read_table(TRAIN).slice(0, ROWS)
    pq.write_table(table, root / "rows.parquet")
    write_shards(table, str(root / "shards"), rows_per_shard=200)
    return str(root / "rows.parquet"), str(root / "shards" / "shard-{000000..000002}.tar")


def _config(train: str, **overrides):
    return load_config(
        overrides={"data.train": train, "data.augment_device": "cpu", "data.limit": 256,
                   "train.global_batch_size": 64, "train.num_workers": 2, **overrides}
    )  # fmt: skip


def test_shards_are_a_registered_source_with_the_parquet_rows(same_data):
    parquet, shards = same_data
    a, b = inspect_source(parquet), inspect_source(shards)
    assert (a.format, b.format) == ("parquet", "webdataset")
    assert b.num_rows == a.num_rows == ROWS and b.has_label
    rows = np.random.default_rng(0).permutation(ROWS)[:50]  # any order, as a split selects
    left, right = a.read(["image", "label"], rows), b.read(["image", "label"], rows)
    assert left.equals(right)


@pytest.mark.parametrize("backend", ["batched", "torchvision"])
def test_shards_train_on_the_same_rows_as_parquet(same_data, backend):
    """Same seed, split and limit: the decoded (or streamed) rows and their labels match."""
    parquet, shards = same_data
    seen = {}
    for name, path in (("parquet", parquet), ("shards", shards)):
        config = _config(path, **{"augment.backend": backend})
        prepared = prepare(config, world=2, share=False)
        labels: Counter = Counter()
        for rank in range(2):
            data = open_batches(prepared, config, rank, 2, CPU)
            assert data.steps_per_epoch == 256 // 64
            for views, batch_labels, captions in data.epoch(0):
                assert len(views) == 2 and views[0].shape == (32, 3, 32, 32) and captions is None
                labels.update(batch_labels.tolist())
        seen[name] = (prepared.mode, prepared.key.rows, labels)
    mode = "decoded" if backend == "batched" else "stream"
    assert seen["parquet"][0] == seen["shards"][0] == mode
    assert seen["parquet"][1] == seen["shards"][1] == 256  # the same selected rows
    if backend == "batched":  # decoded once: exactly the same rows, once each per epoch
        assert seen["parquet"][2] == seen["shards"][2]
    else:  # streamed by shard: as many rows, a rank short of rows goes on into the next order
        assert sum(seen["shards"][2].values()) == sum(seen["parquet"][2].values()) == 256


def test_streamed_shards_keep_only_the_training_rows(same_data):
    from service.data.plan import training_rows
    from service.data.shards import _training_keys
    from service.data.splits import train_val_rows

    _, shards = same_data
    config = _config(shards)
    source = inspect_source(shards)
    keep = _training_keys(source, config, len(training_rows(config)))
    keys = [f"{i:09d}" for i in range(ROWS)]  # write_shards keys: zero-padded row numbers
    kept = {k for k in keys if keep(k)}
    assert kept == {keys[i] for i in training_rows(config)}
    assert not kept & {keys[i] for i in train_val_rows(config).val}  # never a validation row


def test_batched_views_from_shards_equal_parquet(same_data):
    parquet, shards = same_data
    batches = []
    for path in same_data:
        config = _config(path)
        data = open_batches(prepare(config, world=2, share=False), config, 0, 2, CPU)
        batches.append(next(iter(data.epoch(1))))
    (va, la, _), (vb, lb, _) = batches
    assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(va, vb, strict=True))


def test_streamed_shards_split_ranks_and_reshuffle_epochs(same_data):
    _, shards = same_data
    config = _config(shards, **{"augment.backend": "torchvision", "data.limit": None,
                                "data.val_fraction": 0.0})  # fmt: skip
    prepared = prepare(config, world=2, share=False)
    assert prepared.mode == "stream" and prepared.rows == ROWS

    def labels(rank: int, epoch: int) -> list[int]:
        data = open_batches(prepared, config, rank, 2, CPU)
        return [x for _, lab, _ in data.epoch(epoch) for x in lab.tolist()]

    first, second = labels(0, 0), labels(1, 0)
    assert len(first) == len(second) == (ROWS // 64) * 32  # the same step count on both ranks
    assert labels(0, 0) == first and labels(0, 1) != first  # seeded per epoch, reshuffled


def test_preflight_checks_shards(same_data, tmp_path):
    _, shards = same_data
    assert data_problems(_config(shards, **{"data.test": None})) == []
    # Shards carry labels but no class names: nothing says they are CIFAR-10, so the bundled
    # test split (data.test's default) is not used beside them unless named.
    (problem,) = data_problems(_config(shards))
    assert "bundled CIFAR-10 test subset" in problem and "no class names" in problem
    missing = _config(str(tmp_path / "none-{000000..000003}.tar"))
    assert any("matches no file" in p for p in data_problems(missing))
    text = _config(shards, **{"text.column": "txt", "loss.name": "symmetric"})
    assert any("caption key '.txt' missing" in p for p in data_problems(text))


def test_features_of_shards_equal_parquet(same_data):
    from service.data.augment import eval_transform
    from service.eval.features import extract_features
    from service.models import build_model

    torch.manual_seed(0)
    encoder = build_model(load_config().model).backbone
    transform = eval_transform(32, [0.5] * 3, [0.25] * 3)
    rows = np.arange(0, ROWS, 7)
    a = extract_features(encoder, same_data[0], transform, indices=rows, device="cpu")
    b = extract_features(encoder, same_data[1], transform, indices=rows, device="cpu")
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0])


def test_data_pack_writes_shards_from_parquet(same_data, tmp_path, capsys):
    from service.cli import main

    code = main(["data", "pack", same_data[0], str(tmp_path / "out"), "--format", "webdataset",
                 "--shard-rows", "250"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code in (0, None) and summary["shards"] == 3 and summary["rows"] == ROWS
    assert inspect_source(summary["pattern"]).num_rows == ROWS
    assert sorted(p.name for p in Path(tmp_path / "out").iterdir())[0] == "shard-000000.tar"


@pytest.mark.slow
def test_ray_reader_streams_shards(same_data):
    import ray

    from service.data.ray_dataset import build_ray_train_dataset, iter_image_batches

    _, shards = same_data
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = _config(shards, **{"data.reader": "ray", "data.limit": None,
                                    "data.val_fraction": 0.0})  # fmt: skip
        shard = build_ray_train_dataset(config).streaming_split(1)[0]
        labels = [x for _, lab in iter_image_batches(shard, 50, drop_last=False) for x in lab]
        expected = pq.read_table(TRAIN).slice(0, ROWS).column("label").to_pylist()
        assert Counter(int(x) for x in labels) == Counter(expected)
    finally:
        ray.shutdown()
