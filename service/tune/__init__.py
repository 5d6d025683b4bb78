"""Ray Tune sweeps over contrastive pretraining (temperature, augmentation strength, ...).

Each trial is a full distributed Ray Train run; ASHA stops weak trials at epoch milestones; the
sweep is one parent MLflow run with a nested run per trial, and the best encoder is registered.

    >>> from service.config import load_config
    >>> from service.tune import run_sweep
    >>> config = load_config("jobs/configs/tune-smoke.yaml")
    >>> summary = run_sweep(config, num_samples=4)  # doctest: +SKIP
    >>> summary["best_config"], summary["best_metric"]  # doctest: +SKIP
    ({'loss.temperature': 0.21, 'augment.strength': 0.9}, 0.43)
"""

from service.tune.sweep import SweepFailedError, run_sweep

__all__ = ["SweepFailedError", "run_sweep"]
