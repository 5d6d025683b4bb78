"""Everything a sweep needs decided before Ray starts: metric/mode, searcher, ASHA, resources.

``resolve_settings(config)`` validates ``config.tune`` (and the parts of the Config it depends
on) and returns a frozen ``SweepSettings``; errors are ``SweepConfigError`` (a ``ConfigError``)
naming the key and value. No Ray import here, so all of it is unit-testable in milliseconds.

    >>> from service.config import load_config
    >>> s = resolve_settings(load_config(overrides={"tune.max_concurrent_trials": 2}))
    >>> s.metric, s.mode, s.resources.cpus_per_trial, s.resources.cpus_needed
    ('knn_top1', 'max', 2.0, 4.0)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from service.config import Config, ConfigError, Searcher
from service.train.epoch import EPOCH_METRICS, monitor_metrics
from service.train.inputs import resolve_storage_path
from service.tune.space import ParamSpec, parse_points, parse_space

SEARCHERS = get_args(Searcher)  # tune.search (and tune.mode) are checked with the config's types

# The Tune trial only drives a Ray Train run (its workers request their own CPUs/GPUs), so it
# needs no CPU. Tune rejects an all-zero request; a 1-byte memory reservation keeps the trial
# actor off the CPU ledger, so N trials × W workers × C CPUs fits a cluster of exactly that size.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1}


class SweepConfigError(ConfigError):
    """``config.tune`` (or how it combines with the rest of the Config) is invalid."""


@dataclass(frozen=True)
class SweepResources:
    """Resource math of one sweep: each trial is a full Ray Train run with its own workers."""

    concurrent_trials: int
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: int

    @property
    def cpus_per_trial(self) -> float:
        return self.workers_per_trial * self.cpus_per_worker

    @property
    def cpus_needed(self) -> float:
        return self.concurrent_trials * self.cpus_per_trial

    @property
    def gpus_needed(self) -> int:
        return self.concurrent_trials * self.workers_per_trial * self.gpus_per_worker

    def as_dict(self) -> dict[str, float]:
        return {
            "concurrent_trials": self.concurrent_trials,
            "workers_per_trial": self.workers_per_trial,
            "cpus_per_worker": self.cpus_per_worker,
            "gpus_per_worker": self.gpus_per_worker,
            "cpus_needed": self.cpus_needed,
            "gpus_needed": self.gpus_needed,
        }


@dataclass(frozen=True)
class SweepSettings:
    """The validated sweep: what to search, how to search it, what it costs."""

    name: str
    storage_path: str
    specs: dict[str, ParamSpec]
    metric: str
    mode: str
    search: str
    num_samples: int
    grace_period: float  # ASHA's first rung, in units of time_attr
    reduction_factor: int
    max_epochs: int
    seed: int
    resources: SweepResources
    time_attr: str = "epochs_completed"  # or "train_minutes" under a time budget
    max_t: float = 0.0  # past the last report: ASHA stops what reaches max_t
    budget_minutes: float | None = None
    max_steps: int | None = None  # train.max_steps: a trial that reaches it has completed
    wall_budget_minutes: float | None = None  # tune.time_budget_minutes: the whole sweep's cap
    points: tuple[dict[str, Any], ...] = ()  # tune.points_to_evaluate: tried before sampling

    @property
    def rung_unit(self) -> str:
        return "min of training" if self.time_attr == "train_minutes" else "epoch(s)"

    @property
    def rungs(self) -> list[float]:
        """ASHA's milestones on ``time_attr`` before the end of training: grace x factor^k."""
        end = self.budget_minutes if self.time_attr == "train_minutes" else self.max_epochs
        rungs, t = [], self.grace_period
        while t < (end or 0):
            rungs.append(t)
            t *= self.reduction_factor
        return rungs

    @property
    def experiment_path(self) -> Path:
        return Path(self.storage_path) / self.name


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SweepConfigError(message)


def _objective(config: Config) -> tuple[str, str]:
    """``tune.metric`` / ``tune.mode``; unset, the monitor's headline metric and its direction.
    A metric the run never reports is refused here, before Ray: Tune would otherwise fail the
    sweep on the first trial's first report. The candidates: what the validation monitor
    reports (``train.epoch.monitor_metrics``), then the loss and throughput (``EPOCH_METRICS``);
    other reported values (lr, temperature, global_step) are bookkeeping, not objectives."""
    monitored = monitor_metrics(config)
    reported = {**monitored, **EPOCH_METRICS}
    headline = next(iter(reported))
    metric, mode = config.tune.metric or headline, config.tune.mode
    if not monitored:
        what = "no validation split (data.val null, data.val_fraction 0)"
        if config.tune.metric is None:  # the loss is the only signal left (documented)
            print(f"[tune] {what}: optimising train_loss (min)", file=sys.stderr)
    else:
        what = "its " + ("image–text validation" if config.text.column else "kNN") + " monitor"
    _require(
        metric in reported,
        f"tune.metric={metric!r} is never reported by this run ({what}); choose one of "
        f"{sorted(reported)}, or leave tune.metric unset for {headline}",
    )
    _require(
        mode in (None, reported[metric]),
        f"tune.mode={mode!r} with tune.metric={metric!r} would pick the worst trial; "
        f"use tune.mode={reported[metric]}",
    )
    return metric, reported[metric]


