"""``contrastive check`` on the session's 2-node Ray cluster, as a user runs it (`ray job submit`).

Two checks run concurrently: the smoke config spread over both nodes (one worker each, global
BN, the real MLflow server) must pass — W workers x b equal one process x W*b —, and the same
check with the drill ``gather_without_grad`` (an all-gather that cuts the graph: the forward and
the loss stay right, the gradients do not) must fail with exit 1 and say where.
"""

from __future__ import annotations

import uuid

import pytest

from tests.cluster import last_json_line

pytestmark = pytest.mark.slow

ENTRY = ["python", "jobs/check.py", "--config", "jobs/configs/smoke-cpu.yaml",
         "--steps", "2", "--timed-steps", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def checks(ray_cluster, mlflow_server, tmp_path_factory) -> dict[str, tuple[str, str]]:
    storage = tmp_path_factory.mktemp("check")
    common = [f"train.storage_path={storage}", f"mlflow.tracking_uri={mlflow_server.url}"]
    cases = {
        "spread": ["train.placement_strategy=STRICT_SPREAD"],
        "drill": ["train.placement_strategy=PACK"],
    }
    jobs = {}
    for name, overrides in cases.items():
        sets = [a for o in [*common, *overrides] for a in ("--set", o)]
        drill = ["--drill", "gather_without_grad"] if name == "drill" else []
        job_id = f"check-{name}-{uuid.uuid4().hex[:8]}"
        ray_cluster.submit([*ENTRY, *sets, *drill], job_id)
        jobs[name] = job_id
    results = {name: ray_cluster.wait(job_id) for name, job_id in jobs.items()}
    results["storage"] = (str(storage), "")
    return results


def test_check_passes_across_two_nodes(checks, mlflow_server) -> None:
    status, logs = checks["spread"]
    assert status == "SUCCEEDED", logs[-5000:]
    summary = last_json_line(logs)
    assert summary["status"] == "pass" and summary["nodes"] == 2 and summary["workers"] == 2
    e = summary["equality"]
    assert e["equal"] and e["grad_rel_error"] < 1e-3 and e["loss_rel_error"] < 1e-5
    assert summary["global_bn"] and e["bn_rel_error"] < 1e-3
    c = summary["communication"]
    assert c["all_gather_ms"] > 0 and c["all_reduce_bytes"] > 0 and c["step_ms"] > 0
    assert [d["rank"] for d in summary["data_wait"]] == [0, 1]
    assert all(0 <= d["data_wait_share"] < 1 for d in summary["data_wait"])
    assert summary["mlflow"]["uri"] == mlflow_server.url
    assert summary["mlflow"]["driver"]["ok"] and summary["mlflow"]["rank0"]["ok"]
    # the table, for people, before the JSON line
    assert "contrastive check: 2 workers on 2 Ray node(s) (gloo, CPU)" in logs
    assert "PASS" in logs and "gradients" in logs and "data wait" in logs


def test_check_catches_a_gather_without_gradient(checks) -> None:
    status, logs = checks["drill"]
    assert status == "FAILED", logs[-5000:]  # exit 1
    summary = last_json_line(logs)  # the findings are printed before the exit
    assert summary["status"] == "fail" and summary["drill"] == "gather_without_grad"
    e = summary["equality"]
    assert not e["equal"] and e["grad_rel_error"] > 1e-2  # measured ~0.1
    # the first step's forward is right: only its gradient is cut (the next steps start from
    # weights that the wrong gradient moved)
    assert e["loss_rel_error_per_step"][0] < 1e-5
    assert "DIFFERENT" in logs and "FAIL" in logs
    assert "workers differ from one process" in logs


def test_check_leaves_no_scratch_folder(checks) -> None:
    storage, _ = checks["storage"]
    from pathlib import Path

    assert [p.name for p in Path(storage).iterdir()] == []
