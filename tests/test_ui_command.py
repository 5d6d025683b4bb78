"""`contrastive ui`: a real `mlflow server` child on the resolved store, its page fetched over
HTTP, stopped by Ctrl-C (SIGINT) with nothing left on the port; a busy port and a dead server
URL fail with messages that say what to do."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from service.cli import main
from tests.cluster import REPO, free_port


def test_busy_port_names_the_flag(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            ["ui", "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path}/m.db"]
        )
    err = capsys.readouterr().err
    assert code == 1
    assert f"port {port}" in err and "--port" in err


def test_unreachable_server_url_is_an_error_not_a_link(capsys):
    code = main(["ui", "--backend-store-uri", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "unreachable" in err


def test_missing_store_directory_is_refused(tmp_path, capsys):
    code = main(["ui", "--backend-store-uri", f"sqlite:///{tmp_path}/nowhere/m.db"])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_ui_serves_the_store_and_stops_on_ctrl_c(tmp_path):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path}/mlruns.db"
    experiment_id = MlflowClient(store).create_experiment("ui-test", str(tmp_path / "art"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "ui", "--port", str(port),
         "--backend-store-uri", store],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = _lines(proc.stderr)
    try:
        url = _wait_for_url(lines, proc, timeout_s=300)
        assert url == f"http://127.0.0.1:{port}"
        page = requests.get(url + "/", timeout=30)
        assert page.status_code == 200 and "<title>MLflow</title>" in page.text
        # The same store the command was given: the experiment created above is served.
        found = requests.get(
            url + "/ajax-api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": "ui-test"},
            timeout=30,
        )
        assert found.status_code == 200, found.text
        assert found.json()["experiment"]["experiment_id"] == experiment_id
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert json.loads(out.strip().splitlines()[-1]) == {
        "url": f"http://127.0.0.1:{port}",
        "tracking_uri": store,
        "started": True,
    }
    # The child and its workers are gone: nothing listens on the port any more.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=10)


def test_server_uri_prints_its_url_and_starts_nothing(mlflow_server, capsys):
    code = main(["ui", "--backend-store-uri", mlflow_server.url])
    captured = capsys.readouterr()
    assert code == 0
    assert json.loads(captured.out.strip().splitlines()[-1]) == {
        "url": mlflow_server.url,
        "tracking_uri": mlflow_server.url,
        "started": False,
    }
    assert mlflow_server.url in captured.err


def _lines(stream) -> queue.Queue:
    """The stream's lines on a queue (a reader thread), so waiting for one can time out."""
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_for_url(lines: queue.Queue, proc: subprocess.Popen, timeout_s: float) -> str:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, f"contrastive ui exited early:\n{''.join(seen)}"
            continue
        seen.append(line)
        if "MLflow UI: " in line:
            return line.split("MLflow UI: ", 1)[1].split()[0]
    raise AssertionError(f"no URL within {timeout_s} s:\n{''.join(seen)}")
