"""``contrastive tune``: a Ray Tune sweep over temperature / augmentation strength."""

from __future__ import annotations

from typing import Any

from service.commands.config import load_checked_config


def tune_command(
    config_path: str | None,
    overrides: list[str] | None = None,
    num_samples: int | None = None,
    address: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Load the config, then run (or with ``resume``, continue) the sweep it describes.

    Returns the JSON-able summary: best_config (the searched keys), best_metric, num_trials,
    num_stopped_early, num_failed, parent_run_id, model_uri, ...
    """
    from service.tune.sweep import run_sweep

    config = load_checked_config(config_path, overrides)
    return run_sweep(config, num_samples=num_samples, address=address, resume=resume)
