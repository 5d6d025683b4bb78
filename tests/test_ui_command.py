"""`contrastive ui`: a real `mlflow server` child on the resolved store, its page fetched over
HTTP, stopped by SIGTERM with nothing left on the port or in the process table; a busy port and
a dead server URL fail with messages that say what to do."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    assert code == 2  # the URI the user gave: bad input
    assert "unreachable" in err


def test_missing_store_directory_is_refused(tmp_path, capsys):
    code = main(["ui", "--backend-store-uri", f"sqlite:///{tmp_path}/nowhere/m.db"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_ready_line_says_how_to_stop_it_when_ctrl_c_cannot():
    from service.commands.ui import _how_to_stop

    # Both cases set here: pytest itself may run as a script's background job (SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert _how_to_stop() == "Ctrl-C to stop"
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a script's background job
        assert _how_to_stop() == f"Ctrl-C cannot reach it; stop it with: kill {os.getpid()}"
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_ui_serves_the_store_and_stops_on_sigterm(tmp_path):
    """Started as a script's background job starts it (SIGINT ignored, inherited whatever way
    pytest itself was launched): it says how to stop it, SIGTERM stops it and its server, and
    every process it started is gone afterwards even when an assertion fails."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path}/mlruns.db"
    experiment_id = MlflowClient(store).create_experiment("ui-test", str(tmp_path / "art"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "ui", "--port", str(port),
         "--backend-store-uri", store],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own group, to clean up by PID
        preexec_fn=_ignore_sigint,  # as `contrastive ui &` in a script
    )  # fmt: skip
    children: list[int] = []
    try:
        lines = _lines(proc.stderr)
        ready = _wait_for(lines, proc, "MLflow UI: ", timeout_s=300)
        children = _children(proc.pid)  # the mlflow server (a session of its own)
        url = ready.split("MLflow UI: ", 1)[1].split()[0]
        assert url == f"http://127.0.0.1:{port}"
        assert f"kill {proc.pid}" in ready, ready  # Ctrl-C cannot reach it: says what can
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert json.loads(out.strip().splitlines()[-1]) == {
            "url": f"http://127.0.0.1:{port}",
            "tracking_uri": store,
            "started": True,
        }
        # The child and its workers are gone: nothing listens on the port any more.
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert children and not [pid for pid in children if _alive(pid)]
    finally:
        for group in [proc.pid, *children]:  # each is its process group's leader
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(timeout=30)


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


def _wait_for(lines: queue.Queue, proc: subprocess.Popen, text: str, timeout_s: float) -> str:
    """The first line holding ``text``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, f"contrastive ui exited early:\n{''.join(seen)}"
            continue
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"no {text!r} within {timeout_s} s:\n{''.join(seen)}")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
