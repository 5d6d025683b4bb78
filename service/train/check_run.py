"""``contrastive check`` on the driver: is W workers x b the same training step as one process
x W*b on *this* cluster, and what does a step cost in communication and data?

``run_check`` takes the run's config (workers, backend, model, loss, data path, batch), derives
the comparison's (the first ``b`` samples of each rank's batch, float64, no AMP;
``check_config``), runs the W-worker trace and the one-process reference as two short Ray Train
runs (``service.train.check``) under a scratch folder of ``train.storage_path`` (removed after),
compares loss, gradients and BatchNorm running statistics (``compare``), and prints one table;
its summary is the command's JSON line. A difference beyond ``tolerance`` (relative to the
largest value) fails the check (``CheckFailedError``: exit 1, the JSON line still printed).
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from service.config import Config, ConfigError
from service.console import say
from service.train.check import (
    TRACE_FILE,
    CheckPlan,
    check_reference,
    check_workers,
    reference_batch,
)

DEFAULT_TOLERANCE = 1e-6  # of the largest gradient; float64 agreement is ~1e-13 (docs)
LOSS_TOLERANCE = 1e-5  # at least: train_step reports its (all-reduced) loss in float32
CHECK_BATCH_PER_WORKER = 32  # default per-worker batch of the check (at most the config's)


class CheckFailedError(RuntimeError):
    """The check ran and found W workers differ from one process (or MLflow unreachable)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result  # the command's JSON line, printed before the message


def check_config(config: Config, per_worker_batch: int | None = None) -> Config:
    """The config of the compared steps: the run's, with a small global batch
    (``per_worker_batch`` x workers: the first samples of each rank's batch; default the smaller
    of 32 and the run's, or two micro-batches when cached-gradient steps are on, so they run),
    no AMP (the steps run in float64) and no time budget."""
    t = config.train
    if t.num_workers < 2:
        raise ConfigError(
            f"contrastive check compares W workers with one process; train.num_workers is "
            f"{t.num_workers} (try --set train.num_workers=2)"
        )
    if config.text.column:
        raise ConfigError("contrastive check runs image-only configs (text.column is set)")
    b = per_worker_batch or min(config.per_worker_batch_size, CHECK_BATCH_PER_WORKER)
    if per_worker_batch is None and t.micro_batch_size:
        b = min(config.per_worker_batch_size, 2 * t.micro_batch_size)
    if b > config.per_worker_batch_size:
        raise ConfigError(
            f"--batch-per-worker {b} is more than the run's per-worker batch "
            f"({config.per_worker_batch_size}); the compared samples are taken from it"
        )
    return config.with_values(
        {"train.global_batch_size": b * t.num_workers, "train.amp": "off",
         "train.time_budget_minutes": None}
    )  # fmt: skip


def one_process(config: Config) -> Config:
    """The reference's config: one worker, the whole global batch; cached-gradient steps with
    micro-batches of W x m (see ``reference_batch``)."""
    t = config.train
    micro = t.micro_batch_size * t.num_workers if t.micro_batch_size else None
    return config.with_values({"train.num_workers": 1, "train.micro_batch_size": micro})


@contextmanager
def scratch_storage(config: Config) -> Any:
    """A folder of its own under ``train.storage_path`` for the two runs; removed after."""
    from pyarrow import fs

    from service.train.inputs import resolve_storage_path

    root = f"{resolve_storage_path(config.train.storage_path).rstrip('/')}"
    path = f"{root}/contrastive-check-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        yield path
    finally:
        filesystem, folder = fs.FileSystem.from_uri(path if "://" in path else f"file://{path}")
        if filesystem.get_file_info(folder).type != fs.FileType.NotFound:
            filesystem.delete_dir(folder)


def fit_trace(trainer: Any) -> dict[str, Any]:
    """Run one of the check's trainers; rank 0's trace from its checkpoint."""
    from service.train.driver import fit

    result = fit(trainer)
    with result.checkpoint.as_directory() as folder:
        return torch.load(f"{folder}/{TRACE_FILE}", weights_only=False)


