"""MLflow tracking against a real `mlflow server` (tests/conftest.py::mlflow_server)."""

from __future__ import annotations

import socket
from importlib import metadata

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from service.config import Config, MlflowConfig
from service.tracking.logger import MetricLogger, MetricValueError
from service.tracking.plots import plot_embeddings, plot_training_curves, project_2d
from service.tracking.runs import (
    CONFIG_ARTIFACT,
    REDACTED,
    end_run,
    redact_secrets,
    redact_tree,
    start_pretrain_run,
    stringify_params,
)
from service.tracking.uri import (
    TrackingUnavailableError,
    check_tracking_server,
    default_artifact_location,
    resolve_tracking_uri,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _closed_port_uri() -> str:
    """An http URI on a localhost port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _small_config(**overrides) -> Config:
    config = Config()
    config.mlflow.experiment = "test-tracking"
    config.train.num_workers = 4
    config.train.global_batch_size = 256
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        setattr(getattr(config, section), key, value)
    return config


# ----------------------------------------------------------------------------- URI resolution


def test_resolve_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri(MlflowConfig(tracking_uri="http://cfg:1")) == "http://cfg:1"
    assert resolve_tracking_uri(MlflowConfig()) == "http://from-env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    local = resolve_tracking_uri(MlflowConfig())
    assert local == f"sqlite:///{tmp_path.resolve() / 'mlruns.db'}"
    assert default_artifact_location(local) == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert default_artifact_location("http://cfg:1") is None


def test_unreachable_server_raises_actionable_error():
    uri = _closed_port_uri()
    with pytest.raises(TrackingUnavailableError) as info:
        check_tracking_server(uri, timeout_s=2)
    message = str(info.value)
    assert uri in message and "start-server.sh" in message and "MLFLOW_TRACKING_URI" in message
    assert isinstance(info.value, ValueError)


def test_credentials_are_not_echoed_in_errors():
    uri = _closed_port_uri().replace("http://", "http://alice:hunter22@")
    with pytest.raises(TrackingUnavailableError) as info:
        check_tracking_server(uri, timeout_s=2)
    assert "hunter22" not in str(info.value)


@pytest.mark.slow
def test_reachable_server_passes(mlflow_server):
    check_tracking_server(mlflow_server.url)


# ----------------------------------------------------------------------------- secrets


def test_redact_secrets_masks_values_of_secret_env_vars():
    environ = {
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG",
        "HF_TOKEN": "hf_abcdef123456",
        "DB_PASSWORD": "pw12",
        "MLFLOW_TRACKING_PASSWORD": "true",  # too common to be treated as a secret
        "HOME": "/root",  # not a secret name: its value stays visible
    }
    params = {
        "a.secret": "wJalrXUtnFEMI/K7MDENG",
        "b.embedded": "s3://bucket?token=hf_abcdef123456",
        "c.short": "pw12",
        "d.number": 3,
        "e.flag": "true",
        "f.home": "/root",
        "g.url": "https://bob:pa55word@mlflow.example.com",
        "h.none": None,
    }
    out = redact_secrets(params, environ=environ)
    assert out["a.secret"] == REDACTED
    assert out["b.embedded"] == REDACTED
    assert out["c.short"] == REDACTED
    assert out["d.number"] == 3 and out["e.flag"] == "true" and out["f.home"] == "/root"
    assert out["g.url"] == "https://mlflow.example.com"
    assert out["h.none"] is None
    tree = redact_tree({"x": {"y": ["hf_abcdef123456", "ok"]}}, environ=environ)
    assert tree == {"x": {"y": [REDACTED, "ok"]}}


def test_stringify_params_json_and_truncation():
    out = stringify_params({"l": [1, 2], "d": {"b": 1, "a": 2}, "n": None, "long": "x" * 7000})
    assert out["l"] == "[1, 2]" and out["d"] == '{"a": 2, "b": 1}' and out["n"] == "None"
    assert len(out["long"]) == 6000 and out["long"].endswith(f"{CONFIG_ARTIFACT}]")


# ----------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_start_pretrain_run_logs_config_tags_and_artifact(mlflow_server, monkeypatch):
    secret = "s3cr3t-bucket-name-xyz"
    monkeypatch.setenv("CONTRASTIVE_TEST_API_TOKEN", secret)
    config = _small_config(train__storage_path=f"s3://{secret}/ray")
    run_id = start_pretrain_run(config, mlflow_server.url, run_name="unit-run")
    child_id = start_pretrain_run(config, mlflow_server.url, parent_run_id=run_id)
    end_run(child_id, "FAILED", tracking_uri=mlflow_server.url)
    end_run(run_id, "finished", tracking_uri=mlflow_server.url)

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit-run"
    assert client.get_experiment(run.info.experiment_id).name == "test-tracking"
    expected = stringify_params(config.flat())
    expected["train.storage_path"] = REDACTED
    assert run.data.params == expected
    tags = run.data.tags
    assert tags["world_size"] == "4" and tags["global_batch_size"] == "256"
    assert tags["per_worker_batch_size"] == "64" and tags["method"] == "ntxent"
    assert tags["version.torch"] == metadata.version("torch")
    assert tags["version.ray"] == metadata.version("ray")
    assert tags["version.mlflow"] == metadata.version("mlflow")
    if "mlflow.source.git.commit" in tags:
        assert len(tags["mlflow.source.git.commit"]) == 40

    artifact = client.download_artifacts(run_id, CONFIG_ARTIFACT)
    text = open(artifact).read()
    assert secret not in text
    logged = yaml.safe_load(text)
    reference = config.to_dict()
    reference["train"]["storage_path"] = REDACTED
    assert logged == reference

    child = client.get_run(child_id)
    assert child.info.status == "FAILED"
    assert child.data.tags["mlflow.parentRunId"] == run_id


@pytest.mark.slow
def test_end_run_rejects_unknown_status(mlflow_server):
    with pytest.raises(ValueError, match="DONE"):
        end_run("whatever", "done", tracking_uri=mlflow_server.url)


# ----------------------------------------------------------------------------- MetricLogger


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_metric_logger_survives_server_outage(mlflow_server):
    """Log, kill the server, keep logging (no exception), restart it on the same port and store,
    flush: every (metric, step) is stored exactly once."""
    run_id = start_pretrain_run(_small_config(), mlflow_server.url, run_name="outage")
    client = MlflowClient(mlflow_server.url)
    logger = MetricLogger(mlflow_server.url, run_id, request_timeout_s=2, retry_interval_s=0.2)

    def values(step: int) -> dict[str, float]:
        return {"loss": 10.0 - 0.1 * step, "lr": 1e-3 * (step + 1)}

    for step in range(5):
        logger.log_metrics(values(step), step=step)
    assert logger.pending_metrics == 0
    assert [s for s, _ in _history(client, run_id, "loss")] == list(range(5))

    mlflow_server.stop()
    try:
        for step in range(5, 15):
            logger.log_metrics(values(step), step=step)
        logger.log_metrics({"knn_top1": 0.25}, step=14)
        logger.log_text("outage report", "eval/outage.txt")
        assert logger.pending_metrics == 21  # 10 steps x 2 + knn, all buffered
    finally:
        mlflow_server.start()

    report = logger.flush(timeout_s=60)
    assert report.ok, report
    assert report.logged_metrics == 31 and report.unlogged_metrics == 0
    for key in ("loss", "lr"):
        assert _history(client, run_id, key) == [(s, values(s)[key]) for s in range(15)]
    assert _history(client, run_id, "knn_top1") == [(14, 0.25)]
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/outage.txt"]


def test_flush_reports_what_could_not_be_logged():
    logger = MetricLogger(_closed_port_uri(), "no-such-run", request_timeout_s=1, max_buffer=4)
    logger.log_metrics({"a": 1.0, "b": 2.0}, step=0)
    logger.log_metrics({"a": 1.5, "b": 2.5, "c": 3.0}, step=1)  # 5 values > max_buffer=4
    report = logger.flush(timeout_s=1)
    assert not report.ok
    assert report.unlogged_metrics == 4 and report.dropped_metrics == 1
    assert report.logged_metrics == 0 and report.errors


def test_metric_logger_rejects_invalid_names_and_values():
    logger = MetricLogger(_closed_port_uri(), "no-such-run", request_timeout_s=1)
    with pytest.raises(MetricValueError, match="bad\\*name"):
        logger.log_metrics({"bad*name": 1.0}, step=0)
    with pytest.raises(MetricValueError, match="'loss'"):
        logger.log_metrics({"loss": "high"}, step=0)
    assert logger.pending_metrics == 0


# ----------------------------------------------------------------------------- plots


def _png_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


PER_STEP_HISTORY = [
    {"step": 10 * i, "epoch": i // 4, "loss": 6 - 0.2 * i, "lr": 1e-3} for i in range(12)
] + [{"epoch": e, "knn_top1": 0.1 + 0.1 * e} for e in range(3)]
# the per-epoch rows service.train.loop records
PER_EPOCH_HISTORY = [
    {"epoch": e, "global_step": 40 * (e + 1), "train_loss": 6 - e / 2, "lr": 1e-3 / (e + 1)}
    | ({"knn_top1": 0.1 + 0.05 * e} if e % 2 else {})
    for e in range(8)
]


@pytest.mark.parametrize("history", [PER_STEP_HISTORY, PER_EPOCH_HISTORY])
def test_plot_training_curves_writes_png(tmp_path, history):
    out = plot_training_curves(history, tmp_path / "plots" / "curves.png")
    pixels = _png_pixels(out)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600
    assert pixels.std() > 10  # something was drawn, not a blank canvas
    assert plot_training_curves([], tmp_path / "empty.png").exists()  # no data: still a PNG


def test_project_2d_pca_separates_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    features = rng.normal(size=(100, 16)) * 0.05 + np.where(labels[:, None] == 0, 1.0, -1.0)
    xy = project_2d(features, "pca")
    side_0, side_1 = set(np.sign(xy[labels == 0, 0])), set(np.sign(xy[labels == 1, 0]))
    assert len(side_0) == 1 and len(side_1) == 1 and side_0 != side_1


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_plot_embeddings_writes_png(tmp_path, method):
    if method == "tsne":
        pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=60)
    features = rng.normal(size=(60, 8)) + np.eye(8)[labels] * 4
    out = plot_embeddings(
        features, labels, tmp_path / f"{method}.png", ["cat", "dog", "car"], method=method
    )
    assert _png_pixels(out).std() > 10
    with pytest.raises(ValueError, match="rows"):
        plot_embeddings(features, labels[:10], tmp_path / "bad.png")


# ----------------------------------------------------------------------------- package exports


def test_packages_export_their_public_names_and_stay_light():
    """`from service.tracking import TrackedRun` etc.; importing the library packages pulls in
    neither Ray nor MLflow (commands stay fast, workers import what they use)."""

    from tests.helpers import heavy_modules_after

    code = (
        "from service.registry import load_encoder, pull, promote, register_encoder\n"
        "from service.eval import evaluate_encoder, extract_features, knn_top1\n"
        "from service.data import ParquetImageDataset, read_image_table\n"
        "from service.tracking import (TrackedRun, open_run, tracked_run, ending_on_error,\n"
        "    backfill_epochs, log_epoch, mlflow_client, MetricLogger, resolve_tracking_uri,\n"
        "    check_tracking_server, plot_training_curves, plot_embeddings, start_pretrain_run)\n"
        "import service.tracking, service.registry, service.eval\n"
        "for m in (service.tracking, service.registry, service.eval):\n"
        "    assert all(hasattr(m, n) for n in m.__all__), m\n"
    )
    assert heavy_modules_after(code, ("ray", "mlflow")) == []
