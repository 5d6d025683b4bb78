"""Driver side of pretraining: connect to Ray, build the ``TorchTrainer``, fit, then finalise.

Finalising (on the driver, after the workers are gone): final kNN on the test split, plots and the
augmentation preview into MLflow, and registration of the backbone under the configured name.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from service.config import Config, ConfigError
from service.console import (
    EMBEDDED_QUIET_ACTORS,
    filter_ray_worker_output,
    quiet_embedded_ray,
    say,
)
from service.data.pipeline import prepare
from service.tracking.run import TrackedRun, ending_on_error
from service.train.finalize import finalize_run
from service.train.identity import (
    RunPlan,
    data_fingerprint,
    latest_checkpoint,
    plan_run,
    write_record,
)
from service.train.inputs import WorkerInputs, resolve_storage_path
from service.train.loop import train_func
from service.train.preflight import preflight


class ClusterTooSmallError(RuntimeError):
    """The requested workers × CPUs/GPUs do not fit the Ray cluster."""


class PretrainingFailedError(RuntimeError):
    """Training failed on the workers; the message carries their error."""


def embedded(address: str | None = None) -> bool:
    """Whether ``connect_ray(address)`` would start a local Ray (no address, no ``$RAY_ADDRESS``,
    no Ray already up in this process)."""
    return not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def local_cpus() -> int:
    """CPUs an embedded Ray gets: the ones this process may run on (a CPU set, e.g. a
    container's, not the host's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def connect_ray(address: str | None = None) -> None:
    """Join the cluster at ``address`` / ``$RAY_ADDRESS`` (``ray job submit`` sets it), else
    start an embedded local Ray sized to this machine (``check_local_fits`` refused a run that
    does not fit it before anything started)."""
    if ray.is_initialized():
        return
    if not embedded(address):
        ray.init(address=address, log_to_driver=True)
        filter_ray_worker_output()
        return
    # No notice that Ray enabled its token auth, no worker line twice (Train's print patch):
    # the workers of an embedded Ray inherit this process's environment.
    quiet_embedded_ray()
    cpus = local_cpus()
    say("ray", f"starting a local Ray ({cpus} CPUs)...")
    started = time.monotonic()
    ray.init(num_cpus=cpus, include_dashboard=False)
    filter_ray_worker_output(quiet_actors=EMBEDDED_QUIET_ACTORS)
    say("ray", f"ready in {time.monotonic() - started:.0f} s")


def train_log_level() -> str:
    """Console level of Ray Train's own loggers: WARNING (its INFO lines — resources requested,
    process group, "Reporting training result …" per worker and epoch — stay in the session's
    logs/train/ files); ``CONTRASTIVE_RAY_TRAIN_LOG_LEVEL=INFO`` brings them back."""
    return os.environ.get("CONTRASTIVE_RAY_TRAIN_LOG_LEVEL", "WARNING").upper()


def fit_problems(
    config: Config, cpus: float, gpus: float, *, trials: int = 1, where: str = "the Ray cluster"
) -> list[str]:
    """Why trials x workers x resources do not fit ``cpus`` / ``gpus`` (empty when they do).

    >>> from service.config import Config
    >>> fit_problems(Config(), cpus=2, gpus=0)
    []
    >>> fit_problems(Config(), cpus=2, gpus=0, trials=2)  # doctest: +ELLIPSIS
    ['2 trial(s) x 2 workers x 1 CPUs = 4 CPUs needed, the Ray cluster has 2; lower ...']
    """
    t, problems = config.train, []
    need_cpu = trials * t.num_workers * t.cpus_per_worker
    runs, lower = (
        (f"{trials} trial(s) x ", " / tune.max_concurrent_trials") if trials > 1 else ("", "")
    )
    if cpus < need_cpu:
        problems.append(
            f"{runs}{t.num_workers} workers x {t.cpus_per_worker:g} CPUs = {need_cpu:g} CPUs "
            f"needed, {where} has {cpus:g}; lower train.num_workers / train.cpus_per_worker{lower}"
        )
    # Ray Data's decode/augment tasks need a CPU of their own beside the Train workers.
    elif config.data.reader == "ray" and cpus < need_cpu + trials:
        problems.append(
            f"data.reader=ray needs at least one CPU per run for decoding/augmentation beside "
            f"the {need_cpu:g} CPUs of the Train workers; {where} has {cpus:g}"
        )
    if t.use_gpu and gpus < trials * t.num_workers:
        problems.append(
            f"{runs}{t.num_workers} workers x 1 GPU = {trials * t.num_workers} GPUs needed "
            f"(train.use_gpu=true), {where} has {gpus:g}; set train.use_gpu=false or lower "
            f"train.num_workers{lower}"
        )
    return problems


def check_cluster_fits(config: Config, trials: int = 1) -> None:
    """Fail before training when trials x workers x resources exceed the cluster's totals."""
    total = ray.cluster_resources()
    problems = fit_problems(config, total.get("CPU", 0), total.get("GPU", 0), trials=trials)
    if problems:
        raise ClusterTooSmallError("; ".join(problems) + "; or add nodes")


def check_local_fits(config: Config, address: str | None = None, trials: int = 1) -> None:
    """Before an embedded Ray starts (and before any MLflow run or run folder): refuse what this
    machine cannot run, as bad input. A cluster (``address``, ``$RAY_ADDRESS``) is checked once
    connected (``check_cluster_fits``)."""
    if not embedded(address):
        return
    import torch

    where = "this machine (a local Ray is sized to it)"
    problems = fit_problems(
        config, local_cpus(), torch.cuda.device_count(), trials=trials, where=where
    )
    if problems:
        raise ConfigError(
            "; ".join(problems) + "; or pass --address of a Ray cluster that has them"
        )


def build_trainer(
    config: Config,
    *,
    run: TrackedRun | None = None,
    storage_path: str | None = None,
    run_name: str | None = None,
    tokenizer_json: str | None = None,
    decoded_ref: Any = None,
    train_loop: Callable[[dict[str, Any]], None] = train_func,
    loop_extras: dict[str, Any] | None = None,
    with_data: bool = True,
) -> TorchTrainer:
    """The ``TorchTrainer`` for one pretraining run (also used by each Tune trial, and with
    another ``train_loop`` and ``loop_extras`` beside the inputs by ``contrastive check``;
    ``with_data=False``: a loop that reads no training data, nothing prepared).

    Image–text mode: ``tokenizer_json`` is the run's tokenizer; when not given (a Tune trial)
    it is fitted here, on the training captions, before any worker starts.
    The data path is decided here, once (``service.data.pipeline.prepare``): ``decoded_ref`` is
    a decoded copy of the training rows shared by the caller (the Tune driver, for all its
    trials); when not given and several ranks would each decode, it is made here.
    """
    t = config.train
    data = None
    if with_data:
        data = prepare(config, world=t.num_workers, shared=decoded_ref, share=ray.is_initialized())
        say("data", data.reason)
    if tokenizer_json is None and config.text.column:
        from service.text import fit_tokenizer

        tokenizer_json = fit_tokenizer(config).to_json()
    inputs = WorkerInputs(
        config=config,
        storage_path=resolve_storage_path(storage_path or t.storage_path),
        run_name=run_name or t.run_name,
        mlflow_run_id=run.run_id if run else None,
        tracking_uri=run.uri if run else None,
        tokenizer_json=tokenizer_json,
        data=data.for_workers() if data else None,
    )
    return TorchTrainer(
        train_loop,
        train_loop_config={"inputs": inputs, **(loop_extras or {})},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
            placement_strategy=t.placement_strategy,
        ),
        run_config=RunConfig(
            name=inputs.run_name,
            storage_path=inputs.storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level=train_log_level()),
        ),
        datasets=data.datasets if data else None,
    )


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """Run the trainer; worker errors become one readable ``PretrainingFailedError``."""
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise PretrainingFailedError(f"pretraining failed: {exc}") from exc


