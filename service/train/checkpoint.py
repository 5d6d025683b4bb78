"""Training checkpoints: one ``state.pt`` per checkpoint directory, loaded with weights_only=True.

A checkpoint holds everything needed to resume exactly (model incl. projection head, MoCo key
encoder and queue, loss parameters such as a learnable temperature, optimizer, scheduler, AMP
scaler, epoch, global step, metric history) plus the resolved config, so ``evaluate --checkpoint``
can rebuild the encoder without any other file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temp file + rename) so a crash never leaves a torn file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(directory / STATE_FILE)
    return directory / STATE_FILE


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory (or the ``state.pt`` file itself) without unpickling code."""
    path = Path(directory)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {path}: pass the checkpoint directory printed by "
            f"`contrastive pretrain` (it contains {STATE_FILE})"
        )
    return torch.load(path, map_location=map_location, weights_only=True)


def load_encoder_from_checkpoint(directory: str | Path) -> tuple[torch.nn.Module, Any]:
    """Rebuild the trained backbone (projection head dropped) and its Config from a checkpoint."""
    from service.config import config_from_dict
    from service.models import build_model

    state = load_state(directory)
    config = config_from_dict(state["config"])
    model = build_model(config.model)
    model.load_state_dict(state["model"])
    return model.backbone.eval(), config
