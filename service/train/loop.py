"""The per-worker training function that Ray Train's ``TorchTrainer`` runs on every rank.

``train_func(loop_config)`` rebuilds the typed Config, builds data → model (DDP) → loss, resumes
from ``ray.train.get_checkpoint()`` when there is one, and reports per-epoch metrics with a
checkpoint through ``ray.train.report``. Only rank 0 writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from service.config import Config, config_from_dict
from service.eval.features import extract_features
from service.eval.knn import knn_top1
from service.losses import NonFiniteEmbeddingError, build_loss
from service.losses.moco import momentum_update
from service.models import build_model, maybe_convert_sync_batchnorm
from service.train.checkpoint import load_state, save_state
from service.train.optim import build_optimizer, warmup_cosine

log = logging.getLogger("service.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops and the last good checkpoint is kept."""


def expected_initial_loss(config: Config) -> float | None:
    """Expected step-0 loss, when all embeddings are ~indistinguishable (seeds §7.4)."""
    views, batch, lo = config.augment.n_views, config.train.global_batch_size, config.loss
    if lo.name == "ntxent":
        return math.log(views * batch - 1)  # 1 positive (per pair) vs V·B−1 candidates
    if lo.name == "symmetric":
        return math.log(batch)
    if lo.name == "moco":
        return math.log(lo.moco_queue_size + 1)
    if lo.name == "hard_negative":
        return math.log(min(lo.top_k, views * batch - 2) + 1)
    return None


def _autocast(config: Config, device: torch.device):
    """bf16 autocast on GPU by default; CPU runs stay in fp32 (amp=auto)."""
    mode = config.train.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    if mode == "off":
        return nullcontext(), None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return torch.autocast(device_type=device.type, dtype=dtype), scaler


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _average_gradients(module: nn.Module, world_size: int) -> None:
    """All-reduce grads of parameters outside DDP (e.g. a learnable temperature in the loss)."""
    if world_size == 1:
        return
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world_size


def _global_mean(value: torch.Tensor, world_size: int) -> float:
    """Mean of a scalar over ranks; every rank gets the same number (so NaN stops are unanimous)."""
    value = value.detach().float().reshape(1).clone()
    if world_size > 1:
        dist.all_reduce(value)
        value /= world_size
    return float(value)


def _maybe_inject_fault(config: Config, rank: int, global_step: int, marker_dir: Path) -> None:
    """Test hook: SIGKILL this worker once at ``fault.at_step`` (marker file makes it one-shot)."""
    fault = config.fault
    if fault.kill_rank != rank or fault.at_step != global_step:
        return
    marker = marker_dir / f"fault-fired-rank{rank}"
    if marker.exists():
        return
    marker_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(time.time()))
    log.warning(
        "fault injection: killing rank %d (pid %d) at step %d", rank, os.getpid(), global_step
    )
    os.kill(os.getpid(), signal.SIGKILL)


def _forward_loss(
    model: nn.Module, key_model: nn.Module | None, criterion: nn.Module, views: list[torch.Tensor]
) -> torch.Tensor:
    if key_model is not None:  # MoCo: queries from the online model, keys from the EMA copy
        queries = model(views[0])
        with torch.no_grad():
            keys = key_model(views[1])
        return criterion(queries, keys)
    # One forward over all views: BN sees the whole local batch, DDP sees one forward.
    return criterion(*model(torch.cat(views)).chunk(len(views)))