def _asha_axis(config: Config) -> tuple[str, float, float]:
    """ASHA's time axis, first rung and max_t. Epochs, unless a time budget is set: then trials
    reach an epoch after different training times (a 16 px trial runs ~3x the epochs of a 32 px
    one), so comparing them at epoch milestones would compare unequal training; the rungs are
    training minutes (``train_minutes``, reported every epoch) instead."""
    t, budget = config.tune, config.train.time_budget_minutes
    if budget is None:
        epochs = config.train.epochs
        _require(
            1 <= t.grace_period_epochs <= epochs,
            f"tune.grace_period_epochs must be in [1, train.epochs={epochs}], "
            f"got {t.grace_period_epochs}",
        )
        # One past the last epoch: ASHA stops a trial that reaches max_t, which would kill a
        # finished trial before its Train run shuts down cleanly; the loop ends it anyway.
        return "epochs_completed", t.grace_period_epochs, epochs + 1
    grace = t.grace_period_minutes
    if grace is None:
        grace = budget / t.reduction_factor**2
    _require(
        0 < grace <= budget,
        f"tune.grace_period_minutes must be in (0, train.time_budget_minutes={budget:g}], "
        f"got {grace:g}",
    )
    # The last report comes after the step that crossed the budget: past it, never reached.
    return "train_minutes", float(grace), 1.5 * budget


def resolve_settings(config: Config, num_samples: int | None = None) -> SweepSettings:
    """Validate ``config.tune`` and everything derived from it; ``num_samples`` overrides it."""
    t = config.tune
    specs = parse_space(config)
    points = parse_points(config, specs)
    metric, mode = _objective(config)
    samples = t.num_samples if num_samples is None else num_samples
    _require(
        isinstance(samples, int) and samples >= 1, f"tune.num_samples must be >= 1, got {samples}"
    )
    _require(
        t.max_concurrent_trials >= 1,
        f"tune.max_concurrent_trials must be >= 1, got {t.max_concurrent_trials}",
    )
    epochs = config.train.epochs
    _require(
        t.reduction_factor >= 2, f"tune.reduction_factor must be >= 2, got {t.reduction_factor}"
    )
    time_attr, grace, max_t = _asha_axis(config)
    cap = t.time_budget_minutes
    _require(cap is None or cap > 0, f"tune.time_budget_minutes must be > 0 (or null), got {cap}")
    # tune.name / tune.storage_path are optional newer fields; fall back to the train settings.
    name = getattr(t, "name", None) or f"{config.train.run_name}-sweep"
    _require("/" not in name and name not in (".", ".."), f"sweep name {name!r} is not a name")
    storage = getattr(t, "storage_path", None) or config.train.storage_path
    resources = SweepResources(
        concurrent_trials=min(t.max_concurrent_trials, samples),
        workers_per_trial=config.train.num_workers,
        cpus_per_worker=float(config.train.cpus_per_worker),
        gpus_per_worker=1 if config.train.use_gpu else 0,
    )
    return SweepSettings(
        name=name,
        storage_path=resolve_storage_path(storage),
        specs=specs,
        metric=metric,
        mode=mode,
        search=t.search,
        num_samples=samples,
        grace_period=grace,
        reduction_factor=t.reduction_factor,
        max_epochs=epochs,
        time_attr=time_attr,
        max_t=max_t,
        budget_minutes=config.train.time_budget_minutes,
        max_steps=config.train.max_steps,
        wall_budget_minutes=cap,
        points=tuple(points),
        seed=config.train.seed,
        resources=resources,
    )


def trial_base_config(config: Config, settings: SweepSettings) -> Config:
    """The Config every trial starts from: a monitor metric must be reported every epoch,
    because ASHA compares trials at epoch milestones and Tune rejects results without it."""
    if settings.metric in monitor_metrics(config) and config.eval.knn_every_epochs != 1:
        print(
            f"[tune] eval.knn_every_epochs={config.eval.knn_every_epochs} -> 1 for the sweep "
            f"(ASHA needs {settings.metric} at every epoch)",
            file=sys.stderr,
        )
        config.eval.knn_every_epochs = 1
    return config
