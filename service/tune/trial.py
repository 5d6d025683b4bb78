"""One Tune trial = one full distributed pretraining run (Ray Train V2 pattern).

Tune runs ``run_trial`` as a *function trainable* in a lightweight actor; the function builds the
``TorchTrainer`` (own worker group, own placement group) and fits it. ``EpochReportCallback``
forwards every per-epoch ``ray.train.report`` from rank 0 up to Tune, which is what ASHA and the
searcher see. The trial owns a nested MLflow run under the sweep's parent run; rank 0 logs the
per-epoch metrics into it. A failing trial ends its run FAILED with the reason and re-raises so
Tune marks it errored; the sweep goes on (Tune's default is not to fail fast).

Restarts are idempotent: the Train run is named after the trial id under the sweep's experiment
directory, so a restarted trial (``--resume`` after the driver died) resumes from its last Train
checkpoint, and the nested MLflow run is found again by its ``tune_trial_id`` tag.
"""

from __future__ import annotations

import inspect
import json
import sys
import traceback
from typing import Any

from ray.exceptions import RayActorError
from ray.tune.integration.ray_train import TuneReportCallback

from service.config import Config
from service.tracking.run import mlflow_client
from service.tune.summary import short_reason

TRIAL_ID_TAG = "tune_trial_id"
SWEEP_TAG = "tune_sweep"
OUTCOME_TAG = "tune_outcome"
ERROR_TAG = "tune_error"
SEARCHED_TAG = "tune_searched"


class EpochReportCallback(TuneReportCallback):
    """``TuneReportCallback`` plus ``epochs_completed`` (1-based), ASHA's time axis.

    Tune's own ``training_iteration`` restarts at 1 when a trial is restarted, while the Train run
    resumes from its checkpoint at a later epoch; the epoch count from the loop does not drift.
    Inside a Tune trial only (it connects to the trial's result queue):

        >>> trainer.run_config.callbacks = [EpochReportCallback()]  # doctest: +SKIP
        >>> trainer.fit()  # each ray.train.report(...) now reaches Tune  # doctest: +SKIP
    """

    def after_report(self, run_context, metrics, checkpoint):  # noqa: D102 (Ray callback)
        enriched = [{**m, "epochs_completed": int(m["epoch"])} for m in metrics]  # 1-based
        super().after_report(run_context, enriched, checkpoint)


def train_run_name(trial_id: str) -> str:
    """Ray Train run name of a trial: stable across trial restarts, so Train resumes."""
    return f"train-{trial_id}"


def find_trial_run(uri: str, parent_run_id: str, trial_id: str) -> str | None:
    """The nested run a (previous attempt of this) trial created, if any."""
    client = mlflow_client(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.{TRIAL_ID_TAG} = '{trial_id}'"
        ),
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def trial_runs(uri: str, parent_run_id: str) -> dict[str, Any]:
    """The sweep's nested runs by trial id (MLflow ``Run`` objects)."""
    client = mlflow_client(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10_000,
    )
    return {r.data.tags[TRIAL_ID_TAG]: r for r in runs if TRIAL_ID_TAG in r.data.tags}


def _open_trial_run(
    config: Config, parent_run_id: str, trial_id: str, sweep: str, searched: dict[str, Any]
):
    """Create (or, on a restart, reopen) this trial's nested MLflow run."""
    from service.tracking.run import TrackedRun, open_run

    uri = config.mlflow.tracking_uri  # pinned to an absolute URI by the sweep driver
    existing = find_trial_run(uri, parent_run_id, trial_id) if uri else None
    if existing is not None:
        return TrackedRun(uri=uri, run_id=existing).reopen()
    tracking = open_run(config, parent_run_id=parent_run_id, run_name=f"trial-{trial_id}")
    if tracking is not None:
        client = mlflow_client(tracking.uri)
        client.set_tag(tracking.run_id, TRIAL_ID_TAG, trial_id)
        client.set_tag(tracking.run_id, SWEEP_TAG, sweep)
        client.set_tag(tracking.run_id, SEARCHED_TAG, json.dumps(searched, sort_keys=True))
    return tracking


def mark_failed(tracking, error: BaseException | str) -> None:
    """End a trial's run FAILED with the reason as a tag and the full text as ``error.txt``."""
    client = mlflow_client(tracking.uri)
    client.set_tag(tracking.run_id, OUTCOME_TAG, "failed")
    client.set_tag(tracking.run_id, ERROR_TAG, short_reason(error))
    text = error if isinstance(error, str) else "".join(traceback.format_exception(error))
    client.log_text(tracking.run_id, text, "error.txt")
    tracking.end("FAILED")


def _attach_callbacks(trainer: Any, callbacks: list[Any]) -> None:
    # build_trainer has no `callbacks` argument (yet); Train V2 reads run_config.callbacks at
    # fit() time, so adding them to the trainer's RunConfig before fit() is equivalent.
    existing = list(trainer.run_config.callbacks or [])
    trainer.run_config.callbacks = existing + callbacks


def run_trial(
    sampled: dict[str, Any],
    *,
    base: Config,
    parent_run_id: str | None,
    storage_path: str,
    sweep: str,
    decoded_ref: Any = None,
) -> None:
    """Tune function trainable: pretrain with ``base.with_values(sampled)`` (the sampled dotted
    values type-checked on the typed config; ``decoded_ref``: the sweep's shared decoded copy of
    the training rows, if any)."""
    import ray.tune

    from service.train.driver import build_trainer, fit

    trial_id = ray.tune.get_context().get_trial_id()
    config = base.with_values(sampled)
    print(f"[tune] trial {trial_id}: {sampled}", file=sys.stderr, flush=True)
    tracking = None
    if parent_run_id is not None:
        tracking = _open_trial_run(config, parent_run_id, trial_id, sweep, sampled)
    try:
        kwargs: dict[str, Any] = {}
        if "callbacks" in inspect.signature(build_trainer).parameters:
            kwargs["callbacks"] = [EpochReportCallback()]
        trainer = build_trainer(
            config,
            run=tracking,
            storage_path=storage_path,
            run_name=train_run_name(trial_id),
            decoded_ref=decoded_ref,
            **kwargs,
        )
        if not kwargs:
            _attach_callbacks(trainer, [EpochReportCallback()])
        fit(trainer)
    except Exception as exc:
        # When Tune stops this trial (ASHA), it removes the trial's placement group, which takes
        # the Train controller down with it: ray.get() here then raises RayActorError while this
        # actor is being torn down. That is no training failure; the driver, which knows whether
        # Tune stopped the trial or it errored, gives the run its final status.
        if tracking is not None and not isinstance(exc, RayActorError):
            mark_failed(tracking, exc)
        raise
    if tracking is not None:
        mlflow_client(tracking.uri).set_tag(tracking.run_id, OUTCOME_TAG, "completed")
        tracking.end("FINISHED")
