"""The config every command starts from: YAML + ``--set`` overrides + every owner's rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Config


def load_checked_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """``service.train.preflight.load_checked_config``, imported when called: ``contrastive
    --help`` must not import torch."""
    from service.train.preflight import load_checked_config as load

    return load(path, overrides)
