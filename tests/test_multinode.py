"""Multi-node on one machine: the session Ray cluster is a head plus a second `ray start
--address` node. A 2-worker STRICT_SPREAD pretraining puts one worker on each node (global
negatives then cross nodes through the gloo all-gather) and must match the same run packed on
one node."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import torch

from service.train.checkpoint import STATE_FILE, load_state
from tests.cluster import RayCluster, last_json_line

pytestmark = pytest.mark.slow

# Identical runs apart from placement: same seed, data, batch (per-worker 64), no kNN/MLflow.
COMMON = [
    "data.limit=512",
    "train.global_batch_size=128",
    "train.num_workers=2",
    "train.epochs=2",
    "train.seed=0",
    "data.val=null",
    "data.val_fraction=0",
    "data.test=null",
    "mlflow.enabled=false",
]
ENTRY = ["python", "jobs/pretrain.py", "--config", "jobs/configs/smoke-cpu.yaml"]
# With 2 ranks every gloo all-reduce is a+b on both placements (IEEE addition commutes), so the
# runs agree bit for bit; drills measured 0.0 difference. The tolerance leaves room for a
# different reduction order (more ranks / another gloo algorithm) without hiding a real bug:
# a wrong negative set or a per-node data shard changes train_loss in the 2nd-3rd digit.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


def _active_nodes(cluster: RayCluster) -> int:
    status = cluster.ray("status", f"--address={cluster.gcs_address}")
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return len(re.findall(r"^\s*\d+ node_[0-9a-f]+", active, flags=re.M))


@pytest.fixture(scope="module")
def placed_runs(ray_cluster, tmp_path_factory) -> dict[str, dict]:
    """The same pretraining packed on one node and strictly spread over two, run concurrently
    (head: 2 + 1 CPUs, second node: 1 CPU) to keep CI time down."""
    assert _active_nodes(ray_cluster) >= 2, "the session Ray cluster must have two nodes"
    storage = tmp_path_factory.mktemp("multinode")
    jobs = {}
    # Storage as a plain path and as a URI (what an object store looks like to Ray Train; the
    # workers of the spread run resolve it through pyarrow.fs like s3://...).
    storage_of = {"PACK": str(storage), "STRICT_SPREAD": storage.as_uri()}
    for strategy in ("PACK", "STRICT_SPREAD"):
        overrides = [
            *COMMON,
            f"train.placement_strategy={strategy}",
            f"train.run_name=place-{strategy.lower()}",
            f"train.storage_path={storage_of[strategy]}",
        ]
        job_id = f"place-{strategy.lower()}-{uuid.uuid4().hex[:8]}"
        ray_cluster.submit([*ENTRY, *[a for o in overrides for a in ("--set", o)]], job_id)
        jobs[strategy] = job_id
    runs = {}
    for strategy, job_id in jobs.items():
        status, logs = ray_cluster.wait(job_id)
        assert status == "SUCCEEDED", f"{strategy} run {status}:\n{logs[-5000:]}"
        summary = last_json_line(logs)
        state = load_state(summary["checkpoint"])
        runs[strategy] = {"logs": logs, "summary": summary, "state": state, "storage": storage}
    return runs


def test_strict_spread_places_one_worker_per_node(placed_runs) -> None:
    spread, pack = placed_runs["STRICT_SPREAD"], placed_runs["PACK"]
    assert [h["num_nodes"] for h in spread["state"]["history"]] == [2, 2]
    assert "[train] 2 worker(s) on 2 Ray node(s)" in spread["logs"]
    node_ids = re.search(r"on 2 Ray node\(s\): \[(.*?)\]", spread["logs"]).group(1)
    assert len(set(re.findall(r"'([0-9a-f]+)'", node_ids))) == 2
    # PACK keeps both workers on one node when they fit (the head has 4 CPUs).
    assert [h["num_nodes"] for h in pack["state"]["history"]] == [1, 1]
    assert spread["summary"]["world_size"] == pack["summary"]["world_size"] == 2


def test_cross_node_run_matches_single_node_run(placed_runs) -> None:
    spread, pack = placed_runs["STRICT_SPREAD"]["state"], placed_runs["PACK"]["state"]
    spread_loss = [h["train_loss"] for h in spread["history"]]
    pack_loss = [h["train_loss"] for h in pack["history"]]
    assert spread_loss == pytest.approx(pack_loss, rel=LOSS_RTOL)
    assert [h["global_step"] for h in spread["history"]] == [4, 8]  # 512 rows / 128 per step
    worst = max(
        (spread["model"][name].float() - tensor.float()).abs().max().item()
        for name, tensor in pack["model"].items()
        if torch.is_floating_point(tensor)
    )
    print(
        f'{{"multinode_max_weight_diff": {worst}, "train_loss_spread": {spread_loss}, '
        f'"train_loss_pack": {pack_loss}}}'
    )
    assert worst <= WEIGHT_ATOL


def test_checkpoints_land_in_storage_path_given_as_path_or_uri(placed_runs) -> None:
    assert placed_runs["STRICT_SPREAD"]["summary"]["storage_path"].startswith("file://")
    for strategy, run in placed_runs.items():
        checkpoint = Path(run["summary"]["checkpoint"])
        assert checkpoint.parent == run["storage"] / f"place-{strategy.lower()}"
        assert (checkpoint / STATE_FILE).is_file()
