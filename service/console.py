"""What people see in the terminal: one-line stage messages, progress on long work, and a filter
that keeps Ray's internal chatter out of an embedded run's output.

A leaf module: it imports nothing from ``service`` so every layer may use it.

    >>> import io
    >>> out = io.StringIO()
    >>> say("demo", "hello", stream=out)
    >>> out.getvalue()
    '[demo] hello\\n'
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import IO, Any

__all__ = [
    "EMBEDDED_QUIET_ACTORS",
    "Progress",
    "RayNoiseFilter",
    "filter_ray_worker_output",
    "is_ray_noise",
    "say",
]


def say(stage: str, message: str, *, stream: IO[str] | None = None) -> None:
    """Print ``[stage] message`` once to stderr (flushed, so it interleaves with Ray's output).

    Written with ``write``, not ``print``: inside a Ray Train worker ``print`` is patched to
    both print and log the line, and the driver would show it twice."""
    out = stream or sys.stderr
    out.write(f"[{stage}] {message}\n")
    out.flush()


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Progress of ``total`` units of work (``None``: unknown) labelled ``label``.

    On a terminal it is a tqdm bar; otherwise (a log file, ``ray job submit``) it prints one line
    every ``interval`` seconds with done/total, rate and ETA, and a last line when it closes.
    Work that ends within ``interval`` prints nothing (the bar appears after ``interval`` too):
    short work, such as the per-epoch kNN monitor, stays quiet. ``clock`` is injectable for tests.

        >>> import io
        >>> out = io.StringIO()
        >>> ticks = iter([0.0, 12.0, 20.0])
        >>> clock = lambda: next(ticks)
        >>> with Progress(100, "features", unit="images", stream=out, clock=clock) as p:
        ...     p.update(60)
        >>> print(out.getvalue(), end="")
        [features] 60/100 images (60%), 5.0 images/s, ETA 8 s
        [features] 60/100 images in 20 s (3.0 images/s)
    """

    def __init__(
        self,
        total: int | None,
        label: str,
        *,
        unit: str = "it",
        interval: float = 10.0,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        bar: bool | None = None,
    ) -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.interval = interval
        self.stream = stream or sys.stderr
        self.clock = clock
        self.done = 0
        isatty = getattr(self.stream, "isatty", lambda: False)
        self._use_bar = isatty() if bar is None else bar
        self._bar: Any = None
        self._start = 0.0
        self._last = 0.0
        self._lines = 0

    def __enter__(self) -> Progress:
        self._start = self._last = self.clock()
        if self._use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, desc=f"[{self.label}]", unit=f" {self.unit}",
                file=self.stream, leave=True, dynamic_ncols=True, delay=self.interval,
            )  # fmt: skip
        return self

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; prints a line when ``interval`` seconds have passed."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        finished = self.total is not None and self.done >= self.total  # the closing line says it
        if now - self._last >= self.interval and not finished:
            self._last = now
            self._lines += 1
            say(self.label, self._line(now), stream=self.stream)

    def _rate(self, now: float) -> float:
        elapsed = now - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _line(self, now: float) -> str:
        rate = self._rate(now)
        if self.total is None:
            return f"{self.done} {self.unit}, {rate:.1f} {self.unit}/s"
        percent = 100 * self.done / self.total if self.total else 100
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (
            f"{self.done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.1f} {self.unit}/s, "
            f"ETA {eta}"
        )

    def close(self) -> None:
        """Close the bar, or print the closing line (done, elapsed, rate)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        if self._lines == 0:  # ended within the first interval: nothing worth a line
            return
        now = self.clock()
        of = f"/{self.total}" if self.total is not None else ""
        say(
            self.label,
            f"{self.done}{of} {self.unit} in {_duration(now - self._start)} "
            f"({self._rate(now):.1f} {self.unit}/s)",
            stream=self.stream,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def iterate(self, items: Iterable[Any], size: Callable[[Any], int] = lambda _: 1) -> Any:
        """Yield ``items``, counting ``size(item)`` units for each."""
        for item in items:
            yield item
            self.update(size(item))


# Ray's own messages that say nothing to a user of an embedded run (each one explained in
# docs/console.md). Anything else — and every real warning or error — passes.
RAY_NOISE: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        # Ray Train's PlacementGroupCleaner asks the State API (served by the dashboard) every
        # second whether the controller lives; with no dashboard (embedded Ray) every ask fails.
        r"Failed to query Ray Train Controller actor state",
        # Ray Train's own PreemptionWatcher actor trips a core_worker check about itself.
        r"Actor with class name: 'PreemptionWatcher' .*max_restarts > 0",
        # INFO, every worker, every epoch; logged under getLogger(__file__) in Ray Train's
        # execution/context.py, so RunConfig's Train log level does not reach it.
        r"Reporting training result \d+: TrainingReport\(",
    )
)


def is_ray_noise(text: str) -> bool:
    """Whether ``text`` is one of Ray's known internal lines (``RAY_NOISE``)."""
    return any(p.search(text) for p in RAY_NOISE)


class RayNoiseFilter(logging.Filter):
    """A ``logging.Filter`` dropping Ray's known internal lines; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge: let it through
            return True
        return not is_ray_noise(text)


# Ray Train's detached PlacementGroupCleaner removes a run's placement group if the controller
# dies; in an embedded Ray, which ends with the command, that never matters, and everything it
# prints is about itself: its once-a-second State API failures, and with a second Ray on the host
# the traceback of its monitor thread (the State API client cannot pick between two clusters).
EMBEDDED_QUIET_ACTORS = ("PlacementGroupCleaner",)


def _filtered(
    handler: Callable[[dict[str, Any]], None], quiet_actors: tuple[str, ...]
) -> Callable[[dict[str, Any]], None]:
    def handle(batch: dict[str, Any]) -> None:
        if batch.get("actor_name") in quiet_actors:
            return
        lines = [line for line in batch.get("lines", []) if not is_ray_noise(line)]
        if lines:
            handler({**batch, "lines": lines})

    handle.ray_noise_filtered = True  # type: ignore[attr-defined]
    return handle


def filter_ray_worker_output(quiet_actors: tuple[str, ...] = ()) -> bool:
    """Drop Ray's known internal lines (and all output of the actors named in ``quiet_actors``)
    from the worker output Ray forwards to this driver (``log_to_driver``); every other line is
    printed as before. Returns whether the filter is installed.

    Worker lines never pass through the driver's ``logging``: Ray's log monitor hands batches
    of lines to handlers of ``ray._private.ray_logging.global_worker_stdstream_dispatcher``, so
    the filter wraps the one that prints them. That is Ray's private API: when it changes the
    output is left as it is."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            dispatcher.handlers = [
                (name, h if getattr(h, "ray_noise_filtered", False) else _filtered(h, quiet_actors))
                for name, h in dispatcher.handlers
            ]
        return True
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
