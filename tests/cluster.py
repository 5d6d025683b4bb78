"""Real local Ray clusters for tests: `ray start --head` (+ optional extra nodes), `ray stop`.

Each cluster gets its own short temp dir and free ports, so it never collides with another Ray
on the machine (the default dashboard-agent / client ports are fixed numbers).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TERMINAL_JOB_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


def _port_args() -> list[str]:
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    env: dict[str, str]
    nodes: list[str] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        proc = subprocess.run(
            [_ray_bin(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout + proc.stderr

    def add_node(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        # Its own temp dir: nodes sharing one would share runtime_resources/, and a node that
        # sets up a job's working_dir replaces the directory other nodes' processes run in.
        temp_dir = f"{self.temp_dir}/n{len(self.nodes) + 1}"
        args = [
            "start",
            f"--address={self.gcs_address}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}",
            *_port_args(),
        ]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        self.ray(*args)
        self.nodes.append(temp_dir)

    def submit(self, entrypoint: list[str], submission_id: str, env_vars: dict | None = None):
        runtime_env = {"env_vars": env_vars} if env_vars else None
        args = [
            "job",
            "submit",
            f"--address={self.dashboard_url}",
            "--working-dir",
            str(REPO),
            f"--submission-id={submission_id}",
            "--no-wait",
        ]
        if runtime_env:
            args.append(f"--runtime-env-json={json.dumps(runtime_env)}")
        # Packing and uploading the working dir takes a while on a loaded box: be generous.
        return self.ray(*args, "--", *entrypoint, timeout=300)

    def jobs(self):
        """A ``JobSubmissionClient`` for this cluster's job server (with its auth token)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(
            self.dashboard_url, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        )

    def status(self, submission_id: str) -> str:
        """PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED."""
        return str(self.jobs().get_job_status(submission_id)).split(".")[-1]

    def stop_job(self, submission_id: str) -> None:
        """Ask the job server to stop the job (the SDK call, not the CLI: no interpreter start-up
        between deciding to stop and stopping)."""
        self.jobs().stop_job(submission_id)

    def wait(self, submission_id: str, timeout: float = 1800) -> tuple[str, str]:
        """Poll until the job ends; return (status, logs). A busy dashboard that fails a poll now
        and then is polled again: only the deadline ends the wait."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                status = self.status(submission_id)
                if status in TERMINAL_JOB_STATES:
                    return status, self._logs_with_status(submission_id, status)
            except (ConnectionError, OSError, RuntimeError) as exc:
                print(f"[cluster] polling {submission_id}: {type(exc).__name__}: {exc}")
            time.sleep(2)
        raise TimeoutError(f"job {submission_id} still running after {timeout} s")

    def _logs_with_status(self, submission_id: str, status: str) -> str:
        """The job's logs, ending with its status message (what the job server says about a job
        that failed before or outside its entrypoint, e.g. an empty log), so a failed
        assertion's log tail always says why."""
        logs = self.jobs().get_job_logs(submission_id)
        message = self.jobs().get_job_info(submission_id).message
        return f"{logs}\n[job {submission_id} {status}: {message}]"

    def stop(self) -> None:
        """Kill this cluster's processes only. `ray stop` would kill every Ray process on the
        machine, including other people's clusters and test runs on a shared host."""
        for _ in range(3):  # raylets respawn nothing, but workers may fork while we kill
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def pids(self) -> set[int]:
        """Processes of this cluster: those naming its temp dir or GCS port on their command
        line (GCS, raylets, dashboard, monitors, client server) and all their descendants
        (workers, agents, job drivers)."""
        port = self.gcs_address.rsplit(":", 1)[1]
        own = re.compile(rf"{re.escape(self.temp_dir)}|[\d.]+:{port}\b")
        parent, roots = {}, set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
                )
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            pid = int(entry.name)
            parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
            if own.search(cmdline):
                roots.add(pid)
        found, grew = set(roots), True
        while grew:
            children = {pid for pid, ppid in parent.items() if ppid in found} - found
            found |= children
            grew = bool(children)
        return found


def start_cluster(num_cpus: int = 4, resources: dict[str, float] | None = None) -> RayCluster:
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    port, dash = free_port(), free_port()
    # Ray >= 2.59 turns token auth on for local clusters; give each cluster its own token and
    # hand it to every client (CLI via env, SDK via the Authorization header).
    env = {
        **os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    cluster = RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir, env)
    args = [
        "start",
        "--head",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
        *_port_args(),
    ]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    cluster.ray(*args)
    return cluster


def last_json_line(text: str) -> dict:
    """The JSON summary our commands print as their last stdout line."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise AssertionError(f"no JSON summary line in output:\n{text[-3000:]}")


@dataclass
class SmokeRun:
    """One real `ray job submit` pretraining whose outputs several tests assert on."""

    summary: dict
    logs: str
    storage_path: Path
    tracking_uri: str
    overrides: list[str]


SMOKE_OVERRIDES = [
    "train.epochs=2",
    "train.global_batch_size=128",
    "data.limit=2000",
    "eval.knn_every_epochs=1",
    "train.log_every_steps=5",
]


def run_smoke_job(cluster: RayCluster, tracking_uri: str, storage: Path) -> SmokeRun:
    overrides = [
        *SMOKE_OVERRIDES,
        f"train.storage_path={storage}",
        f"mlflow.tracking_uri={tracking_uri}",
        "mlflow.registered_model_name=smoke-encoder",
    ]
    sets = [arg for o in overrides for arg in ("--set", o)]
    job_id = f"smoke-{int(time.time())}"
    cluster.submit(
        ["python", "jobs/pretrain.py", "--config", "jobs/configs/smoke-cpu.yaml", *sets], job_id
    )
    status, logs = cluster.wait(job_id)
    assert status == "SUCCEEDED", f"smoke job {status}:\n{logs[-6000:]}"
    return SmokeRun(last_json_line(logs), logs, storage, tracking_uri, overrides)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster per test run: `ray start --head` (4 CPUs, dashboard = job
    server) plus a second node (`ray start --address`, 2 CPUs) so that multi-node placement is
    tested for real. PACK runs of up to 4 CPUs stay on the head."""
    cluster = start_cluster(num_cpus=4)
    try:
        cluster.add_node(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def smoke_run(ray_cluster, mlflow_server, tmp_path_factory) -> SmokeRun:
    """The one smoke pretraining (2 workers, `ray job submit`) several tests assert on."""
    return run_smoke_job(ray_cluster, mlflow_server.url, tmp_path_factory.mktemp("smoke"))
