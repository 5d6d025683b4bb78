"""The per-worker training function that Ray Train's ``TorchTrainer`` runs on every rank.

``train_func`` reads as: set up (state, batches, logging) → epoch 0 (the validation monitor at
random init) → for each epoch, ``train_step`` over its batches → end of epoch (monitor, report +
checkpoint, MLflow). Only rank 0 writes checkpoints, logs to MLflow and prints progress.

With ``train.time_budget_minutes`` the loop stops after the step at which rank 0's training
clock (shared with every rank, ``service.train.budget``) reaches the budget, with
``train.max_steps`` after that many optimizer steps (``TrainState.finished``: whichever first);
that last, partial epoch is reported with a checkpoint like a last epoch. ``train.epochs`` is then
an upper bound.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from service.console import say
from service.models import unwrap
from service.train.batches import TrainBatches
from service.train.checkpoint import load_state, restore_training_state
from service.train.epoch import (
    EpochMeter,
    Monitor,
    StepProgress,
    budget_note,
    build_monitor,
    epoch_summary,
    flag_collapse,
    report_epoch,
)
from service.train.faults import maybe_kill, maybe_pause
from service.train.inputs import WorkerInputs
from service.train.optim import schedule_steps
from service.train.state import TrainState, build_state
from service.train.step import train_step

log = logging.getLogger("service.train")


def _say(s: TrainState, message: str) -> None:
    if s.rank == 0:
        say("train", message)


def node_ids(world_size: int) -> list[str]:
    """Ray node id of every rank (collective). Ray Train's ``node_rank`` groups workers by IP,
    which cannot tell two Ray nodes on one host apart; the node id can."""
    node_id = ray.get_runtime_context().get_node_id()
    if world_size == 1 or not dist.is_initialized():
        return [node_id]
    ids: list[Any] = [None] * world_size
    dist.all_gather_object(ids, node_id)
    return [str(i) for i in ids]


def setup(inputs: WorkerInputs) -> tuple[TrainState, TrainBatches]:
    """Seed, data, model (DDP) + loss + optimizer, and the checkpoint to resume from, if any."""
    config = inputs.config
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.train.seed + rank)
    batches = TrainBatches(inputs, rank, world)
    s = build_state(
        config, ray.train.torch.get_device(), batches.steps_per_epoch, rank=rank, world=world,
        wrap=ray.train.torch.prepare_model,  # DDP (gloo on CPU, NCCL on GPU) + device move
        run_dir=inputs.run_dir,
    )  # fmt: skip
    ids = node_ids(world)
    s.num_nodes = len(set(ids))
    _say(s, f"{world} worker(s) on {s.num_nodes} Ray node(s): {ids}")
    t = config.train
    if s.clock.budgeted:
        ignored = f"; train.warmup_epochs={t.warmup_epochs:g} not used" if t.warmup_epochs else ""
        _say(s, f"time budget {s.clock.budget_s / 60:g} min of training, LR warmup over "
                f"{t.warmup_fraction:g} of it then cosine{ignored}")  # fmt: skip
    if t.max_steps is not None:
        spe = batches.steps_per_epoch
        over = "" if s.clock.budgeted else f", LR schedule over {schedule_steps(t, spe)} steps"
        _say(s, f"at most {t.max_steps} optimizer steps (train.max_steps){over}")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            restore_training_state(s, load_state(ckpt_dir, map_location=s.device))
        if rank == 0:  # s.epoch (0-based, the next one) = epochs completed
            log.warning("resumed from checkpoint after epoch %d (step %d, %.1f min of training)",
                        s.epoch, s.global_step, s.clock.elapsed_s / 60)  # fmt: skip
    return s, batches


def _run_logger(inputs: WorkerInputs, s: TrainState, resumed: bool) -> Any:
    """Rank 0's MLflow logger; after a restart it backfills the epochs the run lacks."""
    if s.rank != 0 or not inputs.mlflow_run_id:
        return None
    from service.tracking.run import TrackedRun, backfill_epochs
    from service.tracking.uri import fast_fail_http

    run = TrackedRun(inputs.tracking_uri or "", inputs.mlflow_run_id)
    logger = run.logger()
    logger.set_tags({"num_nodes": s.num_nodes})
    if resumed:  # each restart (worker failure or resubmitted job) is visible in the run
        # value: the epochs completed (1-based, as everywhere people see epochs)
        logger.log_metrics({"resumed_from_epoch": s.epoch}, step=s.global_step)
        try:
            with fast_fail_http(5.0):
                filled = backfill_epochs(run.client(), run.run_id, s.history)
            if filled:
                log.warning("backfilled MLflow metrics of epochs %s", filled)
        except Exception as exc:  # unreachable server: training must go on
            log.warning("could not read MLflow to backfill epoch metrics (%s); skipped", exc)
    return logger


