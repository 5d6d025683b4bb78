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

__all__ = ["Progress", "RayNoiseFilter", "is_ray_noise", "say"]


def say(stage: str, message: str, *, stream: IO[str] | None = None) -> None:
    """Print ``[stage] message`` once to stderr (flushed, so it interleaves with Ray's output)."""
    print(f"[{stage}] {message}", file=stream or sys.stderr, flush=True)


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
    ``clock`` is injectable for tests.

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

    def __enter__(self) -> Progress:
        self._start = self._last = self.clock()
        if self._use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, desc=f"[{self.label}]", unit=f" {self.unit}",
                file=self.stream, leave=True, dynamic_ncols=True,
            )  # fmt: skip
        return self

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; prints a line when ``interval`` seconds have passed."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
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
    re.compile(p) for p in (r"Failed to query Ray Train Controller actor state",)
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
