"""``contrastive pretrain``: distributed contrastive pretraining on Ray Train."""

from __future__ import annotations

from typing import Any

from service.commands.config import load_checked_config


def pretrain_command(
    config_path: str | None,
    overrides: list[str] | None = None,
    address: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Load and validate the config (bad input fails here, before Ray), then pretrain.

    ``address`` is a Ray address; None starts (or joins, under ``ray job submit``) a local Ray.
    ``resume`` continues the run of the same name (``train.resume``). Returns the run summary:
    checkpoint, run_id, model_uri, knn_top1, ...
    """
    from service.train.driver import run_pretraining

    config = load_checked_config(
        config_path, [*(overrides or []), *(["train.resume=true"] * resume)]
    )
    return run_pretraining(config, address=address)