def _log_step(s: TrainState, logger: Any, loss: float, meter: EpochMeter) -> None:
    """Per-step charts under ``step/`` (the per-epoch values keep the plain names)."""
    if logger is not None and s.global_step % s.config.train.log_every_steps == 0:
        logger.log_metrics(
            {"step/loss": loss, "step/lr": s.scheduler.get_last_lr()[0],
             "step/temperature": float(s.criterion.temperature),
             "step/images_per_s": meter.window_rate()},
            step=s.global_step,
        )  # fmt: skip


def _show_progress(s: TrainState, progress: StepProgress | None, loss: float, images: int) -> None:
    if progress is not None:
        max_steps = s.config.train.max_steps
        left = None if max_steps is None else max_steps - s.global_step
        line = progress.update(s.epoch_step, loss, images, s.clock.remaining_s, left)
        if line is not None:
            _say(s, line)


def _step0_check(s: TrainState, loss: float) -> None:
    """Seeds §7.4, made to hold at small temperatures: the first loss against log(candidates)
    plus the spread of the first batch's similarities; flags only what a healthy random-init
    start cannot show (``service.losses.initial``)."""
    if s.global_step != 1:
        return
    c = s.config
    report = s.criterion.initial_loss_report(loss, c.augment.n_views, c.train.global_batch_size)
    if report is not None:
        _say(s, report.line())


def _log_epoch(logger: Any, metrics: dict[str, Any]) -> None:
    if logger is not None:
        from service.tracking.run import log_epoch

        log_epoch(logger, metrics)


