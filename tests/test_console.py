"""service.console: progress lines (non-TTY) with rate/ETA, say(), and the Ray noise filter."""

from __future__ import annotations

import ast
import io
import logging
from pathlib import Path

from service.console import (
    EMBEDDED_QUIET_ACTORS,
    Progress,
    RayNoiseFilter,
    filter_ray_worker_output,
    is_ray_noise,
    say,
)

CLEANER = (
    "Failed to query Ray Train Controller actor state. State API may be temporarily "
    "unavailable. Continuing to monitor."
)
WATCHER = (
    "[2026-11-27 16:04:58,266 E 16598 16726] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: '336d1fb6807c768d79ebb34801000000' has constructor arguments "
    "in the object store and max_restarts > 0"
)


class FakeClock:
    """Seconds that advance only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_report_rate_and_eta_every_interval() -> None:
    out, clock = io.StringIO(), FakeClock()
    with Progress(1000, "features", unit="images", stream=out, clock=clock, interval=10) as p:
        clock.now += 4
        p.update(100)  # within the first interval: no line yet
        clock.now += 6
        p.update(150)  # 250 images in 10 s
        clock.now += 5
        p.update(250)  # 5 s after the last line: none
        clock.now += 15
        p.update(250)  # 750 in 30 s
        clock.now += 15
        p.update(250)  # done: only the closing line
    lines = out.getvalue().splitlines()
    assert lines == [
        "[features] 250/1000 images (25%), 25.0 images/s, ETA 30 s",
        "[features] 750/1000 images (75%), 25.0 images/s, ETA 10 s",
        "[features] 1000/1000 images in 45 s (22.2 images/s)",
    ]


def test_progress_says_nothing_for_short_work_and_handles_unknown_totals() -> None:
    out, clock = io.StringIO(), FakeClock()
    with Progress(10, "linear probe", unit="epochs", stream=out, clock=clock) as p:
        for _ in p.iterate(range(10)):
            clock.now += 0.5
    assert out.getvalue() == ""  # 5 s in all: below the 10 s interval

    with Progress(None, "register", unit="files", stream=out, clock=clock, interval=1) as p:
        clock.now += 150
        p.update(3)
    assert out.getvalue().splitlines() == [
        "[register] 3 files, 0.0 files/s",
        "[register] 3 files in 2 min 30 s (0.0 files/s)",
    ]


def test_progress_uses_a_bar_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert Progress(5, "x", stream=Tty())._use_bar
    assert not Progress(5, "x", stream=io.StringIO())._use_bar
    out = Tty()
    with Progress(3, "bar", stream=out, interval=0) as p:
        p.update(3)
    assert "3/3" in out.getvalue()  # tqdm's own rendering


def test_say_prints_one_line() -> None:
    out = io.StringIO()
    say("demo", "done", stream=out)
    assert out.getvalue() == "[demo] done\n"


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.getLogger(name).makeRecord(name, level, __file__, 1, msg, None, None)


def test_noise_filter_drops_known_ray_lines_and_keeps_real_warnings_and_errors() -> None:
    cleaner = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    logger = logging.getLogger("test_console.ray")
    caught: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record.getMessage())

    sink, noise_filter = Sink(), RayNoiseFilter()
    sink.addFilter(noise_filter)
    logger.addHandler(sink)
    logger.propagate = False
    try:
        logger.warning(CLEANER)
        logger.warning("Failed to clean up placement group: boom")  # a real cleaner failure
        logger.error("worker 1 died: CUDA out of memory")
        logger.error(WATCHER)
    finally:
        logger.removeHandler(sink)
    assert caught == [
        "Failed to clean up placement group: boom",
        "worker 1 died: CUDA out of memory",
    ]
    assert not noise_filter.filter(_record(cleaner, logging.WARNING, CLEANER))
    assert noise_filter.filter(_record(cleaner, logging.WARNING, "Failed to exit actor: x"))
    assert is_ray_noise(WATCHER)
    assert is_ray_noise("Reporting training result 2: TrainingReport(checkpoint=None, metrics={})")
    assert not is_ray_noise("Actor with class name: 'MyActor' has constructor arguments")


def test_forwarded_worker_output_loses_only_the_noise() -> None:
    """Through Ray's real driver-side dispatcher of worker output (no cluster needed)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    received: list[list[str]] = []
    dispatcher.add_handler("test_console_sink", lambda batch: received.append(batch["lines"]))
    try:
        assert filter_ray_worker_output()
        assert filter_ray_worker_output()  # idempotent: wrapped once
        batch = {"ip": "127.0.0.1", "pid": 1, "is_err": True, "actor_name": "PlacementGroupCleaner"}
        dispatcher.emit({**batch, "lines": [CLEANER, CLEANER]})
        dispatcher.emit({**batch, "lines": [CLEANER, "Traceback (most recent call last):"]})
    finally:
        dispatcher.remove_handler("test_console_sink")
    assert received == [["Traceback (most recent call last):"]]


def test_an_embedded_run_drops_the_quiet_actors_output_only() -> None:
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    from service.console import _filtered

    dispatcher, received = WorkerStandardStreamDispatcher(), []
    dispatcher.add_handler("sink", _filtered(received.append, EMBEDDED_QUIET_ACTORS))
    traceback = ["Exception in thread PlacementGroupCleanerMonitor:", "ConnectionError: x"]
    dispatcher.emit(
        {"pid": 1, "is_err": True, "actor_name": "PlacementGroupCleaner", "lines": traceback}
    )
    dispatcher.emit({"pid": 2, "is_err": True, "actor_name": "RayTrainWorker", "lines": traceback})
    assert [b["lines"] for b in received] == [traceback]  # a worker's traceback is kept


def test_console_is_a_leaf_module() -> None:
    source = Path(__file__).resolve().parent.parent / "service" / "console.py"
    imported = [
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(ast.parse(source.read_text()))
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in (n.names if isinstance(n, ast.Import) else [n])
    ]
    assert not [m for m in imported if m and m.startswith("service")]
