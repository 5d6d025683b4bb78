"""Training checkpoints: the schema, written once — what is saved, restored and read back.

One ``state.pt`` per checkpoint directory, loaded with ``weights_only=True`` (no code is
unpickled). It holds everything needed to resume exactly — model incl. projection head, the
loss's state (MoCo key encoder and queue, a learnable temperature), optimizer, scheduler, AMP
scaler, epoch, global step, metric history, training seconds (``TrainClock``) — plus the
resolved config, so ``evaluate --checkpoint`` can rebuild the encoder without any other file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from service.config import Config, config_from_dict

if TYPE_CHECKING:
    from service.train.state import TrainState

STATE_FILE = "state.pt"


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temp file + rename) so a crash never leaves a torn file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(directory / STATE_FILE)
    return directory / STATE_FILE


def resolve_checkpoint(directory: str | Path) -> Path:
    """The ``state.pt`` of a checkpoint directory, of the file itself, or of the latest
    checkpoint in a run folder (``storage_path/run_name``, as people naturally pass it)."""
    path = Path(directory).expanduser()
    if path.is_dir() and not (path / STATE_FILE).exists():
        checkpoints = sorted(path.glob(f"checkpoint_*/{STATE_FILE}"))  # Ray names sort by time
        if checkpoints:
            return checkpoints[-1]
    return path / STATE_FILE if path.is_dir() else path


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (see :func:`resolve_checkpoint`) without unpickling code."""
    path = resolve_checkpoint(directory)
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {path}: pass the checkpoint directory printed by "
            f"`contrastive pretrain` (it contains {STATE_FILE})"
        )
    return torch.load(path, map_location=map_location, weights_only=True)


def training_state_dict(s: TrainState) -> dict[str, Any]:
    """The checkpoint of a worker's state after epoch ``s.epoch`` (the schema)."""
    from service.models import unwrap

    scaler = s.amp.scaler
    return {
        "model": unwrap(s.model).state_dict(),
        "criterion": s.criterion.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": s.epoch,
        "global_step": s.global_step,
        "history": s.history,
        "train_seconds": s.clock.elapsed_s,
        # for the loss curve's reference line, so the driver never builds the loss again
        "chance_loss": s.expected_initial_loss(),
        "config": s.config.to_dict(),
    }


def restore_training_state(s: TrainState, saved: dict[str, Any]) -> None:
    """Load a checkpoint into ``s``; training continues with the epoch after the saved one."""
    from service.models import unwrap

    unwrap(s.model).load_state_dict(saved["model"])
    s.criterion.load_state_dict(saved["criterion"])
    s.optimizer.load_state_dict(saved["optimizer"])
    s.scheduler.load_state_dict(saved["scheduler"])
    if s.amp.scaler is not None and saved.get("scaler"):
        s.amp.scaler.load_state_dict(saved["scaler"])
    s.epoch = saved["epoch"] + 1
    s.global_step = saved["global_step"]
    s.history = list(saved["history"])
    s.clock.restore(saved.get("train_seconds", 0.0))  # a time-budgeted run resumes its budget


def checkpoint_config(saved: dict[str, Any]) -> Config:
    """The resolved config a checkpoint was trained with."""
    return config_from_dict(saved["config"])


def load_training_model_from_checkpoint(directory: str | Path) -> tuple[torch.nn.Module, Config]:
    """Rebuild the whole trained model (ContrastiveModel, or ImageTextModel with both towers)
    and its Config from a checkpoint."""
    from service.models import build_training_model

    saved = load_state(directory)
    config = checkpoint_config(saved)
    model = build_training_model(config)
    model.load_state_dict(saved["model"])
    return model.eval(), config


def load_encoder_from_checkpoint(directory: str | Path) -> tuple[torch.nn.Module, Config]:
    """The trained (image) backbone — projection head and text tower dropped — and its Config,
    from a checkpoint of either training model (both have ``.backbone``)."""
    model, config = load_training_model_from_checkpoint(directory)
    return model.backbone.eval(), config