@contextmanager
def monitor_threads(s: TrainState) -> Iterator[None]:
    """Rank 0 evaluates while the other ranks on its node wait for its report: it borrows their
    CPUs for that time (``cpus_per_worker`` x ranks on the node), then gives them back."""
    threads = torch.get_num_threads()
    local_world = ray.train.get_context().get_local_world_size()
    borrowed = max(threads, int(s.config.train.cpus_per_worker * local_world))
    torch.set_num_threads(borrowed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _evaluate(s: TrainState, monitor: Monitor) -> dict[str, float]:
    """The monitor's metrics of the unwrapped training model, with the node's idle threads."""
    with monitor_threads(s):
        return monitor(unwrap(s.model), s.device)


def random_init_epoch(s: TrainState, monitor: Monitor | None, logger: Any) -> None:
    """Epoch 0: the monitor's metrics of the randomly initialised model (history + MLflow at
    step 0), so curves start from the random-init value. Not ``ray.train.report``-ed: Tune's
    iterations stay the trained epochs."""
    if monitor is None or s.global_step != 0:
        return
    metrics: dict[str, Any] = {"epoch": 0, "global_step": 0, "num_nodes": s.num_nodes}
    metrics.update(_evaluate(s, monitor))
    s.history.append(metrics)
    _log_epoch(logger, metrics)
    _say(s, epoch_summary(metrics, None) + " (random init)")  # health measured, not judged


def end_of_epoch(
    s: TrainState, meter: EpochMeter, monitor: Monitor | None, logger: Any, final: bool = False
) -> None:
    """Monitor (when due, and always on the ``final`` epoch), report + checkpoint, then MLflow:
    logged after the checkpoint is persisted, so a restart never duplicates an epoch."""
    metrics = {**meter.epoch_metrics(s), "num_nodes": s.num_nodes}
    if monitor is not None and (final or monitor.due(metrics["epoch"])):
        metrics.update(_evaluate(s, monitor))
    s.history.append(metrics)
    report_epoch(s, metrics, final=final)
    _log_epoch(logger, metrics)
    budgeted = s.clock.budgeted
    line = epoch_summary(metrics, None if budgeted else s.config.train.epochs)
    _say(s, f"{line} {budget_note(s.clock.elapsed_s, s.clock.budget_s)}" if budgeted else line)
    if s.rank == 0:
        flag_collapse(metrics, s.config.model.proj_out_dim, logger)


def run_epoch(
    s: TrainState,
    batches: TrainBatches,
    logger: Any,
    progress: StepProgress | None,
    fault_dir: Path,
) -> EpochMeter:
    """``train_step`` over epoch ``s.epoch``'s batches; stops early when the budget is spent or
    ``train.max_steps`` reached (``s.finished``).
    The clock counts this epoch's data and steps, not what follows (monitor, checkpoint)."""
    meter, s.epoch_step = EpochMeter(), 0
    s.model.train()
    if progress is not None:
        progress.start_epoch(s.epoch)
    s.clock.resume()
    for views, labels in meter.timed(batches.epoch(s.epoch)):
        maybe_kill(s.config.fault, s.rank, s.global_step, fault_dir)  # drills only
        loss = train_step(s, views, labels)  # labels reach only losses that need them
        s.clock.sync()  # rank 0's training seconds on every rank: same LR, same stop
        images = views[0].shape[0] * s.world
        meter.update(loss, images)
        _step0_check(s, loss)
        _log_step(s, logger, loss, meter)
        _show_progress(s, progress, loss, images)
        if s.finished:  # time budget spent or train.max_steps reached: same step on every rank
            break
    s.clock.pause()
    meter.finish()
    _slowest_data_wait(s, meter)
    return meter


def _slowest_data_wait(s: TrainState, meter: EpochMeter) -> None:
    """The largest data wait (seconds, fraction) over the ranks, into ``meter.data_wait_max``:
    one all-reduce per epoch (every rank runs the same steps, so every rank gets here)."""
    wait = torch.tensor([meter.data_wait_s, meter.data_wait_fraction()], dtype=torch.float64)
    if s.world > 1 and dist.is_initialized():
        if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
            wait = wait.to(s.device)
        dist.all_reduce(wait, op=dist.ReduceOp.MAX)
    seconds, fraction = wait.tolist()
    meter.data_wait_max = (seconds, fraction)


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``loop_config["inputs"]`` is a :class:`WorkerInputs`."""
    inputs: WorkerInputs = loop_config["inputs"]
    s, batches = setup(inputs)
    t = s.config.train
    logger = _run_logger(inputs, s, resumed=s.global_step > 0)
    monitor = build_monitor(s.config, inputs.tokenizer_json) if s.rank == 0 else None
    random_init_epoch(s, monitor, logger)
    progress = None
    if s.rank == 0:
        progress = StepProgress(t.epochs, batches.steps_per_epoch, budgeted=s.clock.budgeted)
    for epoch in range(s.epoch, t.epochs):
        if s.finished:  # resumed after its budget or max_steps was spent: nothing left to train
            break
        maybe_pause(s.config.fault, epoch + 1, inputs.fault_marker_dir)  # drills only
        s.epoch = epoch
        meter = run_epoch(s, batches, logger, progress, inputs.fault_marker_dir)
        end_of_epoch(s, meter, monitor, logger, final=s.finished or epoch == t.epochs - 1)
        if s.finished:
            break
    if logger is not None:
        logger.flush()
