"""``contrastive ui``: the MLflow UI on the store the other commands write to.

The store is resolved like every other command's (:func:`service.tracking.uri.resolve_tracking_uri`:
``--backend-store-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlruns.db``). A
tracking *server* (an http(s) URI) already has a UI: its URL is printed and nothing is started.
Otherwise an ``mlflow server`` child process is started on 127.0.0.1 (it has no authentication,
so it is never bound to other interfaces here), the command waits until it answers, prints the
URL and stays in the foreground; Ctrl-C (SIGINT) or SIGTERM stops that child and nothing else.
Started from a script in the background, a process inherits SIGINT *ignored* (what a
non-interactive shell does for ``cmd &``, and Python then keeps it so): Ctrl-C cannot reach it,
so the ready line says to stop it with ``kill <pid>`` (SIGTERM) instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from service.commands import args
from service.console import say

HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def add_parser(subparsers: args.Subparsers) -> None:
    """Register ``contrastive ui`` and its arguments."""
    p = subparsers.add_parser("ui", help="the MLflow UI on this store (127.0.0.1) until Ctrl-C")
    p.add_argument(
        "--backend-store-uri",
        default=None,
        help="tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db); an "
        "http(s) server's URL is printed, nothing started",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="local port (default 5000)")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed command line → :func:`ui_command`."""
    return args.call(ui_command, a)


class UiError(RuntimeError):
    """The UI could not be started (port in use, server exited or never answered)."""


def ui_command(
    backend_store_uri: str | None = None,
    *,
    port: int = DEFAULT_PORT,
    start_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Serve the MLflow UI for the resolved store until Ctrl-C; returns ``{"url", "tracking_uri",
    "started"}`` (``started`` is False when the store is already a server)."""
    # Here, not at module level: importing service.tracking pulls numpy into `contrastive --help`.
    from service.tracking.uri import (
        check_tracking_server,
        is_http_uri,
        redact_uri,
        resolve_tracking_uri,
    )

    uri = resolve_tracking_uri(explicit=backend_store_uri)
    if is_http_uri(uri):
        check_tracking_server(uri)  # a dead URL is an error, not a link to print
        url = redact_uri(uri).rstrip("/")
        say("ui", f"the tracking store is a server; its UI is at {url}")
        return {"url": url, "tracking_uri": url, "started": False}
    check_tracking_server(uri)  # local store: its directory must exist
    if not 1 <= port <= 65535:
        raise UiError(f"--port {port} is not a port number (1-65535)")
    _require_free_port(port)
    url = f"http://{HOST}:{port}"
    with _UiServer(uri, port) as server:
        try:
            say("ui", f"starting the MLflow UI for {uri}")
            server.wait_until_ready(url, start_timeout_s)
            say("ui", f"MLflow UI: {url}  ({_how_to_stop()})")
            server.wait()
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM, also during start-up: a normal stop
            say("ui", "stopping the MLflow UI")
    return {"url": url, "tracking_uri": uri, "started": True}


def _require_free_port(port: int) -> None:
    with socket.socket() as sock:
        # As the server binds (uvicorn sets it): connections of a UI stopped seconds ago
        # (TIME_WAIT) do not count as busy, a listening socket does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise UiError(
                f"port {port} on {HOST} is already in use ({exc.strerror}); choose another with "
                f"--port, e.g. contrastive ui --port {port + 1}"
            ) from exc


class _UiServer:
    """The ``mlflow server`` child: its own process group, so stopping it reaches its uvicorn
    workers too, and a Ctrl-C in the terminal reaches only us (we then stop it)."""

    def __init__(self, uri: str, port: int) -> None:
        self.uri, self.port = uri, port
        self.log = Path(tempfile.mkstemp(prefix="contrastive-ui-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self._previous_sigterm: Any = None

    def _command(self) -> list[str]:
        from service.tracking.uri import default_artifact_location

        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.uri]
        artifacts = default_artifact_location(self.uri)
        if artifacts:  # experiments created from the UI put artifacts where ours do
            cmd += ["--artifacts-destination", artifacts]
        return cmd + ["--host", HOST, "--port", str(self.port), "--workers", "1"]

    def __enter__(self) -> _UiServer:
        # Before the child exists: a SIGTERM from now on reaches __exit__, which stops it.
        if _in_main_thread():  # SIGTERM (e.g. `timeout`, a supervisor, kill) stops us like Ctrl-C
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._start()
        except BaseException:  # incl. a SIGTERM right now: the child must not outlive us
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _start(self) -> None:
        env = dict(os.environ)
        # MLflow's GenAI job runner (~8 processes) is unused by a browsing session.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_until_ready(self, url: str, timeout_s: float) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._require_running()
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise UiError(f"the MLflow UI did not answer at {url} within {timeout_s:.0f} s; "
                      f"its log: {self.log}")  # fmt: skip

    def wait(self) -> None:
        """Until KeyboardInterrupt (Ctrl-C, SIGTERM) or the server exits by itself (an error)."""
        while True:
            self._require_running()
            time.sleep(0.5)

    def _require_running(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise UiError(f"the MLflow server exited with status {code}; its log ({self.log}):\n"
                          f"{tail}")  # fmt: skip

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if self._previous_sigterm is not None:
            # A second Ctrl-C while stopping must not leave the server running: ignored till done.
            previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                if proc is not None:
                    _stop_group(proc)
            finally:
                signal.signal(signal.SIGINT, previous_sigint)
                signal.signal(signal.SIGTERM, self._previous_sigterm)
        elif proc is not None:
            _stop_group(proc)
        if exc[0] is None:
            self.log.unlink(missing_ok=True)  # kept (and named in the error) when something failed


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (pgid == its PID), SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # uvicorn workers outliving the parent would keep the port
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _how_to_stop() -> str:
    """'Ctrl-C to stop', or — SIGINT ignored, as in a background job of a script — the kill."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return f"Ctrl-C cannot reach it; stop it with: kill {os.getpid()}"
    return "Ctrl-C to stop"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