class _TrainData:
    """Per-worker view batches from either reader; the per-worker batch is global / workers."""

    def __init__(self, config: Config, loop_config: dict[str, Any], rank: int, world: int):
        self.config = config
        self.batch_size = config.per_worker_batch_size
        if config.data.reader == "ray":
            self.shard = ray.train.get_dataset_shard("train")
            self.steps_per_epoch = loop_config["rows"] // config.train.global_batch_size
            return
        from torch.utils.data import DistributedSampler

        from service.data import make_dataloader
        from service.data.torch_dataset import build_train_dataset

        dataset = build_train_dataset(config)
        self.sampler = DistributedSampler(
            dataset,
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=config.train.seed,
            drop_last=True,
        )
        self.loader = make_dataloader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=config.data.loader_workers,
            sampler=self.sampler,
        )
        self.steps_per_epoch = len(self.loader)

    def epoch(self, epoch: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        if self.config.data.reader == "ray":
            from service.data.ray_dataset import iter_view_batches

            batches = iter_view_batches(
                self.shard, self.batch_size, self.config.augment.n_views, drop_last=True
            )
            # Ray Data shards may differ by a batch; every rank must run the same step count.
            for step, batch in enumerate(batches):
                if step >= self.steps_per_epoch:
                    break
                yield batch
            return
        self.sampler.set_epoch(epoch)
        yield from self.loader


class _KnnMonitor:
    """Online kNN top-1 on a held-out labelled split (rank 0), memory bank = training images."""

    def __init__(self, config: Config):
        from service.data.augment import eval_transform

        self.config = config
        self.transform = eval_transform(
            config.data.image_size, config.augment.mean, config.augment.std
        )

    def __call__(self, backbone: nn.Module, device: torch.device) -> float:
        d, e = self.config.data, self.config.eval
        bank, bank_labels = extract_features(
            backbone, d.train, self.transform, limit=e.knn_max_train, device=device
        )
        val, val_labels = extract_features(backbone, d.val, self.transform, device=device)
        return knn_top1(bank, bank_labels, val, val_labels, e.knn_k, e.knn_temperature)


def _node_ids(world_size: int) -> list[str]:
    """Ray node id of every rank (collective; call on all ranks once the process group is up).

    Ray Train's ``node_rank`` groups workers by IP, which cannot tell two Ray nodes on one host
    apart; the node id can, so multi-node placement (SPREAD/STRICT_SPREAD) is checkable.
    """
    node_id = ray.get_runtime_context().get_node_id()
    if world_size == 1 or not dist.is_initialized():
        return [node_id]
    ids: list[Any] = [None] * world_size
    dist.all_gather_object(ids, node_id)
    return [str(i) for i in ids]


def _log_epoch_metrics(metric_logger: Any, metrics: dict[str, Any]) -> None:
    """One epoch's metrics at step=epoch, in one batch (so an epoch is in MLflow whole or not)."""
    metric_logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=int(metrics["epoch"]))


def _backfill_epoch_metrics(
    loop_config: dict[str, Any], metric_logger: Any, history: list[dict[str, Any]]
) -> None:
    """After a restart, log the checkpointed epochs that MLflow lacks.

    A rank 0 that died with epoch metrics still buffered (MLflow was down) or between persisting
    a checkpoint and logging its epoch would otherwise lose them for good. Best effort: if MLflow
    cannot be read now, nothing is backfilled (and nothing is duplicated).
    """
    from mlflow import MlflowClient

    from service.tracking.uri import fast_fail_http

    try:
        with fast_fail_http(5.0):
            client = MlflowClient(loop_config["tracking_uri"])
            logged = client.get_metric_history(loop_config["mlflow_run_id"], "train_loss")
    except Exception as exc:  # unreachable server: training must go on
        log.warning("could not read MLflow to backfill epoch metrics (%s); skipped", exc)
        return
    logged_epochs = {m.step for m in logged}
    missing = [h for h in history if int(h["epoch"]) not in logged_epochs]
    for metrics in missing:
        _log_epoch_metrics(metric_logger, metrics)
    if missing:
        log.warning("backfilled MLflow metrics of epochs %s", [h["epoch"] for h in missing])