def run_pretraining(config: Config, address: str | None = None) -> dict[str, Any]:
    """Pretrain end to end; returns the JSON summary printed by ``contrastive pretrain``.

    Config and data are checked first (``preflight``), run identity next (new / resume /
    already done, see ``identity.plan_run``), then the MLflow run is opened — or the recorded
    one reopened — so an unreachable server fails before any training; it ends FAILED on any
    error after that, FINISHED once the encoder is evaluated and registered.
    """
    preflight(config)  # before MLflow or Ray; what load_checked_config checked is not re-run
    plan = plan_run(config)
    if plan.kind == "done":
        return _already_done(config, plan)
    check_local_fits(config, address)  # an embedded Ray: what this machine has, known now
    start_over(plan)
    with ending_on_error(_open_or_reopen(config, plan)) as run:
        write_record(plan.run_dir, _record(config, run))
        tokenizer_json = run_tokenizer_json(config, plan.run_dir)  # image–text mode only
        connect_ray(address)
        check_cluster_fits(config)
        result = fit(build_trainer(config, run=run, tokenizer_json=tokenizer_json))
        summary = _summary(config, result)
        # finalize reads the checkpoint from local disk: as_directory() is the directory itself
        # on a local/shared filesystem and a temporary download from an object store.
        local = result.checkpoint.as_directory() if result.checkpoint else nullcontext()
        with tempfile.TemporaryDirectory() as workdir, local as local_dir:
            # before finalize: the numbers are in the run even if registration fails
            summary.update(image_text_evaluation(config, run, local_dir, tokenizer_json))
            summary.update(finalize_run(config, run, local_dir, Path(workdir), tokenizer_json))
    return summary


