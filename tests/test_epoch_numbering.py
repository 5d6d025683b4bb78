"""Epochs people see count from 1; epoch 0 is the random-init monitor row; per-step metrics are
``step/*``; ``epoch``/``global_step`` are run tags, not charts (docs: contracts in architecture).

MLflow is a real SQLite store in a temporary folder (no server needed for these calls).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from service.config import Config, load_config
from service.tracking.logger import MetricLogger
from service.tracking.run import backfill_epochs, log_epoch
from service.train import KnnMonitor, build_monitor, build_state
from service.train.epoch import EpochMeter, StepProgress, epoch_summary, monitor_due

SMOKE = "jobs/configs/smoke-cpu.yaml"


@pytest.fixture
def store(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("epochs")).info.run_id
    return client, uri, run_id


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_epoch_metrics_count_completed_epochs_from_one() -> None:
    s = build_state(Config(), torch.device("cpu"), steps_per_epoch=4, gather_distributed=False)
    meter = EpochMeter()
    meter.update(5.0, 128)
    s.epoch, s.global_step = 0, 4  # internal: the first epoch (0-based) has just ended
    assert meter.epoch_metrics(s)["epoch"] == 1
    assert epoch_summary({**meter.epoch_metrics(s), "knn_top1": 0.41234}, 4).startswith(
        "epoch 1/4 done (step 4): train_loss 5, "
    )


def test_epochs_land_at_global_steps_with_tags_not_charts(store) -> None:
    client, uri, run_id = store
    rows = [
        {"epoch": 0, "global_step": 0, "knn_top1": 0.30},  # random init
        {"epoch": 1, "global_step": 4, "train_loss": 5.0, "knn_top1": 0.35, "num_nodes": 1},
        {"epoch": 2, "global_step": 8, "train_loss": 4.0, "knn_top1": 0.40, "num_nodes": 1},
    ]
    with MetricLogger(uri, run_id) as logger:
        for row in rows:
            log_epoch(logger, row)
        logger.log_metrics({"step/loss": 4.5, "step/lr": 1e-3}, step=6)
    assert _steps(client, run_id, "knn_top1") == [0, 4, 8]
    assert _steps(client, run_id, "train_loss") == [4, 8]
    assert _steps(client, run_id, "step/loss") == [6]
    run = client.get_run(run_id)
    assert not {"epoch", "global_step", "num_nodes"} & set(run.data.metrics)
    assert (run.data.tags["epoch"], run.data.tags["global_step"]) == ("2", "8")


def test_backfill_fills_missing_epochs_including_the_random_init_row(store) -> None:
    client, _, run_id = store
    history = [
        {"epoch": 0, "global_step": 0, "knn_top1": 0.30},
        {"epoch": 1, "global_step": 4, "train_loss": 5.0, "knn_top1": 0.35, "num_nodes": 1},
        {"epoch": 2, "global_step": 8, "train_loss": 4.0, "knn_top1": 0.40, "num_nodes": 1},
    ]
    client.log_metric(run_id, "train_loss", 5.0, step=4)  # epoch 1 reached MLflow
    client.log_metric(run_id, "knn_top1", 0.35, step=4)
    assert backfill_epochs(client, run_id, history) == [0, 2]
    assert backfill_epochs(client, run_id, history) == []  # idempotent
    logged = client.get_metric_history(run_id, "knn_top1")
    assert sorted((m.step, m.value) for m in logged) == [(0, 0.30), (4, 0.35), (8, 0.40)]
    run = client.get_run(run_id)
    assert "epoch" not in run.data.metrics and run.data.tags["epoch"] == "2"


def test_progress_line_at_most_every_interval() -> None:
    ticks = iter([0.0, 3.0, 6.0, 11.0, 12.0])
    p = StepProgress(epochs=1000, steps_per_epoch=50, budgeted=True, clock=lambda: next(ticks))
    p.start_epoch(2)
    lines = [p.update(step, 5.0 + step, 100, budget_left_s=125.0) for step in (1, 2, 3, 4)]
    assert lines[:2] == [None, None] and lines[3] is None
    assert lines[2] == "epoch 3 step 3/50 loss 7.00 27 img/s ETA epoch 2:52 run 2:05"


def test_monitor_is_due_every_n_epochs_and_at_the_last() -> None:
    config = load_config(SMOKE, ["train.epochs=5", "eval.knn_every_epochs=2"])
    assert [e for e in range(1, 6) if monitor_due(config, e)] == [2, 4, 5]


def test_build_monitor_none_without_validation_split() -> None:
    assert build_monitor(load_config(SMOKE, ["data.val=null", "data.val_fraction=0"])) is None
    config = load_config(SMOKE, ["data.limit=256", "eval.knn_max_train=64"])
    monitor = build_monitor(config)
    assert isinstance(monitor, KnnMonitor)
    torch.manual_seed(0)
    model = build_state(config, torch.device("cpu"), 4, gather_distributed=False).model
    metrics = monitor(model, torch.device("cpu"))  # the unwrapped training model
    health = {"alignment", "uniformity", "effective_rank", "backbone_effective_rank",
              "embedding_std", "positive_gap"}  # fmt: skip
    assert set(metrics) == {"knn_top1"} | {f"health_{k}" for k in health}
    assert 0.0 <= metrics["knn_top1"] <= 1.0
