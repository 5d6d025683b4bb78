"""The per-worker training function that Ray Train's ``TorchTrainer`` runs on every rank.

``train_func`` reads as: set up (state, batches, logging) → for each epoch, ``train_step`` over
its batches → end of epoch (kNN, report + checkpoint, MLflow). Only rank 0 writes checkpoints
and logs to MLflow.
"""

from __future__ import annotations

import logging
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from service.models import unwrap
from service.train.batches import TrainBatches
from service.train.checkpoint import load_state, restore_training_state
from service.train.epoch import EpochMeter, KnnMonitor, report_epoch
from service.train.faults import maybe_kill
from service.train.inputs import WorkerInputs
from service.train.state import TrainState, build_state
from service.train.step import train_step

log = logging.getLogger("service.train")


def _say(s: TrainState, message: str) -> None:
    if s.rank == 0:
        print(f"[train] {message}", flush=True)


def _node_ids(world_size: int) -> list[str]:
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
    node_ids = _node_ids(world)
    s.num_nodes = len(set(node_ids))
    _say(s, f"{world} worker(s) on {s.num_nodes} Ray node(s): {node_ids}")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            restore_training_state(s, load_state(ckpt_dir, map_location=s.device))
        if rank == 0:
            log.warning("resumed from checkpoint after epoch %d (step %d)", s.epoch - 1,
                        s.global_step)  # fmt: skip
    return s, batches


def _run_logger(inputs: WorkerInputs, s: TrainState, resumed: bool) -> Any:
    """Rank 0's MLflow logger; after a restart it backfills the epochs the run lacks."""
    if s.rank != 0 or not inputs.mlflow_run_id:
        return None
    from service.tracking.run import TrackedRun, backfill_epochs
    from service.tracking.uri import fast_fail_http

    run = TrackedRun(inputs.tracking_uri or "", inputs.mlflow_run_id)
    logger = run.logger()
    if resumed:  # each restart (worker failure or resubmitted job) is visible in the run
        logger.log_metrics({"resumed_from_epoch": s.epoch - 1}, step=s.global_step)
        try:
            with fast_fail_http(5.0):
                filled = backfill_epochs(run.client(), run.run_id, s.history)
            if filled:
                log.warning("backfilled MLflow metrics of epochs %s", filled)
        except Exception as exc:  # unreachable server: training must go on
            log.warning("could not read MLflow to backfill epoch metrics (%s); skipped", exc)
    return logger


def _log_step(s: TrainState, logger: Any, loss: float, meter: EpochMeter) -> None:
    if logger is not None and s.global_step % s.config.train.log_every_steps == 0:
        logger.log_metrics(
            {"step_loss": loss, "lr": s.scheduler.get_last_lr()[0],
             "temperature": float(s.criterion.temperature), "images_per_s": meter.window_rate()},
            step=s.global_step,
        )  # fmt: skip


def _step0_check(s: TrainState, loss: float) -> None:
    """Seeds §7.4: the first loss of indistinguishable embeddings is ~log(candidates)."""
    cfg = s.config
    expected = s.criterion.expected_initial_loss(cfg.augment.n_views, cfg.train.global_batch_size)
    if s.global_step == 1 and expected is not None:
        off = abs(loss - expected) / expected
        flag = "; CHECK THE SETUP" if off > 0.25 else ""
        _say(s, f"step 0 loss {loss:.4f}, expected ~log(candidates) = {expected:.4f} "
                f"({100 * off:.0f}% off){flag}")  # fmt: skip


def end_of_epoch(s: TrainState, meter: EpochMeter, knn: KnnMonitor | None, logger: Any) -> None:
    """kNN (when due), report + checkpoint, then MLflow: logged after the checkpoint is
    persisted, so a restart never duplicates an epoch."""
    metrics = {**meter.epoch_metrics(s), "num_nodes": s.num_nodes}
    if knn is not None and knn.due(s.epoch):
        metrics["knn_top1"] = knn(unwrap(s.model).backbone, s.device)
    s.history.append(metrics)
    report_epoch(s, metrics)
    if logger is not None:
        from service.tracking.run import log_epoch

        log_epoch(logger, metrics)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    _say(s, f"epoch {s.epoch + 1}/{s.config.train.epochs} {shown}")


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``loop_config["inputs"]`` is a :class:`WorkerInputs`."""
    inputs: WorkerInputs = loop_config["inputs"]
    s, batches = setup(inputs)
    logger = _run_logger(inputs, s, resumed=s.global_step > 0)
    knn = KnnMonitor(s.config) if s.config.data.has_val and s.rank == 0 else None
    for epoch in range(s.epoch, s.config.train.epochs):
        s.model.train()
        meter, s.epoch, s.epoch_step = EpochMeter(), epoch, 0
        for views, _labels in batches.epoch(s.epoch):
            maybe_kill(s.config.fault, s.rank, s.global_step, inputs.fault_marker_dir)
            loss = train_step(s, views)
            meter.update(loss, views[0].shape[0] * s.world)
            _step0_check(s, loss)
            _log_step(s, logger, loss, meter)
        end_of_epoch(s, meter, knn, logger)
    if logger is not None:
        logger.flush()
