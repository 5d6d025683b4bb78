"""What a sweep prints: one ``[tune]`` line per trial report and end, instead of Tune's tables.

Ray Tune's own reporter prints a configuration table, a status table every 30 s and a result
table per trial start and end (~120 lines for a 2-trial sweep). A sweep runs with Tune's output
off (``verbose=0``; ``RAY_AIR_NEW_OUTPUT=0`` for the ``fit``, because Tune's newer output engine
prints its configuration table and a result table per failed trial even at ``verbose=0``) and
with :class:`TrialLines` on the driver. Tune's real warnings and errors (a failed trial's
traceback) still reach the log through its loggers. ``CONTRASTIVE_TUNE_VERBOSE=1`` (or 2) brings
Tune's tables back.

    >>> lines = TrialLines("knn_top1", max_epochs=4)
    >>> lines.result_line("7d3c_00001", {"epochs_completed": 2, "knn_top1": 0.3125})
    'trial 7d3c_00001 epoch 2/4: knn_top1 0.3125'
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ray.tune import Callback

from service.console import say
from service.tune.summary import classify

VERBOSE_ENV = "CONTRASTIVE_TUNE_VERBOSE"
_NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


def tune_verbosity() -> int:
    """Tune's own ``verbose``: 0 unless ``$CONTRASTIVE_TUNE_VERBOSE`` asks for its tables."""
    value = os.environ.get(VERBOSE_ENV, "0").strip()
    return min(max(int(value), 0), 2) if value.isdigit() else 0


@contextlib.contextmanager
def quiet_tune_output() -> Iterator[None]:
    """Around ``Tuner.fit``: Tune's legacy output engine, silent at ``verbose=0`` (the newer one
    still prints its tables there). Unchanged when ``tune_verbosity()`` asks for Tune's output."""
    if tune_verbosity() > 0:
        yield
        return
    saved = os.environ.get(_NEW_OUTPUT_ENV)
    os.environ[_NEW_OUTPUT_ENV] = "0"  # read once, when fit() starts
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_NEW_OUTPUT_ENV, None)
        else:
            os.environ[_NEW_OUTPUT_ENV] = saved


class TrialLines(Callback):
    """Driver-side Tune callback: one line per trial report (its epoch and the sweep metric) and
    one when it ends (completed, stopped early by ASHA, or failed)."""

    def __init__(
        self,
        metric: str,
        max_epochs: int,
        budget_minutes: float | None = None,
        max_steps: int | None = None,
    ) -> None:
        self.metric = metric
        self.max_epochs = max_epochs
        self.budget_minutes = budget_minutes
        self.max_steps = max_steps

    def result_line(self, trial_id: str, result: dict[str, Any]) -> str:
        epoch = result.get("epochs_completed", result.get("training_iteration", "?"))
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, int | float) else "not reported"
        line = f"trial {trial_id} epoch {epoch}/{self.max_epochs}: {self.metric} {shown}"
        if self.budget_minutes is not None and "train_minutes" in result:
            line += f" ({result['train_minutes']:.1f}/{self.budget_minutes:g} min)"
        return line

    def end_line(self, trial_id: str, result: dict[str, Any], failed: bool) -> str:
        epochs = int(result.get("epochs_completed") or 0)
        outcome = classify(
            "error" if failed else None,
            epochs,
            self.max_epochs,
            result.get("train_minutes"),
            self.budget_minutes,
            result.get("global_step"),
            self.max_steps,
        )
        what = {"completed": "completed", "stopped_early": "stopped early (ASHA)"}
        value = result.get(self.metric)
        last = f"; {self.metric} {value:.4f}" if isinstance(value, int | float) else ""
        return f"trial {trial_id} {what.get(outcome, 'failed')} after {epochs} epoch(s){last}"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        say("tune", self.result_line(trial.trial_id, result))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        say("tune", self.end_line(trial.trial_id, trial.last_result or {}, failed=False))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        say("tune", self.end_line(trial.trial_id, trial.last_result or {}, failed=True))
