"""End to end on a real local Ray cluster: `ray job submit` pretraining, checkpoints, evaluation,
resume after a job stop, a NaN drill (slow), and bad input that fails before any training (fast:
no cluster is started)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.config import BUNDLED_DATA_DIR
from service.train.checkpoint import load_state
from tests.cluster import REPO, last_json_line

TRAIN = str(BUNDLED_DATA_DIR / "cifar10-train-subset.parquet")
TEST = str(BUNDLED_DATA_DIR / "cifar10-test-subset.parquet")
FAST = ["data.limit=512", "train.global_batch_size=128", "eval.knn_max_train=1000"]


def _contrastive(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.mark.slow
def test_smoke_job_summary_and_checkpoint(smoke_run) -> None:
    summary = smoke_run.summary
    assert summary["world_size"] == 2
    assert summary["global_batch_size"] == 128 and summary["per_worker_batch_size"] == 64
    assert summary["epochs"] == 2
    assert 0.1 < summary["knn_top1"] <= 1.0  # 10 classes: chance is 0.1
    state = load_state(summary["checkpoint"])
    # epoch 0: the random-init kNN (before the first step); then the trained epochs, 1-based
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2]
    assert state["history"][0]["global_step"] == 0 and "train_loss" not in state["history"][0]
    assert 0.0 < state["history"][0]["knn_top1"] <= 1.0
    assert state["history"][-1]["train_loss"] < state["history"][1]["train_loss"]
    assert state["history"][-1]["knn_top1"] == pytest.approx(summary["knn_top1"])
    # step-0 sanity check from the seeds: initial loss ≈ log(2B - 1)
    assert (
        "step 0 loss" in smoke_run.logs and "expected ~log(candidates) = 5.5413" in smoke_run.logs
    )
    # representation health on every monitored epoch (random init included), no collapse
    # warning for a healthy run; the data stall of every trained epoch, on the epoch line too
    health = {
        "health_alignment",
        "health_uniformity",
        "health_effective_rank",
        "health_backbone_effective_rank",
        "health_embedding_std",
        "health_positive_gap",
    }
    wait = {"data_wait_s", "data_wait_fraction", "data_wait_max_s", "data_wait_max_fraction"}
    assert all(health <= set(row) for row in state["history"])
    assert all(wait <= set(row) for row in state["history"][1:])
    assert all(r["data_wait_max_s"] >= r["data_wait_s"] >= 0 for r in state["history"][1:])
    assert "representation collapsed" not in smoke_run.logs
    assert re.search(r"epoch 2/2 done .*; data wait [\d.e+-]+ s \(", smoke_run.logs)
    from mlflow import MlflowClient

    client = MlflowClient(smoke_run.tracking_uri)
    logged = client.get_run(summary["run_id"]).data
    assert (health | {"data_wait_s", "data_wait_fraction"}) <= set(logged.metrics)
    assert "health" not in logged.tags


@pytest.mark.slow
def test_evaluate_checkpoint_beats_random_init(smoke_run) -> None:
    proc = _contrastive(
        "evaluate", "--checkpoint", smoke_run.summary["checkpoint"], "--train", TRAIN,
        "--test", TEST, "--baseline", "random",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json_line(proc.stdout)
    assert result["n_train"] == 5000 and result["n_test"] == 1000
    assert result["knn_top1"] > result["baseline_random"]["knn_top1"]
    assert 0.1 < result["linear_top1"] <= 1.0


def _registered_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints Ray Train has registered for the run, oldest first: those its checkpoint
    manager's snapshot names. A resubmitted job resumes from the newest of these; a checkpoint
    folder can exist on disk for a poll interval (~2 s) before it is registered."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    snapshot = run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    if not snapshot.exists():
        return []
    names = set(re.findall(r"checkpoint_[\w.\-]+", snapshot.read_text(errors="replace")))
    return sorted(run_dir / n for n in names if (run_dir / n / "state.pt").is_file())


@pytest.mark.slow
def test_resume_after_job_stop(ray_cluster, mlflow_server, tmp_path) -> None:
    """Stop a job once its first checkpoint is registered, resubmit the same run with --resume:
    the first job really was interrupted (STOPPED, newest checkpoint before the last epoch), the
    second resumes from exactly that checkpoint in the same MLflow run, and no epoch is lost or
    repeated. Then run identity: the same name without --resume is refused, --resume of the
    finished run does nothing (no new model version), a changed recipe is refused by name."""
    from mlflow import MlflowClient

    from service.train.identity import read_record

    epochs = 8  # an epoch is 4 steps: 7 epochs of margin between the stop and the end of the job
    overrides = [
        *FAST, f"train.epochs={epochs}", "train.run_name=resume-drill",
        f"train.storage_path={tmp_path}", "eval.knn_every_epochs=100",
        f"mlflow.tracking_uri={mlflow_server.url}", "mlflow.experiment=resume-drill",
        "mlflow.registered_model_name=resume-drill-encoder",
        "data.reader=ray",  # this drill also covers the streaming Ray Data reader
    ]  # fmt: skip
    entry = ["python", "jobs/pretrain.py", "--config", "jobs/configs/smoke-cpu.yaml"]
    ray_cluster.submit([*entry, *_sets(overrides)], "resume-a")
    run_dir = tmp_path / "resume-drill"
    deadline, next_status = time.time() + 900, 0.0
    while not _registered_checkpoints(run_dir):  # poll fast: stop soon after the registration
        assert time.time() < deadline, "no checkpoint was registered"
        if time.time() > next_status:
            assert ray_cluster.status("resume-a") in {"PENDING", "RUNNING"}, "resume-a ended"
            next_status = time.time() + 10
        time.sleep(0.2)
    ray_cluster.stop_job("resume-a")
    status, logs_a = ray_cluster.wait("resume-a")
    assert status == "STOPPED", f"resume-a was not interrupted ({status}):\n{logs_a[-4000:]}"
    left = load_state(_registered_checkpoints(run_dir)[-1])["epoch"]
    assert left < epochs - 1, f"resume-a checkpointed its last epoch ({left}) before the stop"

    ray_cluster.submit([*entry, *_sets([*overrides, "train.resume=true"])], "resume-b")
    status, logs = ray_cluster.wait("resume-b")
    assert status == "SUCCEEDED", logs[-4000:]
    done_before = left + 1  # checkpoints keep the 0-based epoch; people see epochs completed
    resumed = re.findall(r"resumed from checkpoint after epoch (\d+)", logs)
    assert set(resumed) == {str(done_before)}, (
        f"not resumed after epoch {done_before}:\n{logs[-4000:]}"
    )
    summary = last_json_line(logs)
    history = load_state(summary["checkpoint"])["history"]
    # epoch 0 (random-init kNN), then every trained epoch once: none lost or repeated
    assert [h["epoch"] for h in history] == list(range(epochs + 1))

    # The same MLflow run, continued (its id kept beside the checkpoints), never a copy.
    run_id = read_record(str(run_dir))["mlflow_run_id"]
    assert summary["run_id"] == run_id
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    logged = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    # Every epoch is in the run, at its global step. The stopped job may have logged one epoch
    # past the checkpoint Ray had registered when it stopped; the resumed job logs it again.
    assert sorted(set(logged)) == [h["global_step"] for h in history[1:]], logged
    assert len(logged) - epochs <= 1, logged
    assert [m.step for m in client.get_metric_history(run_id, "knn_top1")][:1] == [0]
    assert client.get_run(run_id).data.tags["epoch"] == str(epochs)
    assert client.get_metric_history(run_id, "resumed_from_epoch")[0].value == done_before
    versions = client.search_model_versions("name='resume-drill-encoder'")
    assert len(versions) == 1 and versions[0].run_id == run_id

    args = ["pretrain", "--config", "jobs/configs/smoke-cpu.yaml", *_sets(overrides)]
    again = _contrastive(*args, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr[-2000:]
    done = _contrastive(*args, "--resume", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert last_json_line(done.stdout)["status"] == "already_finished"
    assert len(client.search_model_versions("name='resume-drill-encoder'")) == 1
    changed = _contrastive(*args, "--resume", "--set", "loss.temperature=0.9", timeout=300)
    assert changed.returncode == 2 and "loss.temperature" in changed.stderr, changed.stderr


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(ray_cluster, tmp_path) -> None:
    overrides = [
        *FAST, "train.epochs=2", "train.run_name=nan-drill", f"train.storage_path={tmp_path}",
        "mlflow.enabled=false", "eval.knn_every_epochs=100", "fault.nan_at_step=5",
    ]  # fmt: skip
    entry = ["python", "jobs/pretrain.py", "--config", "jobs/configs/smoke-cpu.yaml"]
    ray_cluster.submit([*entry, *_sets(overrides)], "nan-drill")
    status, logs = ray_cluster.wait("nan-drill")
    assert status == "FAILED"
    assert "loss became nan at epoch 2, step 1 (global step 5)" in logs
    kept = list((tmp_path / "nan-drill").glob("checkpoint_*/state.pt"))
    assert len(kept) == 1 and load_state(kept[0])["epoch"] == 0


def test_indivisible_batch_fails_before_ray_starts() -> None:
    proc = _contrastive(
        "pretrain", "--set", "train.num_workers=3", "--set", "train.global_batch_size=128",
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "global_batch_size=128 does not divide by train.num_workers=3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_mlflow_fails_before_training(tmp_path) -> None:
    from tests.cluster import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    proc = _contrastive(
        "pretrain", *_sets([f"mlflow.tracking_uri={uri}", f"train.storage_path={tmp_path}"]),
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2  # nothing was done: the configured URI is the input to fix
    assert uri in proc.stderr and "Traceback" not in proc.stderr
    assert time.time() - started < 60
    assert not any(tmp_path.iterdir()), "nothing may be trained or written"


@pytest.mark.slow
def test_evaluate_json_has_documented_keys(smoke_run) -> None:
    proc = _contrastive(
        "evaluate", "--checkpoint", smoke_run.summary["checkpoint"], "--train", TEST,
        "--test", TEST,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"linear_top1", "knn_top1", "n_train", "n_test"} <= set(result)
    assert Path(result["source"]) == Path(smoke_run.summary["checkpoint"])


@pytest.mark.slow
def test_pretraining_on_webdataset_shards_matches_parquet(smoke_run, ray_cluster, tmp_path):
    """The smoke job again, its training data as WebDataset tar shards (the same rows in the
    same order): same rows selected, decoded once and shared, so the same kNN within noise."""
    import pyarrow.parquet as pq

    from service.data.webdataset import write_shards

    write_shards(pq.read_table(TRAIN), str(tmp_path / "shards"), rows_per_shard=1000)
    overrides = [
        *smoke_run.overrides,
        f"data.train={tmp_path}/shards/shard-{{000000..000004}}.tar",
        "data.test=null",  # shards have no class names: the bundled test split is named or off
        "train.run_name=smoke-shards",
        "mlflow.registered_model_name=smoke-shards-encoder",
    ]
    job_id = f"shards-{int(time.time())}"
    entry = ["python", "jobs/pretrain.py", "--config", "jobs/configs/smoke-cpu.yaml"]
    ray_cluster.submit([*entry, *_sets(overrides)], job_id)
    status, logs = ray_cluster.wait(job_id)
    assert status == "SUCCEEDED", logs[-6000:]
    summary = last_json_line(logs)
    assert "decoded once for all ranks" in logs and "shard-{000000..000004}.tar" in logs
    assert summary["epochs"] == smoke_run.summary["epochs"]
    assert summary["knn_top1"] == pytest.approx(smoke_run.summary["knn_top1"], abs=0.03)
