"""What a finished sweep looks like: one record per trial, the best one, a table and a figure.

Pure functions over Tune ``Result``-like objects (``.metrics``, ``.config``, ``.error``), so they
are testable without Ray. The sweep driver logs the table (CSV + markdown) and the figure
(metric vs each searched key) as artifacts of the parent MLflow run.

    >>> rec = TrialRecord("t1", "completed", {"loss.temperature": 0.2}, 3, 0.41, 5.1)
    >>> pick_best([rec], "max").trial_id
    't1'
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.tune.space import ParamSpec

OUTCOMES = ("completed", "stopped_early", "failed")
ERROR_TAG_LEN = 500  # MLflow tag values are capped; the full traceback goes to an artifact


@dataclass
class TrialRecord:
    """One trial's outcome: what it searched, how far it got, what it scored."""

    trial_id: str
    outcome: str  # completed | stopped_early | failed
    params: dict[str, Any]
    epochs_completed: int
    metric: float | None  # last reported value of the sweep metric
    train_loss: float | None
    error: str = ""
    checkpoint: str | None = None
    run_id: str | None = None
    history: list[float] = field(default_factory=list)  # the metric per epoch
    epochs: list[dict[str, float]] = field(default_factory=list)  # every reported epoch


def short_reason(error: BaseException | str) -> str:
    """The line that says what went wrong, out of a (possibly nested, remote) error text."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("NonFiniteLossError", "Error:", "Exception:"):
        hits = [ln for ln in lines if marker in ln and not ln.startswith("Traceback")]
        if hits:
            return hits[-1][:ERROR_TAG_LEN]
    return (lines[-1] if lines else type(error).__name__)[:ERROR_TAG_LEN]


def checkpoint_from_metrics(metrics: dict[str, Any]) -> str | None:
    """The last Train checkpoint a trial reported (``TuneReportCallback`` adds its path)."""
    path = metrics.get("checkpoint_path")
    return str(path) if path else None


def classify(
    error: Any,
    epochs_completed: int,
    max_epochs: int,
    train_minutes: float | None = None,
    budget_minutes: float | None = None,
    global_step: float | None = None,
    max_steps: int | None = None,
) -> str:
    """completed (all epochs, its whole time budget or its ``train.max_steps``), stopped_early
    (ASHA cut it), failed (raised / never reported)."""
    if error is not None:
        return "failed"
    spent = budget_minutes is not None and (train_minutes or 0.0) >= budget_minutes
    spent = spent or (max_steps is not None and (global_step or 0) >= max_steps)
    if epochs_completed >= max_epochs or spent:
        return "completed"
    return "stopped_early" if epochs_completed > 0 else "failed"


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# What the training loop reports per epoch (``epoch`` 1-based; rank 0 logs the values to MLflow
# at step=global_step, epoch/global_step as run tags).
EPOCH_METRICS = (
    "epoch", "global_step", "train_loss", "lr", "temperature", "images_per_s", "train_minutes",
)  # fmt: skip


def _epoch_rows(result: Any, metric: str) -> list[dict[str, float]]:
    """Per-epoch metrics from Tune's result history (one row per ``ray.train.report``)."""
    frame = getattr(result, "metrics_dataframe", None)
    if frame is None or "epoch" not in getattr(frame, "columns", ()):
        return []
    keys = [k for k in (*EPOCH_METRICS, metric, "knn_top1") if k in frame.columns]
    rows = []
    for record in frame[list(dict.fromkeys(keys))].to_dict("records"):
        row = {k: v for k, v in ((k, _finite(x)) for k, x in record.items()) if v is not None}
        if "epoch" in row:
            rows.append(row)
    return rows


def record_from_result(
    result: Any,
    specs: dict[str, ParamSpec],
    metric: str,
    max_epochs: int,
    budget_minutes: float | None = None,
    max_steps: int | None = None,
) -> TrialRecord:
    """A ``TrialRecord`` from a Tune ``Result`` (or anything with metrics/config/error)."""
    metrics = result.metrics or {}
    rows = _epoch_rows(result, metric)
    epochs = int(metrics.get("epochs_completed") or 0)
    minutes = _finite(metrics.get("train_minutes"))
    steps = _finite(metrics.get("global_step"))
    outcome = classify(result.error, epochs, max_epochs, minutes, budget_minutes, steps, max_steps)
    error = ""
    if outcome == "failed":
        error = short_reason(result.error) if result.error is not None else "no result reported"
    return TrialRecord(
        trial_id=str(metrics.get("trial_id", "?")),
        outcome=outcome,
        params={key: (result.config or {}).get(key) for key in specs},
        epochs_completed=epochs,
        metric=_finite(metrics.get(metric)),
        train_loss=_finite(metrics.get("train_loss")),
        error=error,
        checkpoint=checkpoint_from_metrics(metrics),
        history=[row[metric] for row in rows if metric in row],
        epochs=rows,
    )


