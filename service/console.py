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

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from types import TracebackType
from typing import IO, Any

__all__ = [
    "EMBEDDED_QUIET_ACTORS",
    "MLFLOW_PICKLE_WARNING",
    "PlainText",
    "Progress",
    "RayNoiseFilter",
    "dropping_log_messages",
    "filter_ray_worker_output",
    "is_ray_noise",
    "plain_output",
    "quiet_embedded_ray",
    "say",
    "strip_ansi",
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


# ---------------------------------------------------------------------------------------------
# Colour codes only on a terminal

# CSI (colours, cursor moves: ESC [ ... final byte), OSC (ESC ] ... BEL / ESC \) and two-byte
# escapes: what Ray (colorama), tqdm and rich write.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences.

    >>> strip_ansi("\\x1b[36m(TrainController pid=7)\\x1b[0m ready")
    '(TrainController pid=7) ready'
    """
    return _ANSI.sub("", text)


class PlainText:
    """A text stream that drops ANSI escape sequences from what is written to ``stream``;
    everything else (``isatty``, ``fileno``, ``buffer``, ``flush``, ...) is the stream's own."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(strip_ansi(text) if "\x1b" in text else text)
        return len(text)  # what the caller handed over, as print() expects

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)]


@contextlib.contextmanager
def plain_output() -> Iterator[None]:
    """Within the block, ``sys.stdout`` / ``sys.stderr`` — and the logging handlers already
    writing to them (Ray's, set up when ``ray`` is imported) — drop ANSI colour codes when they
    are not a terminal (a log file, a pipe, ``ray job logs``): Ray colours the ``(pid=…)``
    prefix of forwarded worker lines and parts of its exception texts whatever the output is.
    On a terminal nothing changes; everything is restored on exit."""
    saved = sys.stdout, sys.stderr
    plain = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not _is_terminal(stream) and not isinstance(stream, PlainText):
            plain[id(stream)] = PlainText(stream)
            setattr(sys, name, plain[id(stream)])
    moved = [(h, h.stream) for h in _stream_handlers() if id(h.stream) in plain]
    for handler, stream in moved:
        handler.stream = plain[id(stream)]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for handler, stream in moved:
            handler.stream = stream


# ---------------------------------------------------------------------------------------------
# Known warnings, silenced where they come from

# MLflow warns on every pickled pytorch model; the pickled flavour is a documented choice
# (service/registry/register.py: why not pt2, and the weights-only copy that loading prefers).
MLFLOW_PICKLE_WARNING = "Saving pytorch model by Pickle or CloudPickle format"


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge: let it through
            return True
        return not any(p in text for p in self.patterns)


@contextlib.contextmanager
def dropping_log_messages(logger: str, *patterns: str) -> Iterator[None]:
    """Within the block, records of ``logger`` containing one of ``patterns`` are dropped; every
    other record of it passes.

    >>> with dropping_log_messages("demo.lib", "known"):
    ...     logging.getLogger("demo.lib").warning("a known warning")  # not printed
    """
    target = logging.getLogger(logger)
    dropper = _DropMessages(patterns)
    target.addFilter(dropper)
    try:
        yield
    finally:
        target.removeFilter(dropper)


# Ray >= 2.59 turns token authentication on for every new local cluster when RAY_AUTH_MODE is
# unset (a token in ~/.ray/auth_token, generated if missing) and says so in a WARNING, each run.
# Secure and expected; nothing for the user to do. Logged under this logger, once per ray.init().
RAY_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


def quiet_embedded_ray(environ: MutableMapping[str, str] | None = None) -> None:
    """Before this process starts a Ray of its own (its workers inherit the environment):

    * Ray's notice that it enabled token authentication for the new local cluster is dropped
      (only that message: "Token authentication is enabled but no token was found" and every
      other warning pass). Ray's behaviour is unchanged; ``RAY_AUTH_MODE`` is not touched.
    * ``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` unless set: Ray Train patches print() in its workers to
      print AND log each line (it mistakes Ray's own stdout redirection for a third-party
      wrapper), so every worker print reached the console twice.

    >>> env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "1"}
    >>> quiet_embedded_ray(env)
    >>> env
    {'RAY_TRAIN_ENABLE_PRINT_PATCH': '1'}
    """
    environ = os.environ if environ is None else environ
    environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    target = logging.getLogger(RAY_TOKEN_AUTH_LOGGER)
    if not any(isinstance(f, _DropMessages) for f in target.filters):  # once per process
        target.addFilter(_DropMessages((RAY_TOKEN_AUTH_NOTICE,)))
