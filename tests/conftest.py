"""Shared pytest fixtures. Each block below is owned by one area; keep blocks self-contained.

Plain helper functions (no fixtures) shared by several test modules live in tests/helpers.py.
"""

# ==================== BEGIN mlflow_server fixture (owner: tracking/registry) ====================
# A real `mlflow server` (SQLite backend store, local artifact store served over HTTP) on a free
# localhost port, started once per session in its own process group and torn down at the end.
# `mlflow_server.stop()` / `.start()` restart it on the same port and store (outage tests).
import os as _mlf_os
import signal as _mlf_signal
import socket as _mlf_socket
import subprocess as _mlf_subprocess
import sys as _mlf_sys
import time as _mlf_time
from pathlib import Path as _MlfPath

import pytest as _mlf_pytest


class MlflowTestServer:
    """`mlflow server` subprocess; `url` stays the same across stop()/start()."""

    def __init__(self, root: _MlfPath) -> None:
        self.root = root
        with _mlf_socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.artifacts = root / "artifacts"
        self.log_path = root / "server.log"
        self._proc: _mlf_subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        import requests

        if self._proc is not None:
            return
        env = dict(_mlf_os.environ)
        env.update(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job-runner process: saves CPU
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            _mlf_sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self._proc = _mlf_subprocess.Popen(
                cmd, stdout=log, stderr=_mlf_subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = _mlf_time.monotonic() + timeout_s
        while _mlf_time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self._proc = None
                raise RuntimeError(f"mlflow server exited during startup:\n{tail}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            _mlf_time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s}s; see {self.log_path}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait_s in ((_mlf_signal.SIGTERM, 20), (_mlf_signal.SIGKILL, 10)):
            try:
                _mlf_os.killpg(proc.pid, sig)  # the whole group: mlflow CLI + uvicorn worker
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except _mlf_subprocess.TimeoutExpired:
                continue
        try:  # reap stragglers of the group (uvicorn child) before the port is reused
            _mlf_os.killpg(proc.pid, _mlf_signal.SIGKILL)
        except ProcessLookupError:
            pass


@_mlf_pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A running MLflow tracking + registry server; `.url`, `.stop()`, `.start()`."""
    server = MlflowTestServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ===================== END mlflow_server fixture (owner: tracking/registry) =====================


# ============== BEGIN Ray cluster + smoke pretraining fixtures (owner: train) ==============
from tests.cluster import ray_cluster, smoke_run  # noqa: E402,F401

# =============== END Ray cluster + smoke pretraining fixtures (owner: train) ===============


# ==================== BEGIN shared fixtures and slow marking (owner: tests) ====================
# Fixtures that start a real Ray cluster or MLflow server (or a `ray job submit` on one): a test
# that uses one is slow, whether or not its module remembered the marker. Tests that start one
# themselves (a local `ray.init`, a server subprocess) carry `@pytest.mark.slow` explicitly.
SLOW_FIXTURES = frozenset({"ray_cluster", "smoke_run", "mlflow_server"})

import pytest as _pytest  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(item.fixturenames) and not item.get_closest_marker("slow"):
            item.add_marker(_pytest.mark.slow)


@_pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors (fastest on the shared 2-core CI box), the
    previous count restored afterwards. Use: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ===================== END shared fixtures and slow marking (owner: tests) =====================
