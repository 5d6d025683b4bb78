"""The champion rule compares only versions measured on the same validation data (issue 27 #1).

A real MLflow registry in a SQLite file (no server). Each test registers versions of its own
model name: a "real" run (the default config: 500 rows held out of the bundled training subset),
and runs whose ``data.val`` is a small Parquet file written here.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from service.config import BUNDLED_DATA_DIR, Config
from service.models import build_model
from service.registry import CHAMPION_ALIAS, LATEST_ALIAS, register_encoder
from service.registry.validation import (
    FINGERPRINT_TAG,
    MIN_VALIDATION_ROWS,
    ROWS_TAG,
    validation_data,
)
from service.tracking.runs import start_pretrain_run

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_PARQUET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"
PROMOTE_HINT = "promote by hand with `contrastive registry promote"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    directory = tmp_path_factory.mktemp("champion-data")
    return f"sqlite:///{directory.resolve() / 'mlruns.db'}", directory


def _val_file(directory: Path, rows: int, offset: int = 0) -> str:
    """``rows`` labelled images of the bundled test subset as a validation file of its own."""
    path = directory / f"val-{rows}-{offset}.parquet"
    pq.write_table(pq.read_table(TEST_PARQUET).slice(offset, rows), path)
    return str(path)


def _config(val: str | None = None) -> Config:
    config = Config()
    config.mlflow.experiment = "test-champion-data"
    if val is not None:
        config.data.val, config.data.val_fraction = val, 0.0
    return config


def _register(store: tuple[str, Path], name: str, config: Config, knn: float) -> dict:
    uri, _ = store
    torch.manual_seed(0)
    backbone = build_model(config.model).backbone.eval()
    run_id = start_pretrain_run(config, uri, run_name=f"champion-{uuid.uuid4().hex[:6]}")
    return register_encoder(
        backbone, config, tracking_uri=uri, run_id=run_id, metric_name="knn_top1",
        metric_value=knn, knn=knn, name=name,
    )  # fmt: skip


def _aliases(store: tuple[str, Path], name: str) -> dict[str, str]:
    model = MlflowClient(store[0]).get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def _tags(store: tuple[str, Path], name: str, version: str) -> dict[str, str]:
    return MlflowClient(store[0]).get_model_version(name, version).tags


def test_a_toy_run_on_four_validation_images_does_not_take_champion(store):
    name = f"enc-{uuid.uuid4().hex[:6]}"
    real = _register(store, name, _config(), 0.4)
    assert real["champion"] is True
    toy = _register(store, name, _config(_val_file(store[1], 4)), 1.0)  # kNN 1.0 on 4 images
    assert toy["champion"] is False
    assert _aliases(store, name) == {CHAMPION_ALIAS: "1", LATEST_ALIAS: "2"}
    assert "validation set too small" in toy["decision"] and "4 rows" in toy["decision"]
    decision = _tags(store, name, "2")["champion_decision"]
    assert decision.startswith("kept-previous") and "too small" in decision
    assert f"contrastive registry promote {name} 2 --alias champion" in decision
    assert _tags(store, name, "2")[ROWS_TAG] == "4"


def test_a_first_version_with_too_few_validation_rows_is_not_champion(store):
    name = f"enc-{uuid.uuid4().hex[:6]}"
    toy = _register(store, name, _config(_val_file(store[1], MIN_VALIDATION_ROWS - 1)), 0.9)
    assert toy["champion"] is False and "too small" in toy["decision"]
    assert _aliases(store, name) == {LATEST_ALIAS: "1"}
    many_classes = validation_data(_config(_val_file(store[1], 120)), "knn_top1")
    assert many_classes.rows == 120 and many_classes.classes == 10
    assert many_classes.too_small() is None


def test_same_validation_data_and_a_better_metric_takes_champion(store):
    name = f"enc-{uuid.uuid4().hex[:6]}"
    first = _register(store, name, _config(), 0.4)
    better = _register(store, name, _config(), 0.5)
    assert first["champion"] is True and better["champion"] is True
    assert better["previous_champion"] == "1" and "beats the champion" in better["decision"]
    assert _aliases(store, name) == {CHAMPION_ALIAS: "2", LATEST_ALIAS: "2"}
    tags = _tags(store, name, "2")
    assert tags[ROWS_TAG] == "500"  # 10 % of the 5,000 bundled training rows, held out
    assert tags[FINGERPRINT_TAG] == _tags(store, name, "1")[FINGERPRINT_TAG]
    assert tags[FINGERPRINT_TAG] == validation_data(_config(), "knn_top1").fingerprint


def test_other_validation_data_is_not_compared(store):
    name = f"enc-{uuid.uuid4().hex[:6]}"
    assert _register(store, name, _config(), 0.4)["champion"] is True
    other = _register(store, name, _config(_val_file(store[1], 200)), 0.9)
    assert other["champion"] is False
    assert other["decision"].startswith("champion measured on other validation data (")
    assert "not compared" in other["decision"] and PROMOTE_HINT in other["decision"]
    assert "500 rows" in other["decision"] and "200 rows" in other["decision"]
    # a different held-out draw of the same file is other validation data too
    reseeded = _config()
    reseeded.train.seed = 1
    assert _register(store, name, reseeded, 0.9)["champion"] is False
    assert _aliases(store, name) == {CHAMPION_ALIAS: "1", LATEST_ALIAS: "3"}


def test_a_champion_without_a_validation_fingerprint_counts_as_other_data(store):
    name = f"enc-{uuid.uuid4().hex[:6]}"
    _register(store, name, _config(), 0.4)
    client = MlflowClient(store[0])
    for key in list(_tags(store, name, "1")):  # as registered before versions recorded it
        if key.startswith("validation."):
            client.delete_model_version_tag(name, "1", key)
    newer = _register(store, name, _config(), 0.9)
    assert newer["champion"] is False and newer["previous_champion"] == "1"
    assert "has no validation fingerprint" in newer["decision"]
    assert "other validation data" in newer["decision"] and PROMOTE_HINT in newer["decision"]
    assert _aliases(store, name) == {CHAMPION_ALIAS: "1", LATEST_ALIAS: "2"}


def test_unknown_validation_data_is_never_champion_automatically():
    """Data that cannot be read at registration (None) is not compared, with or without a
    champion; a large enough set with no champion yet takes it."""
    from service.registry import ValidationData, judge

    unknown = judge("knn_top1", 0.9, None, validation=None)
    assert unknown.champion is False and unknown.by_hand and "unknown" in unknown.reason
    big = ValidationData("ab" * 8, rows=100, classes=10, description="100 rows of v.parquet")
    assert judge("knn_top1", 0.1, None, validation=big).champion is True
    few_per_class = ValidationData("cd" * 8, rows=500, classes=100, description="x")
    assert "100 classes need 10 rows per class" in few_per_class.too_small()