def _relative(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest |difference| relative to the largest |expected| value, and where it is."""
    scale = max((float(v.abs().max()) for v in expected.values()), default=0.0) or 1.0
    worst, where = 0.0, ""
    for name, value in expected.items():
        diff = float((got[name] - value).abs().max())
        if diff > worst:
            worst, where = diff, name
    return worst / scale, where


def compare(workers: dict[str, Any], reference: dict[str, Any], tolerance: float) -> dict:
    """Loss, gradients (every step) and BN running statistics (the end), W workers vs one."""
    grads = [_relative(g, e) for g, e in zip(workers["grads"], reference["grads"], strict=True)]
    grad_error, where = max(grads)
    losses = zip(workers["loss"], reference["loss"], strict=True)
    loss_errors = [abs(a - b) / max(abs(b), 1e-12) for a, b in losses]
    loss_error = max(loss_errors)
    bn_error = _relative(workers["bn"], reference["bn"])[0] if reference["bn"] else 0.0
    loss_tolerance = max(tolerance, LOSS_TOLERANCE)
    return {
        "loss_rel_error": loss_error,
        "loss_rel_error_per_step": loss_errors,
        "grad_rel_error": grad_error,
        "grad_worst_parameter": where,
        "grad_rel_error_per_step": [e for e, _ in grads],
        "bn_rel_error": bn_error,
        "tolerance": tolerance,
        "loss_tolerance": loss_tolerance,
        "equal": grad_error <= tolerance and loss_error <= loss_tolerance and bn_error <= tolerance,
    }


def communication(trace: dict[str, Any], world: int) -> dict[str, float]:
    """Time and bus bandwidth (nccl-tests' convention) of the two collectives, and their share
    of a step (the median rank's step time)."""
    c = trace["collectives"]
    step = step_seconds(trace["timing"])
    gather_bus = c["gather_bytes"] / c["gather_s"] * (world - 1) / world
    reduce_bus = c["reduce_bytes"] / c["reduce_s"] * 2 * (world - 1) / world
    return {
        "all_gather_ms": c["gather_s"] * 1e3, "all_gather_bytes": c["gather_bytes"],
        "all_gather_bus_gbps": gather_bus / 1e9,
        "all_reduce_ms": c["reduce_s"] * 1e3, "all_reduce_bytes": c["reduce_bytes"],
        "all_reduce_bus_gbps": reduce_bus / 1e9,
        "step_ms": step * 1e3,
        "communication_share": (c["gather_s"] + c["reduce_s"]) / step if step else 0.0,
    }  # fmt: skip


def step_seconds(timing: list[dict[str, float]]) -> float:
    """The median over ranks of the mean step time (data wait included)."""
    import statistics

    return statistics.median(t["elapsed_s"] / max(t["steps"], 1) for t in timing)


def data_wait(timing: list[dict[str, float]]) -> list[dict[str, float]]:
    """Each rank's share of its step time spent waiting for its next batch."""
    return [
        {"rank": t["rank"], "data_wait_share": t["data_wait_s"] / max(t["elapsed_s"], 1e-9),
         "data_wait_ms": t["data_wait_s"] / max(t["steps"], 1) * 1e3}
        for t in sorted(timing, key=lambda t: t["rank"])
    ]  # fmt: skip


def run_check(
    config: Config,
    address: str | None = None,
    *,
    plan: CheckPlan | None = None,
    per_worker_batch: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Check the cluster at ``address`` (None: embedded) for ``config``; the summary (the
    command's JSON line). Raises ``CheckFailedError`` when W workers differ from one process."""
    from service.losses import loss_class
    from service.tracking.uri import resolve_tracking_uri
    from service.train.check import tracking_reachable
    from service.train.driver import check_cluster_fits, check_local_fits, connect_ray
    from service.train.preflight import preflight

    started = time.monotonic()
    compared = check_config(config, per_worker_batch)
    preflight(config)  # bad data is bad input, before Ray
    uri = resolve_tracking_uri(config.mlflow)
    plan = replace(plan or CheckPlan(), tracking_uri=uri, batch=compared.per_worker_batch_size)
    if loss_class(config.loss.name).per_worker_by_design:
        plan = replace(plan, steps=0)  # nothing to compare with (the summary says why)
    check_local_fits(config, address)
    mlflow_driver = tracking_reachable(uri)
    connect_ray(address)
    check_cluster_fits(config)
    workers, reference = _traces(config, compared, plan)
    summary = _summary(config, compared, plan, workers, reference, tolerance)
    summary["mlflow"] = {"uri": uri, "driver": mlflow_driver, "rank0": workers["mlflow_rank0"]}
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["status"] = _status(summary)
    print(format_check(summary), flush=True)
    if summary["status"] == "fail":
        raise CheckFailedError(f"check failed: {_failure(summary)}", summary)
    return summary


def _traces(
    config: Config, compared: Config, plan: CheckPlan
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The W-worker trace, then the one-process reference on its global batches (None when the
    loss differs by design, e.g. MoCo's shuffle-BN)."""
    import ray

    from service.train.driver import build_trainer

    w = config.train.num_workers
    with scratch_storage(config) as storage:
        timed = f"{plan.timed_steps} of {config.per_worker_batch_size} timed"
        say("check", f"{w} workers: {plan.steps} steps of {plan.batch} per worker compared "
                     f"(float64), {timed}")  # fmt: skip
        workers = fit_trace(build_trainer(
            config, storage_path=storage, run_name="workers", train_loop=check_workers,
            loop_extras={"check": plan, "compare_config": compared},
        ))  # fmt: skip
        if plan.steps == 0:
            return workers, None
        say("check", f"1 process x {compared.train.global_batch_size}: the same global batches")
        micro = compared.train.micro_batch_size
        batches = [reference_batch(b, w, micro) for b in workers["batches"]]
        reference = fit_trace(build_trainer(
            one_process(compared), storage_path=storage, run_name="reference",
            train_loop=check_reference, with_data=False,
            loop_extras={"batches": ray.put(batches),
                         "steps_per_epoch": workers["steps_per_epoch"]},
        ))  # fmt: skip
    return workers, reference


def _summary(
    config: Config,
    compared: Config,
    plan: CheckPlan,
    workers: dict[str, Any],
    reference: dict[str, Any] | None,
    tolerance: float,
) -> dict[str, Any]:
    from service.losses import loss_class

    t, w = config.train, config.train.num_workers
    why_not = loss_class(config.loss.name).per_worker_by_design
    return {
        "workers": w,
        "nodes": workers["nodes"],
        "backend": "nccl" if t.use_gpu else "gloo",
        "device": workers["device"],
        "model": config.model.arch,
        "loss": config.loss.name,
        "global_bn": config.model.sync_batchnorm,
        "micro_batch_size": t.micro_batch_size,
        "per_worker_batch": compared.per_worker_batch_size,
        "global_batch": compared.train.global_batch_size,
        "run_per_worker_batch": config.per_worker_batch_size,
        "amp": t.amp,
        "steps": plan.steps,
        "drill": plan.drill,
        "equality": compare(workers, reference, tolerance) if reference else {"skipped": why_not},
        "communication": communication(workers, w),
        "data_wait": data_wait(workers["timing"]),
    }


def _status(summary: dict[str, Any]) -> str:
    equal = summary["equality"].get("equal", True)
    reachable = summary["mlflow"]["driver"]["ok"] is not False
    reachable = reachable and summary["mlflow"]["rank0"]["ok"] is not False
    return "pass" if equal and reachable else "fail"


def _failure(summary: dict[str, Any]) -> str:
    e, m = summary["equality"], summary["mlflow"]
    if not e.get("equal", True):
        hint = ""
        if not summary["global_bn"]:
            hint = " (model.sync_batchnorm=false: each worker's BatchNorm uses its own batch)"
        return (
            f"{summary['workers']} workers differ from one process: gradients "
            f"{e['grad_rel_error']:.2e} of the largest (tolerance {e['tolerance']:.0e}), worst "
            f"at {e['grad_worst_parameter']}{hint}"
        )
    where = m["driver"] if m["driver"]["ok"] is False else m["rank0"]
    return f"MLflow unreachable: {where['detail']}"


# --- the table ---------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _equality_rows(e: dict[str, Any]) -> list[tuple[str, str, str]]:
    if "skipped" in e:
        return [("loss, gradients", f"not compared: {e['skipped']}", "n/a")]
    verdict = {True: "ok", False: "DIFFERENT"}
    tol = e["tolerance"]
    return [
        ("loss", f"max relative difference {e['loss_rel_error']:.1e} (reported in float32)",
         verdict[e["loss_rel_error"] <= e["loss_tolerance"]]),
        ("gradients", f"max {e['grad_rel_error']:.1e} of the largest (tolerance {tol:.0e})",
         verdict[e["grad_rel_error"] <= tol]),
        ("BN running statistics", f"max {e['bn_rel_error']:.1e} of the largest",
         verdict[e["bn_rel_error"] <= tol]),
    ]  # fmt: skip


def _cost_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    c = summary["communication"]
    waits = ", ".join(
        f"rank {d['rank']}: {d['data_wait_share']:.1%} ({d['data_wait_ms']:.1f} ms/step)"
        for d in summary["data_wait"]
    )
    return [
        ("all-gather (embeddings)", f"{c['all_gather_ms']:.2f} ms for "
         f"{_size(c['all_gather_bytes'])}, bus {c['all_gather_bus_gbps']:.2f} GB/s", ""),
        ("all-reduce (gradients)", f"{c['all_reduce_ms']:.2f} ms for "
         f"{_size(c['all_reduce_bytes'])}, bus {c['all_reduce_bus_gbps']:.2f} GB/s", ""),
        ("step", f"{c['step_ms']:.1f} ms; the two collectives "
         f"{c['communication_share']:.0%} of it", ""),
        ("data wait", waits, ""),
    ]  # fmt: skip


def _mlflow_row(m: dict[str, Any]) -> tuple[str, str, str]:
    def where(name: str, r: dict[str, Any]) -> str:
        if r["ok"] is None:
            return f"{name}: not asked"
        return f"{name} {r['seconds'] * 1e3:.0f} ms" if r["ok"] else f"{name}: {r['detail']}"

    from service.tracking.uri import redact_uri

    ok = m["driver"]["ok"] is not False and m["rank0"]["ok"] is not False
    text = f"{redact_uri(m['uri'])}: {where('driver', m['driver'])}, {where('rank 0', m['rank0'])}"
    return ("MLflow", text, "ok" if ok else "UNREACHABLE")


def format_check(summary: dict[str, Any]) -> str:
    """The check's table, for people (the JSON line follows it)."""
    s = summary
    bn = "global BN" if s["global_bn"] else "per-worker BN"
    micro = f", micro-batch {s['micro_batch_size']}" if s["micro_batch_size"] else ""
    drill = f"  [drill: {s['drill']}]" if s["drill"] else ""
    head = [
        f"contrastive check: {s['workers']} workers on {s['nodes']} Ray node(s) ({s['backend']}, "
        f"{s['device']}), {s['model']} + {s['loss']}, {bn}{drill}",
        f"compared with 1 process: {s['steps']} training step(s) of {s['workers']} x "
        f"{s['per_worker_batch']} = {s['global_batch']}{micro} (the first of each rank's "
        f"{s['run_per_worker_batch']}), float64; timed: the run's batch, amp={s['amp']}",
        "",
    ]
    rows = [("check", "measured", "result"), *_equality_rows(s["equality"]),
            *_cost_rows(s), _mlflow_row(s["mlflow"])]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
    return "\n".join([*head, *lines, "", _verdict(s)])


def _verdict(s: dict[str, Any]) -> str:
    took = f"({s['seconds']:.0f} s)"
    if s["status"] == "fail":
        return f"FAIL {took}: {_failure(s)}"
    if "skipped" in s["equality"]:
        return f"PASS {took}: collectives, data and MLflow checked; the step is not compared"
    return (
        f"PASS {took}: {s['workers']} workers x {s['per_worker_batch']} train exactly as 1 "
        f"process x {s['global_batch']} (loss, gradients, BatchNorm statistics)"
    )
