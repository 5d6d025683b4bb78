"""The sweep driver: validate → parent MLflow run → Ray Tune (ASHA + random/Optuna) → summary →
register the best trial's encoder.

Order matters for cost: everything that can be wrong in the config fails before Ray starts, an
unreachable MLflow fails before any trial, and a sweep that cannot fit fails before the first
worker group is requested (the concurrent trial count: ``check_local_fits`` before an embedded
Ray starts, ``check_cluster_fits`` once connected to a cluster).

The sweep lives in ``<storage>/<name>/``: Tune's experiment state, one Ray Train run per trial
(``train-<trial id>``) and ``sweep.json`` (parent run id, resolved config, what was registered),
which is what ``resume=True`` needs after the driver died.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.config import Config, config_from_dict
from service.tracking.run import TrackedRun, ending_on_error
from service.tune.settings import (
    TRIAL_DRIVER_RESOURCES,
    SweepConfigError,
    SweepSettings,
    resolve_settings,
    trial_base_config,
)
from service.tune.space import to_param_space
from service.tune.summary import (
    TrialRecord,
    pick_best,
    plot_curves,
    plot_sweep,
    record_from_result,
    sweep_totals,
    to_markdown,
    write_csv,
)

STATE_FILE = "sweep.json"


class SweepFailedError(RuntimeError):
    """Every trial of the sweep failed; the message carries their reasons."""


def _preload_modules() -> None:
    """Import everything the driver needs later, before it connects to Ray.

    Under ``ray job submit --working-dir``, a runtime-env agent that (re)extracts the job's
    working directory (rmtree + unzip; seen with two Ray nodes on one host sharing a temp dir)
    makes a lazy import fail with ModuleNotFoundError for a file that exists. Modules already in
    ``sys.modules`` are immune, so the driver loads them up front.
    """
    import service.data.augment  # noqa: F401
    import service.data.preview  # noqa: F401
    import service.eval.features  # noqa: F401
    import service.registry.register  # noqa: F401
    import service.tracking.logger  # noqa: F401
    import service.tracking.plots  # noqa: F401
    import service.tracking.runs  # noqa: F401
    import service.train.checkpoint  # noqa: F401
    import service.train.finalize  # noqa: F401
    import service.tune.trial  # noqa: F401


def _progress(message: str) -> None:
    print(f"[tune] {message}", file=sys.stderr, flush=True)


def _load_state(settings: SweepSettings) -> dict[str, Any]:
    path = settings.experiment_path / STATE_FILE
    if not path.exists():
        raise SweepConfigError(
            f"nothing to resume: no sweep state at {path}. Start the sweep without --resume "
            f"(or point tune.storage_path / the sweep name at the existing sweep)"
        )
    return json.loads(path.read_text())


def _save_state(settings: SweepSettings, state: dict[str, Any]) -> None:
    settings.experiment_path.mkdir(parents=True, exist_ok=True)
    path = settings.experiment_path / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(path)  # atomic: a driver dying mid-write never leaves half a state file


def _refuse_existing(settings: SweepSettings) -> None:
    path = settings.experiment_path
    if (path / STATE_FILE).exists() or (path.is_dir() and any(path.glob("experiment_state*"))):
        raise SweepConfigError(
            f"a sweep named {settings.name!r} already exists at {path}; pass --resume to continue "
            f"it, or choose a new name (--set train.run_name=NEW; the sweep is NEW-sweep)"
        )


def _build_tuner(settings: SweepSettings, trainable: Any) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from service.tune.cleanup import PlacementGroupJanitor, TrialExitBarrier
    from service.tune.progress import TrialLines, tune_verbosity

    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # TPE; metric/mode come from TuneConfig
        search_alg = OptunaSearch(
            seed=settings.seed, points_to_evaluate=list(settings.points) or None
        )
    else:
        from ray.tune.search import BasicVariantGenerator

        # A SearchGenerator ignores TuneConfig.max_concurrent_trials: limit it here.
        search_alg = BasicVariantGenerator(
            random_state=settings.seed,
            max_concurrent=settings.resources.concurrent_trials,
            points_to_evaluate=list(settings.points) or None,
        )
    scheduler = ASHAScheduler(
        # epochs_completed (added by EpochReportCallback) or, under a time budget, train_minutes
        time_attr=settings.time_attr,
        max_t=settings.max_t,  # past the last report (settings._asha_axis)
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=to_param_space(settings.specs),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=settings.num_samples,
            # the random generator limits itself (above); Tune wraps a Searcher (Optuna) here
            max_concurrent_trials=(
                settings.resources.concurrent_trials if settings.search != "random" else None
            ),
            reuse_actors=False,  # each trial owns (and tears down) its Train worker group
            time_budget_s=(
                None if settings.wall_budget_minutes is None else 60 * settings.wall_budget_minutes
            ),
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=settings.storage_path,
            # A failed trial is a data point (e.g. a temperature that diverges), not a reason to
            # stop the sweep; it is not retried either, a NaN would only NaN again.
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            # The janitor frees the workers of ASHA-stopped trials; the barrier makes fit()
            # return only once no trial process can still write to its MLflow run. One line per
            # trial report/end instead of Tune's tables (service/tune/progress.py).
            callbacks=[
                PlacementGroupJanitor(),
                TrialExitBarrier(),
                TrialLines(
                    settings.metric,
                    settings.max_epochs,
                    settings.budget_minutes,
                    settings.max_steps,
                ),
            ],
            verbose=tune_verbosity(),
        ),
    )


def _trainable(
    config: Config, settings: SweepSettings, parent_run_id: str | None, decoded_ref: Any = None
) -> Any:
    from ray import tune

    from service.tune.trial import run_trial

    bound = tune.with_parameters(
        run_trial,
        base=config,
        parent_run_id=parent_run_id,
        storage_path=str(settings.experiment_path),
        sweep=settings.name,
        decoded_ref=decoded_ref,
    )
    return tune.with_resources(bound, TRIAL_DRIVER_RESOURCES)


def rows_changing_keys(settings: SweepSettings) -> list[str]:
    """Searched keys that change which training rows a trial decodes, or how: then the trials
    cannot share one decoded copy.

    >>> from service.config import load_config
    >>> from service.tune.settings import resolve_settings
    >>> space = {"loss.temperature": {"type": "choice", "values": [0.1, 0.2]},
    ...          "data.limit": {"type": "choice", "values": [256, 512]}}
    >>> rows_changing_keys(resolve_settings(load_config(overrides={"tune.space": space})))
    ['data.limit']
    """
    return [k for k in settings.specs if k.startswith(("data.", "text.")) or k == "train.seed"]


def _sweep_decoded(config: Config, settings: SweepSettings) -> Any:
    """One decoded copy of the training rows for every trial (Ray's object store), or None.

    Valid only when no searched key changes the rows (``rows_changing_keys``); each worker still
    checks the copy's key against its own config and refuses other rows.
    """
    from service.data.decoded import share_training_rows

    changing = rows_changing_keys(settings)
    if changing:
        _progress(
            f"data: no decoded copy shared across trials: the searched {changing} change the "
            f"training rows (a multi-worker trial still decodes once for its ranks)"
        )
        return None
    shared, why = share_training_rows(config)
    _progress(f"data: one decoded copy for every trial: {why}" if shared else f"data: {why}")
    return shared


def _reconcile_runs(
    records: list[TrialRecord], errors: dict[str, str], uri: str, parent_run_id: str
) -> None:
    """Give every nested run its final status: ASHA-stopped trials were killed mid-run (their
    function never returned) and trials whose actor died never got to mark themselves."""
    from service.tracking.run import backfill_epochs, mlflow_client
    from service.tune.trial import ERROR_TAG, OUTCOME_TAG, mark_failed, trial_runs

    client = mlflow_client(uri)
    runs = trial_runs(uri, parent_run_id)
    for record in records:
        run = runs.get(record.trial_id)
        if run is None:
            continue
        record.run_id = run.info.run_id
        if record.epochs:
            # ASHA may stop a trial on the very report that rank 0 was about to log to MLflow;
            # Tune kept every report, so the driver fills the gap.
            backfill_epochs(client, record.run_id, record.epochs)
        tagged = run.data.tags.get(OUTCOME_TAG)
        if record.outcome == "failed":
            if run.info.status == "RUNNING":
                mark_failed(
                    TrackedRun(uri, record.run_id), errors.get(record.trial_id) or record.error
                )
        elif run.info.status == "RUNNING" or tagged != record.outcome:
            # Tune's view wins: a stopped trial whose run was left RUNNING, or marked failed by
            # a trial that saw its controller die while Tune was stopping it.
            if ERROR_TAG in run.data.tags:
                client.delete_tag(record.run_id, ERROR_TAG)
            client.set_tag(record.run_id, OUTCOME_TAG, record.outcome)
            client.set_terminated(record.run_id, status="FINISHED")


def _log_parent(
    tracking: TrackedRun | None,
    settings: SweepSettings,
    records: list[TrialRecord],
    best: TrialRecord | None,
    totals: dict[str, float],
    workdir: Path,
) -> None:
    from service.tracking.run import mlflow_client

    logger = tracking.logger()
    metric = settings.metric
    logger.log_artifact(write_csv(records, metric, workdir / "sweep_summary.csv"), "sweep")
    markdown = workdir / "sweep_summary.md"
    markdown.write_text(to_markdown(records, metric))
    logger.log_artifact(markdown, "sweep")
    figure = plot_sweep(records, settings.specs, metric, workdir / "sweep.png", best)
    logger.log_artifact(figure, "sweep")
    curves = workdir / "sweep_curves.png"
    plot_curves(records, metric, settings.time_attr, settings.rungs, curves, best)
    logger.log_artifact(curves, "sweep")
    summary = dict(totals)
    if best is not None and best.metric is not None:
        summary[f"best_{metric}"] = best.metric
    logger.log_metrics({k: float(v) for k, v in summary.items()}, step=0)
    logger.flush()
    if best is not None:
        client = mlflow_client(tracking.uri)
        client.set_tag(tracking.run_id, "tune_best_trial_id", best.trial_id)
        if best.run_id:
            client.set_tag(tracking.run_id, "tune_best_run_id", best.run_id)


def _open_parent(config: Config, settings: SweepSettings, state: dict[str, Any] | None) -> Any:
    """Create the sweep's parent run (or reopen it on resume)."""
    from service.tracking.run import mlflow_client, open_run

    if state is not None and state.get("parent_run_id"):
        return TrackedRun(uri=state["tracking_uri"], run_id=state["parent_run_id"]).reopen()
    tracking = open_run(config, run_name=settings.name)
    if tracking is not None:
        client = mlflow_client(tracking.uri)
        client.set_tag(tracking.run_id, "tune_sweep", settings.name)
        client.set_tag(tracking.run_id, "tune_role", "parent")
        client.set_tag(tracking.run_id, "tune_experiment_path", str(settings.experiment_path))
        from service.tracking.runs import log_params

        resolved = {
            "sweep.metric": settings.metric,
            "sweep.mode": settings.mode,
            "sweep.searched_keys": ",".join(settings.specs),
            **{f"sweep.{k}": v for k, v in settings.resources.as_dict().items()},
        }
        log_params(client, tracking.run_id, resolved)
    return tracking


def run_sweep(
    config: Config,
    *,
    num_samples: int | None = None,
    address: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the sweep described by ``config.tune``; returns the JSON summary."""
    from service.train.driver import check_cluster_fits, check_local_fits, connect_ray
    from service.train.preflight import preflight

    preflight(config)  # its data (its rules: load_checked_config); the space: resolve_settings
    settings = resolve_settings(config, num_samples)  # bad input fails here, before Ray
    state: dict[str, Any] | None = None
    if resume:
        state = _load_state(settings)
        config = config_from_dict(state["config"])  # the sweep's own config, not today's file
        settings = resolve_settings(config, state["num_samples"])
        _progress(f"resuming sweep {settings.name!r} from {settings.experiment_path}")
    else:
        _refuse_existing(settings)
    config = trial_base_config(config, settings)
    # An embedded Ray is sized to this machine: what cannot fit it is refused before anything.
    check_local_fits(config, address, trials=settings.resources.concurrent_trials)
    if config.mlflow.enabled:
        from service.tracking.uri import check_tracking_server, resolve_tracking_uri

        # Pin one absolute URI for every trial (a relative SQLite default would follow each
        # trial actor's working directory), and fail on an unreachable server before Ray starts.
        config.mlflow.tracking_uri = resolve_tracking_uri(config.mlflow)
        check_tracking_server(config.mlflow.tracking_uri)

    _preload_modules()
    connect_ray(address)
    check_cluster_fits(config, trials=settings.resources.concurrent_trials)
    tracking = _open_parent(config, settings, state)
    with ending_on_error(tracking):  # FAILED on any error, incl. "every trial failed"
        state = state or {
            "name": settings.name,
            "config": config.to_dict(),
            "num_samples": settings.num_samples,
            "parent_run_id": tracking.run_id if tracking else None,
            "tracking_uri": tracking.uri if tracking else None,
        }
        _save_state(settings, state)
        return _run_and_summarise(config, settings, tracking, state, resume)


def _run_and_summarise(
    config: Config,
    settings: SweepSettings,
    tracking: TrackedRun | None,
    state: dict[str, Any],
    resume: bool,
) -> dict[str, Any]:
    from ray import tune

    decoded_ref = _sweep_decoded(config, settings)  # held here until every trial has ended
    trainable = _trainable(config, settings, tracking.run_id if tracking else None, decoded_ref)
    if resume:
        tuner = tune.Tuner.restore(
            str(settings.experiment_path),
            trainable,
            resume_unfinished=True,  # trials cut off with the driver restart from their checkpoint
            resume_errored=False,  # failed trials stay failed (a NaN would only NaN again)
            restart_errored=False,
        )
    else:
        tuner = _build_tuner(settings, trainable)
    _progress(
        f"{settings.num_samples} trial(s), {settings.resources.concurrent_trials} at a time x "
        f"{settings.resources.workers_per_trial} workers; {settings.search} search, ASHA on "
        f"{settings.metric} ({settings.mode}) from {settings.grace_period:g} {settings.rung_unit}"
        + (
            ""
            if settings.wall_budget_minutes is None
            else f"; the sweep stops after {settings.wall_budget_minutes:g} min wall"
        )
    )
    from service.tune.progress import quiet_tune_output

    with quiet_tune_output():
        grid = tuner.fit()

    records = [
        record_from_result(
            r,
            settings.specs,
            settings.metric,
            settings.max_epochs,
            settings.budget_minutes,
            settings.max_steps,
        )
        for r in grid
    ]
    errors = {
        str((r.metrics or {}).get("trial_id")): str(r.error) for r in grid if r.error is not None
    }
    best = pick_best(records, settings.mode)
    totals = sweep_totals(records, settings.budget_minutes)
    summary: dict[str, Any] = {
        "sweep": settings.name,
        "experiment_path": str(settings.experiment_path),
        "metric": settings.metric,
        "mode": settings.mode,
        "search": settings.search,
        "best_config": best.params if best else None,
        "best_metric": best.metric if best else None,
        "best_trial_id": best.trial_id if best else None,
        "best_checkpoint": best.checkpoint if best else None,
        **totals,
        "parent_run_id": tracking.run_id if tracking else None,
        "tracking_uri": tracking.uri if tracking else None,
        "model_uri": None,
        "resources": settings.resources.as_dict(),
    }
    if tracking is not None:
        _reconcile_runs(records, errors, tracking.uri, tracking.run_id)
        summary["best_run_id"] = best.run_id if best else None
        with tempfile.TemporaryDirectory() as tmp:
            _log_parent(tracking, settings, records, best, totals, Path(tmp))
            if best is not None:
                summary.update(_register_best(config, settings, state, best, tracking, Path(tmp)))
    summary["trials"] = [
        {
            "trial_id": r.trial_id,
            "outcome": r.outcome,
            "params": r.params,
            "epochs": r.epochs_completed,
            settings.metric: r.metric,
            "error": r.error or None,
        }
        for r in records
    ]
    if best is None:
        reasons = sorted({r.error for r in records if r.error})
        raise SweepFailedError(
            f"all {len(records)} trial(s) of sweep {settings.name!r} failed or reported no "
            f"{settings.metric}; reasons: {reasons}. Details: {settings.experiment_path}"
        )
    return summary


def _register_best(
    config: Config,
    settings: SweepSettings,
    state: dict[str, Any],
    best: TrialRecord,
    tracking: TrackedRun | None,
    workdir: Path,
) -> dict[str, Any]:
    """Finalize the best trial's run (plots, test embedding) and register its encoder with the
    alias rules. Idempotent on resume: the same best trial is not registered twice."""
    from service.train.finalize import finalize_run

    done = state.get("registered") or {}
    if done.get("trial_id") == best.trial_id:
        return {k: v for k, v in done.items() if k != "trial_id"}
    if not best.run_id or not best.checkpoint or not config.mlflow.registered_model_name:
        return {}
    _progress(f"registering the best trial {best.trial_id} ({settings.metric}={best.metric})")
    best_config = config.with_values(best.params)
    best_run = TrackedRun(tracking.uri, best.run_id)
    result = finalize_run(best_config, best_run, best.checkpoint, workdir)
    registered = {k: result.get(k) for k in ("model_uri", "version", "champion")}
    state["registered"] = {"trial_id": best.trial_id, **registered}
    _save_state(settings, state)
    return registered