TOKENIZER_FILE = "tokenizer.json"


def start_over(plan: RunPlan) -> None:
    """A run whose earlier attempt never reached its first checkpoint starts again as new: say
    so, and drop what the attempt left that this one would reuse (its tokenizer, fitted on its
    captions). The attempt's MLflow run stays as it ended (FAILED); a new one is opened."""
    if plan.kind != "new" or not plan.note:
        return
    from pyarrow import fs

    print(f"[pretrain] {plan.note}", file=sys.stderr)
    filesystem, folder = fs.FileSystem.from_uri(resolve_storage_path(plan.run_dir))
    tokenizer = f"{folder.rstrip('/')}/{TOKENIZER_FILE}"
    if filesystem.get_file_info(tokenizer).type == fs.FileType.File:
        filesystem.delete_file(tokenizer)


def run_tokenizer_json(config: Config, run_dir: str) -> str | None:
    """Image–text mode: the run's tokenizer as JSON, fitted on the training captions on the
    driver (before Ray starts) and saved as ``<run_dir>/tokenizer.json``; a resumed run reuses
    the saved one, so its token ids never change. None in image-only mode."""
    if not config.text.column:
        return None
    from pyarrow import fs

    from service.text import fit_tokenizer

    filesystem, folder = fs.FileSystem.from_uri(resolve_storage_path(run_dir))
    path = f"{folder.rstrip('/')}/{TOKENIZER_FILE}"
    if filesystem.get_file_info(path).type == fs.FileType.File:
        with filesystem.open_input_stream(path) as stream:
            return stream.read().decode()
    print("[pretrain] fitting the tokenizer on the training captions", file=sys.stderr)
    text = fit_tokenizer(config).to_json()
    filesystem.create_dir(folder, recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())
    return text


