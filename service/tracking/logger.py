"""Worker-side (rank 0) MLflow logging that never stalls or kills training when MLflow is down.

``MetricLogger`` talks to one run through an explicit ``MlflowClient`` (no fluent global state, so
it is safe inside Ray workers). Every call first buffers, then tries to send; a transient failure
(server down, timeout, 5xx) keeps the data buffered and backs off for ``retry_interval_s`` during
which calls return immediately. ``flush()`` at the end retries with exponential backoff for at
most ``flush_timeout_s`` and returns a ``FlushReport`` of anything that could not be logged.

Retries are idempotent: each metric keeps the timestamp it was logged with, and MLflow ignores
an exact duplicate (key, value, timestamp, step), so a batch that reached the server before the
connection broke is not stored twice.

    >>> logger = MetricLogger("sqlite:////tmp/doc-mlruns.db", run_id)  # doctest: +SKIP
    >>> logger.log_metrics({"loss": 4.1, "lr": 1e-3}, step=10)  # doctest: +SKIP
    >>> logger.flush().ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from service.tracking.uri import fast_fail_http, redact_uri

log = logging.getLogger(__name__)

METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
# MLflow metric names: alphanumerics, _ - . space : / (mlflow.utils.validation).
_METRIC_NAME = re.compile(r"^[\w\-. :/]{1,250}$")
# Errors that retrying cannot fix: drop the batch and report it instead of buffering forever.
_PERMANENT_ERROR_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
    "BAD_REQUEST",
}


class MetricValueError(ValueError):
    """A metric name or value cannot be logged to MLflow; the message names it."""


@dataclass
class FlushReport:
    """What ``MetricLogger.flush`` achieved; ``ok`` is False if anything was not logged."""

    logged_metrics: int
    unlogged_metrics: int
    dropped_metrics: int
    unlogged_artifacts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unlogged_tags: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.unlogged_metrics
            or self.dropped_metrics
            or self.unlogged_artifacts
            or self.unlogged_tags
        )


@dataclass
class _PendingArtifact:
    local_path: str
    artifact_path: str | None


class MetricLogger:
    """Buffered, retrying metric/artifact logger for one MLflow run (use on rank 0 only).

    Args:
        tracking_uri: MLflow tracking URI (``service.tracking.uri.resolve_tracking_uri``).
        run_id: the run created by the driver (``service.tracking.runs.start_pretrain_run``).
        max_buffer: most metric values kept while MLflow is unreachable; the oldest are dropped
            (and counted in the report) beyond it, so an outage cannot exhaust memory.
        request_timeout_s: per-request timeout; MLflow's own retry loop is disabled.
        retry_interval_s: after a failure, calls only buffer for this long before trying again.
        flush_timeout_s: bound on the total time ``flush()`` spends retrying.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        max_buffer: int = 100_000,
        request_timeout_s: float = 5.0,
        retry_interval_s: float = 30.0,
        flush_timeout_s: float = 120.0,
    ) -> None:
        from mlflow import MlflowClient

        if max_buffer < 1:
            raise ValueError(f"max_buffer must be >= 1, got {max_buffer}")
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.max_buffer = max_buffer
        self.request_timeout_s = request_timeout_s
        self.retry_interval_s = retry_interval_s
        self.flush_timeout_s = flush_timeout_s
        self._client = MlflowClient(tracking_uri)
        self._metrics: deque[Any] = deque()  # mlflow.entities.Metric, in logging order
        self._tags: dict[str, str] = {}  # run tags awaiting sending; the latest value wins
        self._artifacts: deque[_PendingArtifact] = deque()
        self._lock = threading.RLock()
        self._next_attempt = 0.0  # time.monotonic() before which we only buffer
        self._outage_since: float | None = None
        self._staging: Path | None = None  # log_text files awaiting upload
        self.logged_metrics = 0
        self.dropped_metrics = 0
        self._errors: list[str] = []
        self._failed_artifacts: list[str] = []

    # ------------------------------------------------------------------ public API

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None
    ) -> None:
        """Buffer ``metrics`` at ``step`` and try to send everything pending; never raises on
        connection problems (only on invalid names/values, which are programming errors)."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        entries = [
            Metric(_check_name(key), _to_float(key, value), timestamp, int(step))
            for key, value in metrics.items()
        ]
        with self._lock:
            self._metrics.extend(entries)
            overflow = len(self._metrics) - self.max_buffer
            if overflow > 0:
                for _ in range(overflow):
                    self._metrics.popleft()
                if self.dropped_metrics == 0:
                    log.warning(
                        "MLflow metric buffer full (%d values); dropping the oldest while %s is "
                        "unreachable",
                        self.max_buffer,
                        redact_uri(self.tracking_uri),
                    )
                self.dropped_metrics += overflow
            self._try_send(force=False)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as strings), sent with the next batch; buffered like metrics.

        For values that are not charts (``epoch``, ``global_step``): a tag keeps the latest."""
        with self._lock:
            self._tags.update({str(key): str(value) for key, value in tags.items()})
            self._try_send(force=False)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a local file (now, or at a later call / flush if MLflow is unreachable).

        The file must still exist when a deferred upload happens; ``log_text`` stages its own copy.
        """
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact {local} does not exist")
        with self._lock:
            self._artifacts.append(_PendingArtifact(str(local), artifact_path))
            self._try_send(force=False)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as the artifact ``artifact_file`` (e.g. ``"eval/knn.json"``)."""
        with self._lock:
            if self._staging is None:
                self._staging = Path(tempfile.mkdtemp(prefix="mlflow-staging-"))
            target = self._staging / uuid.uuid4().hex / Path(artifact_file).name
            target.parent.mkdir(parents=True)
            target.write_text(text)
            parent = str(Path(artifact_file).parent)
            self._artifacts.append(_PendingArtifact(str(target), None if parent == "." else parent))
            self._try_send(force=False)

    @property
    def pending_metrics(self) -> int:
        return len(self._metrics)

    def flush(self, timeout_s: float | None = None) -> FlushReport:
        """Push everything buffered, retrying with backoff for at most ``timeout_s``
        (default ``flush_timeout_s``); logs a warning and returns what could not be logged."""
        deadline = time.monotonic() + (self.flush_timeout_s if timeout_s is None else timeout_s)
        delay = 0.5
        while True:
            with self._lock:
                if self._try_send(force=True):
                    break
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        report = self._report()
        if not report.ok:
            log.warning(
                "MLflow run %s at %s: %d metric values and %d artifacts could not be logged "
                "(%d dropped from the full buffer). Pending metrics: %s. Errors: %s",
                self.run_id,
                redact_uri(self.tracking_uri),
                report.unlogged_metrics,
                len(report.unlogged_artifacts),
                report.dropped_metrics,
                self._describe_pending(),
                report.errors[-3:],
            )
        return report

    def close(self) -> FlushReport:
        """``flush()`` and remove the staging directory of ``log_text`` files."""
        report = self.flush()
        if self._staging is not None and not self._artifacts:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        return report

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _try_send(self, force: bool) -> bool:
        """Send pending metrics then artifacts; True when nothing is left. Caller holds the lock."""
        if not force and time.monotonic() < self._next_attempt:
            return False
        from mlflow.entities import RunTag

        if not self._metrics and not self._artifacts and not self._tags:
            return True
        with fast_fail_http(self.request_timeout_s):
            while self._metrics or self._tags:
                batch = list(islice(self._metrics, METRICS_PER_BATCH))
                tags = [RunTag(key, value) for key, value in self._tags.items()]
                try:
                    self._client.log_batch(self.run_id, metrics=batch, tags=tags)
                    self.logged_metrics += len(batch)
                except Exception as exc:
                    if not _is_permanent(exc):
                        self._on_transient_failure(exc)
                        return False
                    self._errors.append(
                        f"log_batch rejected {len(batch)} metrics, {len(tags)} tags: {exc}"
                    )
                    log.error("MLflow rejected %d metric values (dropped): %s", len(batch), exc)
                    self.dropped_metrics += len(batch)
                for _ in batch:
                    self._metrics.popleft()
                self._tags.clear()
            while self._artifacts:
                item = self._artifacts[0]
                try:
                    self._client.log_artifact(self.run_id, item.local_path, item.artifact_path)
                except FileNotFoundError as exc:
                    self._errors.append(f"artifact {item.local_path} vanished: {exc}")
                    self._failed_artifacts.append(item.local_path)
                except Exception as exc:
                    if not _is_permanent(exc):
                        self._on_transient_failure(exc)
                        return False
                    self._errors.append(f"artifact {item.local_path} rejected: {exc}")
                    self._failed_artifacts.append(item.local_path)
                self._artifacts.popleft()
        if self._outage_since is not None:
            log.warning(
                "MLflow at %s reachable again after %.0f s; buffered data sent",
                redact_uri(self.tracking_uri),
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
        return True

    def _on_transient_failure(self, exc: BaseException) -> None:
        self._next_attempt = time.monotonic() + self.retry_interval_s
        self._errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        del self._errors[:-20]  # keep the report small
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "MLflow at %s unreachable (%s); buffering metrics, retrying every %.0f s",
                redact_uri(self.tracking_uri),
                str(exc)[:200],
                self.retry_interval_s,
            )

    def _report(self) -> FlushReport:
        with self._lock:
            return FlushReport(
                logged_metrics=self.logged_metrics,
                unlogged_metrics=len(self._metrics),
                dropped_metrics=self.dropped_metrics,
                unlogged_artifacts=[a.local_path for a in self._artifacts]
                + list(self._failed_artifacts),
                errors=list(self._errors),
                unlogged_tags=len(self._tags),
            )

    def _describe_pending(self) -> str:
        steps: dict[str, tuple[int, int]] = {}
        for metric in self._metrics:
            lo, hi = steps.get(metric.key, (metric.step, metric.step))
            steps[metric.key] = (min(lo, metric.step), max(hi, metric.step))
        return ", ".join(f"{key} steps {lo}..{hi}" for key, (lo, hi) in sorted(steps.items()))


def _check_name(key: str) -> str:
    if not isinstance(key, str) or not _METRIC_NAME.match(key) or ".." in key.split("/"):
        raise MetricValueError(
            f"invalid MLflow metric name {key!r}: use letters, digits, _ - . space : / "
            "(at most 250 characters)"
        )
    return key


def _to_float(key: str, value: Any) -> float:
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError) as exc:
        raise MetricValueError(f"metric {key!r}: {value!r} is not a number") from exc
    # NaN/inf are kept on purpose: MLflow stores them, and a diverged loss should be visible.
    return number


def _is_permanent(exc: BaseException) -> bool:
    error_code = getattr(exc, "error_code", None)
    return error_code in _PERMANENT_ERROR_CODES
