"""Image–text evaluation wiring (fast: the validation monitor, the final protocol beside random
init, the run's tokenizer, text mode's pre-flight rules) and, slow, the CPU smoke config trained
through `ray job submit` beating a random-init model on the test split (MLflow metrics)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from service.config import BUNDLED_DATA_DIR, Config, load_config
from service.eval.image_text import (
    ImageTextMonitor,
    evaluate_beside_random_init,
    image_text_metrics,
    load_captioned_images,
)
from service.models import build_training_model
from service.text import Tokenizer, fit_tokenizer

TRAIN = str(BUNDLED_DATA_DIR / "cifar10-train-captions.parquet")
TEST = str(BUNDLED_DATA_DIR / "cifar10-test-captions.parquet")
RECALLS = [f"{d}_recall_at_{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def _config(*overrides: str) -> Config:
    base = [
        f"data.train={TRAIN}", f"data.test={TEST}", "text.column=text", "loss.name=symmetric",
        "text.vocab_size=300", "text.width=32", "text.layers=1", "text.heads=2",
        "text.context_length=16", "model.proj_out_dim=16", "model.proj_hidden_dim=32",
        "mlflow.champion_metric=val_zeroshot_top1", "eval.knn_max_train=120",
    ]  # fmt: skip
    return load_config(overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    config = _config()
    return config, fit_tokenizer(config)


def test_monitor_reads_the_validation_rows_and_reports_every_metric(setup) -> None:
    from service.data.splits import train_val_rows

    config, tokenizer = setup
    monitor = ImageTextMonitor(config, tokenizer)
    data = monitor.data()
    val = train_val_rows(config).val
    assert len(data) == 120  # eval.knn_max_train caps the 500 held-out rows
    table = pq.read_table(TRAIN, columns=["text", "label"])
    # a seeded subset of the held-out rows: every caption is a validation row's caption
    val_captions = {table.column("text")[int(i)].as_py() for i in val}
    assert set(data.captions) <= val_captions
    assert data.class_names[:3] == ["airplane", "automobile", "bird"]
    assert 2 < len(set(data.labels.tolist())) <= 10
    torch.manual_seed(0)
    metrics = monitor(build_training_model(config), "cpu")
    health = {k for k in metrics if k.startswith("health_")}  # tests/test_image_text_health.py
    assert set(metrics) - health == {"val_zeroshot_top1", *(f"val_{r}" for r in RECALLS)}
    assert len(health) == 7
    assert all(0.0 <= metrics[k] <= 1.0 for k in set(metrics) - health)
    # recall grows with k
    assert metrics["val_i2t_recall_at_1"] <= metrics["val_i2t_recall_at_5"]
    assert metrics["val_i2t_recall_at_5"] <= metrics["val_i2t_recall_at_10"]
    assert [monitor.due(e) for e in (0, 1, config.train.epochs)] == [True, True, True]


def test_metrics_are_left_out_when_their_columns_are(setup, tmp_path) -> None:
    config, tokenizer = setup
    table = pq.read_table(TEST).slice(0, 40)
    pq.write_table(table.drop_columns(["text"]), tmp_path / "no_text.parquet")
    pq.write_table(table.drop_columns(["label", "label_name"]), tmp_path / "no_labels.parquet")
    torch.manual_seed(0)
    model = build_training_model(config)
    no_text = load_captioned_images(config, str(tmp_path / "no_text.parquet"))
    assert no_text.captions is None
    assert set(image_text_metrics(model, tokenizer, no_text, config)) == {"zeroshot_top1"}
    no_labels = load_captioned_images(config, str(tmp_path / "no_labels.parquet"))
    assert set(image_text_metrics(model, tokenizer, no_labels, config)) == set(RECALLS)


def test_final_protocol_is_the_same_for_the_model_and_its_random_init(setup) -> None:
    config, tokenizer = setup

    def seeded() -> torch.nn.Module:
        torch.manual_seed(config.train.seed)
        return build_training_model(config)

    # the "trained" model IS the seeded random init: both sides must then agree exactly
    metrics = evaluate_beside_random_init(seeded(), tokenizer, config, seeded, max_rows=100)
    assert set(metrics) == {f"{p}_{m}" for p in ("test", "random")
                            for m in ("zeroshot_top1", *RECALLS)}  # fmt: skip
    for key, value in metrics.items():
        if key.startswith("test_"):
            assert metrics["random_" + key[5:]] == pytest.approx(value)
    assert evaluate_beside_random_init(seeded(), tokenizer, _config("data.test=null"), seeded) == {}


def test_run_tokenizer_is_fitted_once_and_reused(setup, tmp_path) -> None:
    from service.train.driver import run_tokenizer_json

    config, tokenizer = setup
    run_dir = tmp_path / "run"
    first = run_tokenizer_json(config, str(run_dir))
    assert (run_dir / "tokenizer.json").read_text() == first
    assert Tokenizer.from_json(first).encode(["a photo of a cat."], 16).tolist() == (
        tokenizer.encode(["a photo of a cat."], 16).tolist()
    )
    (run_dir / "tokenizer.json").write_text(Tokenizer.fit(["other words"], 300).to_json())
    assert run_tokenizer_json(config, str(run_dir)) != first  # a resumed run keeps its own
    assert run_tokenizer_json(Config(), str(tmp_path / "image-only")) is None


def test_text_mode_preflight_rules() -> None:
    from service.train.preflight import config_problems

    assert config_problems(_config()) == []
    problems = config_problems(
        _config("loss.name=ntxent", "mlflow.champion_metric=knn_top1", "text.heads=3")
    )
    text = "\n".join(problems)
    assert "loss.name='ntxent' cannot train image–text pairs" in text
    assert len(problems) == 3, problems  # each rule from one owner: no duplicates
    assert "champion_metric=knn_top1 is not measured in image–text mode" in text
    assert "text.width (32) must be divisible by text.heads (3)" in text
    image_only = load_config(overrides=["mlflow.champion_metric=val_zeroshot_top1"])
    assert config_problems(image_only) == [
        "mlflow.champion_metric=val_zeroshot_top1 needs image–text mode (set text.column)"
    ]


@pytest.mark.slow
def test_clip_smoke_job_beats_random_init(ray_cluster, mlflow_server, tmp_path) -> None:
    """The shipped CPU smoke config through `ray job submit`: trained vs random init on the test
    split, read back from the run's MLflow metrics."""
    from mlflow.tracking import MlflowClient

    from tests.cluster import last_json_line

    overrides = [
        f"train.storage_path={tmp_path}",
        f"mlflow.tracking_uri={mlflow_server.url}",
        "mlflow.registered_model_name=null",  # registration of both towers: registry's tests
    ]
    sets = [arg for o in overrides for arg in ("--set", o)]
    job_id = f"clip-smoke-{int(time.time())}"
    ray_cluster.submit(
        ["python", "jobs/pretrain.py", "--config", "jobs/configs/clip-smoke-cpu.yaml", *sets],
        job_id,
    )
    status, logs = ray_cluster.wait(job_id)
    assert status == "SUCCEEDED", f"clip smoke job {status}:\n{logs[-6000:]}"
    summary = last_json_line(logs)
    client = MlflowClient(mlflow_server.url)
    metrics = client.get_run(summary["run_id"]).data.metrics
    assert metrics["test_zeroshot_top1"] > metrics["random_zeroshot_top1"] + 0.05
    assert metrics["test_i2t_recall_at_5"] > metrics["random_i2t_recall_at_5"] + 0.05
    assert summary["test_zeroshot_top1"] == pytest.approx(metrics["test_zeroshot_top1"])
    # per epoch on the validation split, from the random-init epoch 0 on
    history = client.get_metric_history(summary["run_id"], "val_zeroshot_top1")
    assert len(history) == 1 + 5
    assert np.isfinite([m.value for m in history]).all()
    assert (tmp_path / "clip-smoke-cpu" / "tokenizer.json").is_file()
