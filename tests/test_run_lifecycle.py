"""The MLflow run lifecycle: a failure after the run is created ends it FAILED, never RUNNING;
the champion alias compares the metric it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import Config
from service.tracking.run import ending_on_error, mlflow_client, open_run, tracked_run
from service.train.finalize import champion_metric


def _config(tmp_path: Path) -> Config:
    config = Config()
    config.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    config.mlflow.experiment = "lifecycle"
    return config


def test_any_error_after_the_run_is_created_ends_it_failed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    run = open_run(config)  # as the driver does before Ray (check_cluster_fits, build_trainer...)
    with pytest.raises(RuntimeError, match="cluster too small"):
        with ending_on_error(run):
            raise RuntimeError("cluster too small")
    client = mlflow_client(run.uri)
    assert client.get_run(run.run_id).info.status == "FAILED"

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C too
        with tracked_run(config) as interrupted:
            raise KeyboardInterrupt
    assert client.get_run(interrupted.run_id).info.status == "FAILED"

    with tracked_run(config) as ok:
        pass
    assert client.get_run(ok.run_id).info.status == "FINISHED"
    with tracked_run(config, existing=ok):  # a resumed run is reopened, then finished again
        assert client.get_run(ok.run_id).info.status == "RUNNING"
    assert client.get_run(ok.run_id).info.status == "FINISHED"


def test_champion_compares_the_metric_it_names() -> None:
    history = [
        {"epoch": 0, "train_loss": 5.0, "knn_top1": 0.30},
        {"epoch": 1, "train_loss": 4.0},
    ]
    config = Config()
    assert champion_metric(config, history) == ("knn_top1", 0.30)  # latest epoch that has it
    config.mlflow.champion_metric = "train_loss"
    assert champion_metric(config, history) == ("train_loss", 4.0)  # not kNN relabelled
    config.mlflow.champion_metric = "linear_top1"
    with pytest.raises(ValueError, match="never logged"):
        champion_metric(config, history)
