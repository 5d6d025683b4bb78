"""One MLflow run's lifecycle: open (or reopen) it, log into it, end it — FAILED on any error.

Pretraining, evaluation and every Tune trial/sweep go through :func:`tracked_run`, so a run can
never be left RUNNING by an exception between its creation and the end of the work:

    >>> from service.config import Config
    >>> with tracked_run(Config()) as run:  # doctest: +SKIP
    ...     run.logger().log_metrics({"train_loss": 4.2}, step=0)

Epoch metrics are logged at ``step=global_step`` (epoch 0, the random-init validation metrics,
at step 0); ``epoch`` and ``global_step`` become run tags, not charts. :func:`log_epoch` and
:func:`backfill_epochs` (the checkpointed epochs a run lacks after a restart) are the one place
that knows how an epoch row maps onto MLflow.
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

EPOCH_KEY_METRIC = "train_loss"  # every trained epoch has it; its steps say which epochs landed
# History keys that are not charts: run tags (epoch, global_step: the latest; num_nodes: set once
# by the loop).
EPOCH_TAG_KEYS = ("epoch", "global_step")
NOT_METRICS = (*EPOCH_TAG_KEYS, "num_nodes")


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


def epoch_step(row: Mapping[str, Any]) -> int:
    """The MLflow step of a history row: its ``global_step`` (0 for the random-init epoch 0)."""
    return int(row.get("global_step", 0))


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The chartable values of a history row (``epoch``/``global_step``/``num_nodes`` are tags)."""
    return {k: float(v) for k, v in row.items() if k not in NOT_METRICS}


def epoch_tags(row: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(int(row[k])) for k in EPOCH_TAG_KEYS if k in row}


def log_epoch(logger: Any, metrics: Mapping[str, Any]) -> None:
    """One epoch's metrics at ``step=global_step`` in one batch (an epoch lands whole or not),
    then the ``epoch``/``global_step`` tags.

    >>> log_epoch(logger, {"epoch": 1, "global_step": 39, "train_loss": 5.1})  # doctest: +SKIP
    """
    logger.log_metrics(epoch_metrics(metrics), step=epoch_step(metrics))
    logger.set_tags(epoch_tags(metrics))


def _key_metric(row: Mapping[str, Any]) -> str | None:
    """The metric whose steps say whether ``row`` landed: ``train_loss``, or for the random-init
    epoch 0 (monitor metrics only) its first metric."""
    if EPOCH_KEY_METRIC in row:
        return EPOCH_KEY_METRIC
    return min(epoch_metrics(row), default=None)


def backfill_epochs(client: Any, run_id: str, history: Sequence[Mapping[str, Any]]) -> list[int]:
    """Log the epochs of ``history`` that the run lacks (same ``step=global_step``); return
    their ``epoch`` numbers. The ``epoch``/``global_step`` tags follow the last row.

    Epoch metrics are logged after the checkpoint that carries them is persisted, so a process
    that dies in between (or is stopped by Tune on that very report) leaves a gap that only the
    checkpointed/reported history can fill.
    """
    from mlflow.entities import Metric, RunTag

    logged: dict[str, set[int]] = {}
    missing = []
    for row in history:
        key = _key_metric(row)
        if key is None:
            continue
        if key not in logged:
            logged[key] = {m.step for m in client.get_metric_history(run_id, key)}
        if epoch_step(row) not in logged[key]:
            missing.append(row)
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, value, now, epoch_step(row))
        for row in missing
        for key, value in epoch_metrics(row).items()
    ]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    if missing and history:
        tags = [RunTag(k, v) for k, v in epoch_tags(history[-1]).items()]
        client.log_batch(run_id, tags=tags)
    return [int(row["epoch"]) for row in missing]
