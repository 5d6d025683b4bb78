"""Fault drills on the real session Ray cluster and MLflow server: a training worker SIGKILLed
mid-epoch, an MLflow outage mid-run, and no secret leaking into a run's params or tags.

(The driver/job restart — job stop + resubmit — is covered in test_pretrain_e2e.py.)
Each drill prints one JSON line with what it measured; docs/benchmarks.md "Fault drills".
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from service.train.checkpoint import load_state
from tests.cluster import TERMINAL_JOB_STATES, last_json_line

ENTRY = ["python", "jobs/pretrain.py", "--config", "jobs/configs/smoke-cpu.yaml"]
# 512 rows / global batch 128 → 4 steps per epoch; 3 epochs = global steps 0..11.
SMALL = ["data.limit=512", "train.global_batch_size=128", "train.epochs=3"]
STEPS_PER_EPOCH = 4
# A step in the second epoch: the last checkpoint is the first epoch's (global step 4). Ray
# Train registers a reported checkpoint on its controller's next poll (~2 s); the fault waits
# until the controller's snapshot records it (service.train.faults), so the restart always
# resumes from it (a worker lost before would redo the first epoch and log it twice).
KILL_AT_STEP = 7


def _submit(cluster, overrides: list[str], name: str, env: dict | None = None) -> str:
    job_id = f"{name}-{uuid.uuid4().hex[:8]}"
    cluster.submit([*ENTRY, *[a for o in overrides for a in ("--set", o)]], job_id, env)
    return job_id


def _only_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert len(runs) == 1, f"expected one run in experiment {experiment!r}, got {len(runs)}"
    return runs[0]


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _job_ended(cluster, job_id: str) -> bool:
    return cluster.status(job_id) in TERMINAL_JOB_STATES


def _wait_until(condition, what: str, timeout: float = 600, poll: float = 0.5) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


# ----------------------------------------------------------------------------- worker crash


@pytest.fixture(scope="module")
def crash_drill(ray_cluster, mlflow_server, tmp_path_factory) -> dict:
    """Rank 1 SIGKILLs itself at global step 7 (mid epoch 1); max_failures=1 lets Ray Train
    restart the worker group from the epoch-0 checkpoint."""
    storage = tmp_path_factory.mktemp("crash")
    overrides = [
        *SMALL,
        "train.run_name=crash-drill",
        f"train.storage_path={storage}",
        "train.max_failures=1",
        "fault.kill_rank=1",
        f"fault.at_step={KILL_AT_STEP}",
        "train.log_every_steps=1",
        "data.val=null",  # no kNN: this drill is about recovery
        "data.val_fraction=0",
        "augment.backend=torchvision",
        "data.test=null",
        f"mlflow.tracking_uri={mlflow_server.url}",
        "mlflow.experiment=crash-drill",
        "mlflow.registered_model_name=null",
    ]
    job_id = _submit(ray_cluster, overrides, "crash-drill")
    status, logs = ray_cluster.wait(job_id)
    assert status == "SUCCEEDED", f"crash drill {status}:\n{logs[-6000:]}"
    client = MlflowClient(mlflow_server.url)
    return {
        "logs": logs,
        "summary": last_json_line(logs),
        "client": client,
        "run": _only_run(client, "crash-drill"),
        "marker": storage / "crash-drill" / "faults" / "fault-fired-rank1",
    }


@pytest.mark.slow
def test_worker_crash_resumes_from_last_checkpoint_and_completes(crash_drill) -> None:
    logs, summary = crash_drill["logs"], crash_drill["summary"]
    assert "fault injection: killing rank 1 (pid" in logs and f"at step {KILL_AT_STEP}" in logs
    assert crash_drill["marker"].exists(), "the fault did not fire"
    assert "resumed from checkpoint after epoch 1 (step 4" in logs  # epochs count from 1
    assert summary["epochs"] == 3
    history = load_state(summary["checkpoint"])["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # no validation split: no epoch-0 row
    assert [h["global_step"] for h in history] == [4, 8, 12]  # nothing skipped after the restart


@pytest.mark.slow
def test_worker_crash_is_visible_in_mlflow_without_duplicate_epochs(crash_drill) -> None:
    client, run = crash_drill["client"], crash_drill["run"]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    # Every epoch exactly once, although epoch 1 ran twice (killed, then redone).
    # Epoch values are logged at their global step (epoch e ends at step 4e).
    epoch_steps = [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
    assert _steps(client, run_id, "train_loss") == epoch_steps
    history = load_state(crash_drill["summary"]["checkpoint"])["history"]
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    assert [logged[s] for s in epoch_steps] == pytest.approx([h["train_loss"] for h in history])
    resumed = client.get_metric_history(run_id, "resumed_from_epoch")
    assert [(m.step, m.value) for m in resumed] == [(STEPS_PER_EPOCH, 1.0)]
    # Step metrics: each step once, except the ones the killed attempt ran past its checkpoint
    # (logged by both attempts; MLflow keeps the history as it happened).
    lost = list(range(STEPS_PER_EPOCH + 1, KILL_AT_STEP + 1))
    steps = _steps(client, run_id, "step/loss")
    assert sorted(set(steps)) == list(range(1, 13))
    assert all(steps.count(s) == (2 if s in lost else 1) for s in set(steps))

    killed_at = float(crash_drill["marker"].read_text())
    recovered_at = resumed[0].timestamp / 1000
    print(
        json.dumps(
            {
                "drill": "worker_crash",
                "killed_rank": 1,
                "killed_at_step": KILL_AT_STEP,
                "resumed_at_step": STEPS_PER_EPOCH,
                "steps_lost": KILL_AT_STEP - STEPS_PER_EPOCH,
                "time_to_recover_s": round(recovered_at - killed_at, 1),
            }
        )
    )


# ----------------------------------------------------------------------------- MLflow outage


@pytest.fixture(scope="module")
def outage_drill(ray_cluster, mlflow_server, tmp_path_factory) -> dict:
    """Stop the MLflow server once the first epoch's metrics are visible, start it again after
    the second has been checkpointed (trained while MLflow was down): the workers wait before
    the second epoch until the server is down (``fault.pause_before_epoch``), so the epoch is
    trained during the outage whatever the machine's speed. The job's runtime env also carries
    a secret-looking variable whose value is part of the run name (see the secrets test)."""
    storage = tmp_path_factory.mktemp("outage")
    secret = secrets.token_hex(12)
    run_name = f"outage-drill-{secret}"
    overrides = [
        *SMALL,
        f"train.run_name={run_name}",
        f"train.storage_path={storage}",
        "train.log_every_steps=1",
        "eval.knn_every_epochs=1",  # kNN each epoch: buffered too
        "fault.pause_before_epoch=2",
        "eval.knn_max_train=1000",
        "data.test=null",  # no test-split embedding plot: registration is what matters here
        f"mlflow.tracking_uri={mlflow_server.url}",
        "mlflow.experiment=outage-drill",
        "mlflow.registered_model_name=outage-drill-encoder",
    ]
    job_id = _submit(ray_cluster, overrides, "outage-drill", env={"DB_PASSWORD": secret})
    client = MlflowClient(mlflow_server.url)
    run_dir = storage / run_name

    def epoch0_logged() -> bool:
        exp = client.get_experiment_by_name("outage-drill")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "train_loss"))

    try:
        _wait_until(lambda: epoch0_logged() or _job_ended(ray_cluster, job_id), "epoch 0 in MLflow")
        mlflow_server.stop()
        stopped_at = time.time()
        (run_dir / "faults").mkdir(parents=True, exist_ok=True)
        (run_dir / "faults" / "go").touch()  # now the second epoch trains, MLflow down
        _wait_until(
            lambda: (
                len(list(run_dir.glob("checkpoint_*/state.pt"))) >= 2
                or _job_ended(ray_cluster, job_id)
            ),
            "the epoch-1 checkpoint (trained during the outage)",
        )
    finally:
        mlflow_server.start()
    started_at = time.time()
    status, logs = ray_cluster.wait(job_id)
    assert status == "SUCCEEDED", f"outage drill {status}:\n{logs[-6000:]}"
    return {
        "logs": logs,
        "summary": last_json_line(logs),
        "client": client,
        "run": _only_run(client, "outage-drill"),
        "stopped_at": stopped_at,
        "started_at": started_at,
        "secret": secret,
    }


@pytest.mark.slow
def test_mlflow_outage_buffers_then_flushes_every_epoch_once(outage_drill) -> None:
    client, run, logs = outage_drill["client"], outage_drill["run"], outage_drill["logs"]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    epoch_steps = [STEPS_PER_EPOCH * e for e in (1, 2, 3)]  # epoch values at their global step
    assert _steps(client, run_id, "train_loss") == epoch_steps
    assert _steps(client, run_id, "knn_top1") == [0, *epoch_steps]  # 0: random init
    assert client.get_run(run_id).data.tags["epoch"] == "3"  # a tag, not a chart
    assert _steps(client, run_id, "step/loss") == list(range(1, 13))
    # Metrics keep the time they were produced: some were produced while the server was down.
    during = [
        m.step
        for m in client.get_metric_history(run_id, "train_loss")
        if outage_drill["stopped_at"] < m.timestamp / 1000 < outage_drill["started_at"]
    ]
    assert during, "no epoch finished during the outage; the drill did not exercise buffering"
    assert "unreachable" in logs and "buffering metrics" in logs
    buffered = re.search(r"reachable again after (\d+) s; buffered data sent", logs)
    assert buffered, "rank 0 never reported flushing its buffer"
    # Training went on, and the driver still registered the encoder at the end.
    assert outage_drill["summary"]["version"] and outage_drill["summary"]["model_uri"]
    version = client.get_model_version("outage-drill-encoder", outage_drill["summary"]["version"])
    assert version.run_id == run_id
    print(
        json.dumps(
            {
                "drill": "mlflow_outage",
                "server_down_s": round(outage_drill["started_at"] - outage_drill["stopped_at"], 1),
                "epochs_logged_during_outage": during,
                "metrics_buffered_s": int(buffered.group(1)),
            }
        )
    )


# ----------------------------------------------------------------------------- secrets


@pytest.mark.slow
def test_no_secret_env_value_in_params_tags_or_config(outage_drill) -> None:
    """DB_PASSWORD's value is in the job's env and in train.run_name; MLflow must not see it."""
    client, run, secret = outage_drill["client"], outage_drill["run"], outage_drill["secret"]
    run = client.get_run(run.info.run_id)  # full params/tags
    assert run.data.params["train.run_name"] == "***REDACTED***"
    leaks = {k: v for k, v in {**run.data.params, **run.data.tags}.items() if secret in v}
    assert not leaks, f"secret value logged in {sorted(leaks)}"
    assert secret not in (run.info.run_name or "")
    config_dir = client.download_artifacts(run.info.run_id, "config")
    for path in Path(config_dir).rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path.name
    version = client.get_model_version("outage-drill-encoder", outage_drill["summary"]["version"])
    assert not any(secret in v for v in version.tags.values())


# ----------------------------------------------------------------------------- backfill


@pytest.mark.slow
def test_backfill_logs_only_checkpointed_epochs_missing_from_mlflow(mlflow_server) -> None:
    """A restarted rank 0 re-logs epochs whose metrics died in the old rank 0's buffer."""
    from service.tracking.run import backfill_epochs

    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment(f"backfill-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment).info.run_id
    history = [
        {"epoch": e, "global_step": 4 * e, "train_loss": 6.0 - e, "num_nodes": 1} for e in (1, 2, 3)
    ]
    client.log_metric(run_id, "train_loss", 5.0, step=4)  # epoch 1 reached MLflow
    assert backfill_epochs(client, run_id, history) == [2, 3]
    assert backfill_epochs(client, run_id, history) == []  # idempotent
    logged = client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in logged) == [(4, 5.0), (8, 4.0), (12, 3.0)]
    run = client.get_run(run_id)
    assert run.data.tags["global_step"] == "12" and "global_step" not in run.data.metrics
