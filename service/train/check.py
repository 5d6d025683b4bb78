"""What the ranks of ``contrastive check`` run: the real ``train_step`` on W workers, then on one.

``check_workers`` (W ranks; the configured backend, model, loss and data path at the run's batch):
``steps`` real training steps of a float64 copy of the model on the first ``b`` samples of each
rank's batch; rank 0 keeps what each step consumed (every rank's views and labels, gathered in
rank order: the global batch), the loss and every gradient after DDP's average, and the BatchNorm
running statistics at the end. Then ``timed_steps`` steps of the run's own model, precision and
batch time each rank's wait for its next batch, the all-gather of the embeddings and the
all-reduce of the gradients are timed at the run's sizes, and rank 0 asks the MLflow server (it
is the rank that logs).

``check_reference`` (one rank): the same initial weights, the same global batches, one process.
The driver (``service.train.check_run``) compares the two traces.

Float64 for the comparison: it checks the distributed maths, not float32 rounding, which a
BatchNorm channel of tiny variance amplifies to 1e-3 of the largest gradient on real images.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from service.losses import gather_no_grad, simulated_bug
from service.models import unwrap
from service.train.batches import TrainBatches
from service.train.epoch import EpochMeter
from service.train.inputs import WorkerInputs
from service.train.loop import node_ids
from service.train.state import TrainState, build_state
from service.train.step import train_step

TRACE_FILE = "trace.pt"
Batch = tuple[list[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CheckPlan:
    """What ``contrastive check`` runs (the config it runs is in the worker inputs)."""

    steps: int = 3  # training steps compared with one process (float64, ``batch`` per rank)
    batch: int = 32  # samples per rank in the compared steps (the first of each rank's batch)
    timed_steps: int = 10  # further steps timing the data wait and the step (the run's own)
    collective_repeats: int = 10  # each collective timed this many times (median)
    drill: str | None = None  # a simulated bug (service.losses.SIMULATED_BUGS), None: none
    tracking_uri: str | None = None  # the MLflow store rank 0 asks


def _state(inputs: WorkerInputs, steps_per_epoch: int, float64: bool = False) -> TrainState:
    """The training state, built after seeding with ``train.seed`` on every rank and in the
    reference, so all start from the same weights (DDP also broadcasts rank 0's)."""
    config = inputs.config
    context = ray.train.get_context()
    prepare = ray.train.torch.prepare_model
    torch.manual_seed(config.train.seed)
    return build_state(
        config, ray.train.torch.get_device(), steps_per_epoch,
        rank=context.get_world_rank(), world=context.get_world_size(),
        wrap=(lambda model: prepare(model.double())) if float64 else prepare,
        run_dir=inputs.run_dir,
    )  # fmt: skip


def exact_inputs(inputs: WorkerInputs, compare: Any) -> WorkerInputs:
    """The inputs of the compared (float64) state: the check's config, the same data path."""
    return replace(inputs, config=compare)


def _double(views: list[torch.Tensor]) -> list[torch.Tensor]:
    return [v.double() if v.is_floating_point() else v for v in views]


def _forever(batches: TrainBatches) -> Iterator[Batch]:
    """Epoch after epoch: a tiny data set still gives every step it is asked for."""
    for epoch in itertools.count():
        yield from batches.epoch(epoch)


def gradients(s: TrainState) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (model without its DDP wrapper, and the loss's own), on CPU."""
    named = itertools.chain(
        unwrap(s.model).named_parameters(), s.criterion.named_parameters(prefix="loss")
    )
    return {n: p.grad.detach().double().cpu().clone() for n, p in named if p.grad is not None}


def bn_statistics(s: TrainState) -> dict[str, torch.Tensor]:
    """The model's BatchNorm running means and variances, on CPU."""
    return {
        n: b.detach().double().cpu().clone()
        for n, b in unwrap(s.model).named_buffers()
        if n.endswith(("running_mean", "running_var"))
    }


def _global_batch(s: TrainState, views: list[torch.Tensor], labels: torch.Tensor) -> Batch:
    """This step's views and labels of every rank, in rank order (as the device holds them)."""
    gathered = [gather_no_grad(s.to_device(v)).cpu() for v in views]
    return gathered, gather_no_grad(labels.to(s.device)).cpu()


def compared_steps(
    s: TrainState, stream: Iterator[Batch], steps: int, batch_size: int
) -> dict[str, Any]:
    """``steps`` real training steps on the first ``batch_size`` samples of each rank's batch,
    in float64; what each consumed and produced (complete on rank 0)."""
    trace: dict[str, Any] = {"batches": [], "loss": [], "grads": []}
    for full_views, full_labels in itertools.islice(stream, steps):
        views, labels = _double([v[:batch_size] for v in full_views]), full_labels[:batch_size]
        batch = _global_batch(s, views, labels)
        loss = train_step(s, views, labels)
        if s.rank == 0:
            trace["batches"].append(batch)
            trace["loss"].append(loss)
            trace["grads"].append(gradients(s))
    trace["bn"] = bn_statistics(s) if s.rank == 0 else {}
    return trace


def timed_steps(s: TrainState, stream: Iterator[Batch], steps: int) -> list[dict[str, float]]:
    """Every rank's wait for its next batch and its step time over ``steps`` steps."""
    meter = EpochMeter()
    for views, labels in meter.timed(itertools.islice(stream, steps)):
        meter.update(train_step(s, views, labels), views[0].shape[0] * s.world)
    meter.finish()
    mine = {"rank": s.rank, "steps": meter.steps, "data_wait_s": meter.data_wait_s,
            "elapsed_s": meter.elapsed_s()}  # fmt: skip
    everyone: list[Any] = [None] * s.world
    dist.all_gather_object(everyone, mine)
    return everyone


def _median_seconds(op: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of ``op`` over ``repeats`` runs after two warm-ups, ranks aligned by a
    barrier before each run."""
    times = []
    for i in range(repeats + 2):
        dist.barrier()
        start = time.perf_counter()
        op()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_collectives(s: TrainState, rows: int, repeats: int) -> dict[str, float]:
    """The step's two collectives at this run's sizes: the all-gather of ``rows`` embeddings of
    ``model.proj_out_dim`` floats per rank (the loss's), the all-reduce of every gradient (DDP's,
    here in one piece rather than its buckets). Seconds and bytes; bandwidth is the driver's."""
    device = s.device if dist.get_backend() == "nccl" else torch.device("cpu")
    embeddings = torch.randn(rows, s.config.model.proj_out_dim, device=device)
    numel = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
    flat = torch.zeros(numel, device=device)
    return {
        "gather_s": _median_seconds(lambda: gather_no_grad(embeddings, False), device, repeats),
        "gather_bytes": embeddings.numel() * 4 * s.world,  # what every rank ends up holding
        "reduce_s": _median_seconds(lambda: dist.all_reduce(flat), device, repeats),
        "reduce_bytes": numel * 4,
    }


def tracking_reachable(uri: str | None) -> dict[str, Any]:
    """Whether the MLflow store at ``uri`` answers from here, and how fast."""
    if not uri:
        return {"ok": None, "detail": "no tracking URI"}
    from service.tracking.uri import check_tracking_server

    start = time.perf_counter()
    try:
        check_tracking_server(uri)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the check goes on
        return {"ok": False, "detail": str(exc)}
    return {"ok": True, "seconds": time.perf_counter() - start}


def report_trace(s: TrainState, trace: dict[str, Any]) -> None:
    """Rank 0's trace as the run's checkpoint (the driver reads it); every rank reports."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if s.rank == 0:
            torch.save(trace, Path(tmp) / TRACE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"steps": s.global_step}, checkpoint=checkpoint)


def check_workers(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry of the W-worker run (see the module docstring)."""
    inputs: WorkerInputs = loop_config["inputs"]
    plan: CheckPlan = loop_config["check"]
    config = inputs.config
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    context = ray.train.get_context()
    batches = TrainBatches(inputs, context.get_world_rank(), context.get_world_size())
    stream = _forever(batches)  # the run's batches: sliced for the comparison, whole for timing
    exact = _state(exact_inputs(inputs, loop_config["compare_config"]), batches.steps_per_epoch,
                   float64=True)  # fmt: skip
    with simulated_bug(plan.drill):
        trace = compared_steps(exact, stream, plan.steps, plan.batch)
    del exact
    s = _state(inputs, batches.steps_per_epoch)  # the run's own model and precision
    trace["timing"] = timed_steps(s, stream, plan.timed_steps)
    rows = config.per_worker_batch_size * config.augment.n_views
    trace["collectives"] = time_collectives(s, rows, plan.collective_repeats)
    trace["steps_per_epoch"] = batches.steps_per_epoch
    trace["nodes"] = len(set(node_ids(s.world)))
    trace["device"] = _device_name(s.device)
    if s.rank == 0:
        trace["mlflow_rank0"] = tracking_reachable(plan.tracking_uri)
    report_trace(s, trace)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def reference_batch(batch: Batch, world: int, micro: int | None) -> Batch:
    """The global batch as one process consumes it. Cached-gradient steps: reordered so that
    its k-th micro-batch (of ``world`` x ``micro`` samples) holds the ranks' k-th micro-batches,
    which global BN normalises together on W workers (NT-Xent does not depend on sample order)."""
    views, labels = batch
    n = labels.shape[0]
    per_rank = n // world
    if micro is None or micro >= per_rank:
        return views, labels
    order = [
        r * per_rank + k + j
        for k in range(0, per_rank, micro)
        for r in range(world)
        for j in range(min(micro, per_rank - k))
    ]
    return [v[order] for v in views], labels[order]


def check_reference(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry of the one-process reference: the W-worker run's global batches
    (``loop_config["batches"]``), the same initial weights; its own trace."""
    inputs: WorkerInputs = loop_config["inputs"]
    torch.set_num_threads(max(1, int(inputs.config.train.cpus_per_worker)))
    s = _state(inputs, loop_config["steps_per_epoch"], float64=True)
    trace: dict[str, Any] = {"loss": [], "grads": []}
    for views, labels in ray.get(loop_config["batches"]):
        trace["loss"].append(train_step(s, views, labels))
        trace["grads"].append(gradients(s))
    trace["bn"] = bn_statistics(s)
    report_trace(s, trace)