def pick_best(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    """Best final metric among fully trained trials; early-stopped ones only if none finished
    (their encoders saw fewer epochs, so their early numbers are not comparable)."""
    for pool in ("completed", "stopped_early"):
        scored = [r for r in records if r.outcome == pool and r.metric is not None]
        if scored:
            sign = 1.0 if mode == "max" else -1.0
            return max(scored, key=lambda r: sign * r.metric)
    return None


def count(records: list[TrialRecord], outcome: str) -> int:
    return sum(r.outcome == outcome for r in records)


def sweep_totals(records: list[TrialRecord], budget_minutes: float | None) -> dict[str, float]:
    """The sweep's counts per outcome and, under a time budget, its ``training_minutes``: what
    the summary JSON and the parent run's metrics both report."""
    totals: dict[str, float] = {
        "num_trials": len(records),
        **{f"num_{outcome}": count(records, outcome) for outcome in OUTCOMES},
    }
    if budget_minutes is not None:
        totals |= training_minutes(records, budget_minutes)
    return totals


def training_minutes(records: list[TrialRecord], budget_minutes: float) -> dict[str, float]:
    """What a time-budgeted sweep spent: the training minutes its trials ran, and what ASHA
    saved, the minutes its stopped trials did not run (each would have trained the budget).
    ``trial_minutes_full``: the same trials without early stopping."""
    ran = [max((row.get("train_minutes", 0.0) for row in r.epochs), default=0.0) for r in records]
    saved = [
        max(0.0, budget_minutes - m)
        for r, m in zip(records, ran, strict=True)
        if r.outcome == "stopped_early"
    ]
    full = sum(ran) + sum(saved)
    return {"trial_minutes": sum(ran), "trial_minutes_full": full, "asha_saved_minutes": sum(saved)}


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_rows(records: list[TrialRecord], metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (best metric first, failed last) shared by the CSV and markdown tables."""
    keys = list(records[0].params) if records else []
    header = [
        "trial_id",
        "outcome",
        *keys,
        "epochs",
        metric,
        "train_loss",
        "mlflow_run_id",
        "error",
    ]
    order = {"completed": 0, "stopped_early": 1, "failed": 2}
    ranked = sorted(records, key=lambda r: (order[r.outcome], -(r.metric or -math.inf)))
    rows = [
        [
            r.trial_id,
            r.outcome,
            *(_fmt(r.params.get(k)) for k in keys),
            str(r.epochs_completed),
            _fmt(r.metric),
            _fmt(r.train_loss),
            r.run_id or "",
            r.error,
        ]
        for r in ranked
    ]
    return header, rows


def write_csv(records: list[TrialRecord], metric: str, path: Path) -> Path:
    header, rows = table_rows(records, metric)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def to_markdown(records: list[TrialRecord], metric: str) -> str:
    header, rows = table_rows(records, metric)
    cells = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


_STYLE = {
    "completed": dict(marker="o", color="tab:blue"),
    "stopped_early": dict(marker="s", color="tab:orange"),
    "failed": dict(marker="x", color="tab:red"),
}


def plot_sweep(
    records: list[TrialRecord],
    specs: dict[str, ParamSpec],
    metric: str,
    path: Path,
    best: TrialRecord | None = None,
) -> Path:
    """One panel per searched key: the metric (last reported) against the sampled value.

    Failed trials have no metric: they are drawn as red crosses on the bottom edge so the range
    that breaks training is visible too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    from matplotlib.transforms import blended_transform_factory

    keys = [k for k, s in specs.items() if s.kind != "choice" or _numeric(s.values)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.6))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, key in zip(axes, keys, strict=False):
        bottom = blended_transform_factory(ax.transData, ax.transAxes)
        for outcome in OUTCOMES:
            pts = [r for r in records if r.outcome == outcome and r.params.get(key) is not None]
            if outcome == "failed":
                if pts:
                    xs = [float(r.params[key]) for r in pts]
                    ys = [0.03] * len(xs)  # axes fraction: along the bottom edge
                    label = f"failed ({len(pts)})"
                    ax.scatter(xs, ys, transform=bottom, label=label, **_STYLE[outcome])
                continue
            pts = [r for r in pts if r.metric is not None]
            ax.scatter(
                [float(r.params[key]) for r in pts],
                [r.metric for r in pts],
                label=f"{outcome} ({len(pts)})",
                **_STYLE[outcome],
            )
        if best is not None and best.params.get(key) is not None:
            ax.scatter(
                [float(best.params[key])],
                [best.metric],
                marker="*",
                s=220,
                facecolors="none",
                edgecolors="black",
                label="best",
            )
        spec = specs[key]
        if spec.kind == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(spec.low / 1.1, spec.high * 1.1)  # the whole range: coverage shows too
        elif spec.kind == "uniform":
            pad = 0.03 * (spec.high - spec.low)
            ax.set_xlim(spec.low - pad, spec.high + pad)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"sweep: {metric} (last reported epoch) per trial", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_points(record: TrialRecord, metric: str, time_attr: str) -> list[tuple[float, float]]:
    """``(x, metric)`` for every reported epoch of ``record`` that has the metric; x is training
    minutes (``train_minutes``, a time-budgeted sweep) or the 1-based epoch."""
    x_key = "train_minutes" if time_attr == "train_minutes" else "epoch"
    return [(row[x_key], row[metric]) for row in record.epochs if x_key in row and metric in row]


def plot_curves(
    records: list[TrialRecord],
    metric: str,
    time_attr: str,
    rungs: list[float],
    path: Path,
    best: TrialRecord | None = None,
) -> Path:
    """Every trial's metric against ASHA's time axis, with the rungs: where each stopped trial
    was cut and what the survivors went on to reach (``plot_sweep`` shows the end values only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for rung in rungs:
        ax.axvline(rung, color="grey", linestyle=":", linewidth=1)
    for record in records:
        points = curve_points(record, metric, time_attr)
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        is_best = best is not None and record.trial_id == best.trial_id
        what = record.outcome + (", best" if is_best else "")
        ax.plot(
            xs, ys, color="black" if is_best else _STYLE[record.outcome]["color"],
            linewidth=2.2 if is_best else 1.2, marker=".", markersize=4,
            label=f"{record.trial_id} ({what}): {ys[-1]:.3f}",
        )  # fmt: skip
    unit = "training minutes" if time_attr == "train_minutes" else "epochs"
    ax.set(xlabel=unit, ylabel=metric, title=f"sweep: {metric} per trial; ASHA rungs dotted")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _numeric(values: tuple[Any, ...]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
