"""One MLflow run's lifecycle: open (or reopen) it, log into it, end it — FAILED on any error.

Pretraining, evaluation and every Tune trial/sweep go through :func:`tracked_run`, so a run can
never be left RUNNING by an exception between its creation and the end of the work:

    >>> from service.config import Config
    >>> with tracked_run(Config()) as run:  # doctest: +SKIP
    ...     run.logger().log_metrics({"train_loss": 4.2}, step=0)

Epoch metrics are logged at ``step=epoch``; :func:`backfill_epochs` logs the checkpointed epochs
a run lacks after a restart (the one place that knows how an epoch row maps onto MLflow).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from service.config import Config

log = logging.getLogger("service.tracking")

EPOCH_KEY_METRIC = "train_loss"  # every logged epoch has it; its steps say which epochs landed


def mlflow_client(uri: str) -> Any:
    """An explicit ``MlflowClient`` (no fluent global run: trials run in parallel processes)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


@dataclass(frozen=True)
class TrackedRun:
    """Handle of one MLflow run; workers and trials log into it by id."""

    uri: str
    run_id: str

    def client(self) -> Any:
        return mlflow_client(self.uri)

    def logger(self) -> Any:
        """A buffered, retrying ``MetricLogger`` for this run (use on one process only)."""
        from service.tracking.logger import MetricLogger

        return MetricLogger(self.uri, self.run_id)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        client = self.client()
        for key, value in tags.items():
            client.set_tag(self.run_id, key, value)

    def reopen(self) -> TrackedRun:
        """Mark a previously ended run RUNNING again (a resumed pretraining or sweep)."""
        self.client().update_run(self.run_id, status="RUNNING")
        return self

    def end(self, status: str = "FINISHED") -> None:
        from service.tracking.runs import end_run

        end_run(self.run_id, status, tracking_uri=self.uri)


def open_run(
    config: Config, *, run_name: str | None = None, parent_run_id: str | None = None
) -> TrackedRun | None:
    """Resolve + check the tracking URI (fails fast when unreachable), then create the run.

    Returns None when ``mlflow.enabled`` is false.
    """
    if not config.mlflow.enabled:
        return None
    from service.tracking.runs import start_pretrain_run
    from service.tracking.uri import check_tracking_server, resolve_tracking_uri

    uri = resolve_tracking_uri(config.mlflow)
    check_tracking_server(uri)
    run_id = start_pretrain_run(
        config,
        uri,
        run_name=run_name or config.train.run_name,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
    )
    return TrackedRun(uri=uri, run_id=run_id)


@contextmanager
def ending_on_error(run: TrackedRun | None, *, finish: bool = True) -> Iterator[TrackedRun | None]:
    """Yield ``run``; end it FAILED if the block raises (also Ctrl-C), FINISHED after it if
    ``finish``. A failure to mark the run is logged, never hides the original error."""
    try:
        yield run
    except BaseException:
        if run is not None:
            try:
                run.end("FAILED")
            except Exception as exc:  # the tracking server may be what failed
                log.warning("could not mark MLflow run %s FAILED: %s", run.run_id, exc)
        raise
    if run is not None and finish:
        run.end("FINISHED")


@contextmanager
def tracked_run(
    config: Config,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    existing: TrackedRun | None = None,
) -> Iterator[TrackedRun | None]:
    """Open a new run (or reopen ``existing``) for the block; FAILED on any exception."""
    run = existing.reopen() if existing is not None else None
    if run is None:
        run = open_run(config, run_name=run_name, parent_run_id=parent_run_id)
    with ending_on_error(run) as handle:
        yield handle


def log_epoch(logger: Any, metrics: Mapping[str, Any]) -> None:
    """One epoch's metrics at ``step=epoch`` in one batch, so an epoch lands whole or not."""
    logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=int(metrics["epoch"]))


def backfill_epochs(client: Any, run_id: str, history: Sequence[Mapping[str, Any]]) -> list[int]:
    """Log the epochs of ``history`` that the run lacks (same ``step=epoch``); return them.

    Epoch metrics are logged after the checkpoint that carries them is persisted, so a process
    that dies in between (or is stopped by Tune on that very report) leaves a gap that only the
    checkpointed/reported history can fill.
    """
    from mlflow.entities import Metric

    logged = {m.step for m in client.get_metric_history(run_id, EPOCH_KEY_METRIC)}
    missing = [row for row in history if int(row["epoch"]) not in logged]
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(row["epoch"]))
        for row in missing
        for key, value in row.items()
    ]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    return [int(row["epoch"]) for row in missing]