def _metric_logger(loop_config: dict[str, Any], rank: int):
    if rank != 0 or not loop_config.get("mlflow_run_id"):
        return None
    from service.tracking.logger import MetricLogger

    return MetricLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"])


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``loop_config``: {"config": Config.to_dict(), "rows": int,
    "mlflow_run_id": str | None, "tracking_uri": str | None}."""
    config = config_from_dict(loop_config["config"])
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.train.seed + rank)
    device = ray.train.torch.get_device()

    data = _TrainData(config, loop_config, rank, world)
    if data.steps_per_epoch < 1:
        raise ValueError(
            f"the training data yields no full global batch of {config.train.global_batch_size} "
            f"per epoch; lower train.global_batch_size or add data"
        )

    model = maybe_convert_sync_batchnorm(build_model(config.model), config.model.sync_batchnorm)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    key_model = copy.deepcopy(model).requires_grad_(False) if config.loss.name == "moco" else None
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU) + device move
    node_ids = _node_ids(world)
    num_nodes = len(set(node_ids))
    if rank == 0:
        print(f"[train] {world} worker(s) on {num_nodes} Ray node(s): {node_ids}", flush=True)
    if key_model is not None:
        key_model.to(device)
    criterion = build_loss(config.loss, config.model.proj_out_dim).to(device)
    optimizer = build_optimizer([model, criterion], config.train)
    total_steps = config.train.epochs * data.steps_per_epoch
    scheduler = warmup_cosine(
        optimizer, total_steps, round(config.train.warmup_epochs * data.steps_per_epoch)
    )
    autocast, scaler = _autocast(config, device)

    start_epoch, global_step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_state(ckpt_dir, map_location=device)
        _unwrap(model).load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if key_model is not None:
            key_model.load_state_dict(state["key_model"])
        start_epoch, global_step, history = (
            state["epoch"] + 1,
            state["global_step"],
            state["history"],
        )
        if rank == 0:
            log.warning(
                "resumed from checkpoint after epoch %d (step %d)", state["epoch"], global_step
            )

    metric_logger = _metric_logger(loop_config, rank)
    if metric_logger is not None and checkpoint is not None:
        # Makes each restart (worker failure or resubmitted job) visible in the MLflow run.
        metric_logger.log_metrics({"resumed_from_epoch": start_epoch - 1}, step=global_step)
        _backfill_epoch_metrics(loop_config, metric_logger, history)
    knn_monitor = _KnnMonitor(config) if config.data.val and rank == 0 else None
    marker_dir = Path(loop_config.get("fault_marker_dir") or tempfile.gettempdir())
    expected0 = expected_initial_loss(config)

    for epoch in range(start_epoch, config.train.epochs):
        model.train()
        epoch_start, epoch_loss, epoch_images, epoch_steps = time.perf_counter(), 0.0, 0, 0
        window_start, window_images = time.perf_counter(), 0
        for step, (views, _labels) in enumerate(data.epoch(epoch)):
            _maybe_inject_fault(config, rank, global_step, marker_dir)
            views = [v.to(device, non_blocking=True) for v in views]
            if config.model.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            try:
                with autocast:
                    loss = _forward_loss(model, key_model, criterion, views)
            except NonFiniteEmbeddingError as exc:
                # Diverged weights show up as non-finite embeddings before the loss is NaN; the
                # loss raises on every rank together, so all ranks stop here in the same step.
                raise NonFiniteLossError(
                    f"training diverged at epoch {epoch}, step {step} (global step "
                    f"{global_step}): {exc}. The last good checkpoint (if any) is kept under "
                    f"{config.train.storage_path}/{config.train.run_name}."
                ) from exc
            if config.fault.nan_at_step == global_step:
                loss = loss * float("nan")  # divergence drill: exercises the stop path below
            mean_loss = _global_mean(loss, world)
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"loss became {mean_loss} at epoch {epoch}, step {step} (global step "
                    f"{global_step}); stopping. The last good checkpoint (if any) is kept under "
                    f"{config.train.storage_path}/{config.train.run_name}. Try a higher "
                    f"loss.temperature (now {config.loss.temperature}) or a lower train.lr."
                )
            if global_step == 0 and rank == 0 and expected0 is not None:
                off = abs(mean_loss - expected0) / expected0
                print(
                    f"[train] step 0 loss {mean_loss:.4f}, expected ~log(candidates) = "
                    f"{expected0:.4f} ({100 * off:.0f}% off)"
                    + ("; CHECK THE SETUP" if off > 0.25 else ""),
                    flush=True,
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            _average_gradients(criterion, world)
            if config.train.grad_clip_norm:
                nn.utils.clip_grad_norm_(
                    list(model.parameters()) + list(criterion.parameters()),
                    config.train.grad_clip_norm,
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if key_model is not None:
                momentum_update(model, key_model, config.loss.moco_momentum)

            batch_images = views[0].shape[0] * world
            epoch_loss += mean_loss
            epoch_steps += 1
            epoch_images += batch_images
            window_images += batch_images
            global_step += 1
            if metric_logger is not None and global_step % config.train.log_every_steps == 0:
                now = time.perf_counter()
                metric_logger.log_metrics(
                    {
                        "step_loss": mean_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "temperature": float(criterion.temperature),
                        "images_per_s": window_images / max(now - window_start, 1e-9),
                    },
                    step=global_step,
                )
                window_start, window_images = now, 0

        metrics: dict[str, Any] = {
            "epoch": epoch,
            "global_step": global_step,
            "train_loss": epoch_loss / max(1, epoch_steps),
            "lr": scheduler.get_last_lr()[0],
            "temperature": float(criterion.temperature),
            "images_per_s": epoch_images / max(time.perf_counter() - epoch_start, 1e-9),
            "num_nodes": num_nodes,
        }
        last_epoch = epoch == config.train.epochs - 1
        if knn_monitor is not None and (
            last_epoch or (epoch + 1) % config.eval.knn_every_epochs == 0
        ):
            metrics["knn_top1"] = knn_monitor(_unwrap(model).backbone, device)
        history.append(metrics)

        # Final metrics always go with a checkpoint: Train V2 keeps Result.metrics only then.
        save = last_epoch or (epoch + 1) % config.train.checkpoint_every_epochs == 0
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if save and rank == 0:
                save_state(
                    tmp,
                    {
                        "model": _unwrap(model).state_dict(),
                        "key_model": key_model.state_dict() if key_model is not None else None,
                        "criterion": criterion.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "epoch": epoch,
                        "global_step": global_step,
                        "history": history,
                        "config": config.to_dict(),
                    },
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if metric_logger is not None:
            # Logged after the checkpoint is persisted, so a restart never duplicates an epoch.
            _log_epoch_metrics(metric_logger, metrics)
        if rank == 0:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
            print(f"[train] epoch {epoch + 1}/{config.train.epochs} {shown}", flush=True)
    if metric_logger is not None:
        metric_logger.flush()