def image_text_evaluation(
    config: Config, run: TrackedRun | None, checkpoint_dir: str | None, tokenizer_json: str | None
) -> dict[str, Any]:
    """Image–text mode: ``test_*`` zero-shot/retrieval metrics of the final model on
    ``data.test`` beside ``random_*`` (same architecture, seeded random init), into the MLflow
    run (at the last global step) and the summary."""
    if not (config.text.column and config.data.test and checkpoint_dir and tokenizer_json):
        return {}
    from service.eval.image_text import evaluate_beside_random_init
    from service.models import build_training_model
    from service.text import Tokenizer
    from service.train.checkpoint import load_state

    saved = load_state(checkpoint_dir)
    model = build_training_model(config)
    model.load_state_dict(saved["model"])
    metrics = evaluate_beside_random_init(
        model, Tokenizer.from_json(tokenizer_json), config, lambda: build_training_model(config)
    )
    if run is not None and metrics:
        logger = run.logger()
        logger.log_metrics(metrics, step=int(saved["global_step"]))
        logger.flush()
    return metrics


def _open_or_reopen(config: Config, plan: RunPlan) -> TrackedRun | None:
    from service.tracking.run import open_run
    from service.tracking.uri import check_tracking_server

    if plan.kind == "resume" and plan.mlflow_run_id and plan.tracking_uri:
        check_tracking_server(plan.tracking_uri)
        run = TrackedRun(plan.tracking_uri, plan.mlflow_run_id).reopen()
        run.set_tags({"resumed_with_epochs": str(config.train.epochs)})
        done = 0 if plan.last_epoch is None else plan.last_epoch + 1  # epochs count from 1
        print(f"[pretrain] resuming run {config.train.run_name!r} after epoch "
              f"{done} (MLflow run {run.run_id})", file=sys.stderr)  # fmt: skip
        return run
    return open_run(config)


def _record(config: Config, run: TrackedRun | None) -> dict[str, Any]:
    return {
        "run_name": config.train.run_name,
        "data_fingerprint": data_fingerprint(config.data.train),
        "mlflow_run_id": run.run_id if run else None,
        "tracking_uri": run.uri if run else None,
        "config": config.to_dict(),
    }


def _already_done(config: Config, plan: RunPlan) -> dict[str, Any]:
    """Resuming a finished run with unchanged epochs: nothing to train, nothing registered."""
    message = (
        f"run {config.train.run_name!r} already trained all {config.train.epochs} epochs; nothing "
        f"to do (raise train.epochs to train more)"
    )
    t = config.train
    trained = t.epochs if plan.last_epoch is None else plan.last_epoch + 1
    if trained < t.epochs:  # stopped early: its time budget or train.max_steps is spent
        spent = (
            f"time budget of {t.time_budget_minutes:g} min" if t.time_budget_minutes
            else f"train.max_steps={t.max_steps} optimizer steps"
        )  # fmt: skip
        message = (
            f"run {t.run_name!r} already spent its {spent}; nothing to do (it shapes the LR "
            f"schedule, so a longer one is a new run under another train.run_name)"
        )
    print(f"[pretrain] {message}", file=sys.stderr)
    return {
        "run_name": config.train.run_name,
        "status": "already_finished",
        "message": message,
        "checkpoint": latest_checkpoint(plan.run_dir),
        "run_id": plan.mlflow_run_id,
        "epochs": trained,
    }


def _summary(config: Config, result: ray.train.Result) -> dict[str, Any]:
    t = config.train
    return {
        "run_name": t.run_name,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "storage_path": resolve_storage_path(t.storage_path),
        "epochs": int(result.metrics.get("epoch", t.epochs)),  # fewer when a time budget ran out
        "global_step": result.metrics.get("global_step"),  # optimizer steps (train.max_steps)
        "world_size": t.num_workers,
        "global_batch_size": t.global_batch_size,
        "per_worker_batch_size": config.per_worker_batch_size,
        "train_loss": result.metrics.get("train_loss"),
        "knn_top1": result.metrics.get("knn_top1"),
    }
