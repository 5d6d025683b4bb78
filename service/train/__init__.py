"""Training: the per-worker step and state (no Ray needed), and the Ray Train loop/driver.

``service.train.loop.train_func`` (per worker) and ``service.train.driver`` (builds the
``TorchTrainer``) import Ray; they are not imported here so the step can be used without it.
"""

from service.data.pipeline import steps_per_epoch
from service.train.amp import Amp, amp_policy
from service.train.budget import TrainClock
from service.train.checkpoint import (
    STATE_FILE,
    load_encoder_from_checkpoint,
    load_state,
    load_training_model_from_checkpoint,
    restore_training_state,
    training_state_dict,
)
from service.train.epoch import (
    EPOCH_METRICS,
    KnnMonitor,
    Monitor,
    build_monitor,
    flag_collapse,
    monitor_decode_once,
    monitor_metrics,
)
from service.train.inputs import WorkerInputs, resolve_storage_path
from service.train.optim import SCHEDULES, lr_schedule
from service.train.state import TrainState, build_state
from service.train.step import NonFiniteLossError, train_step

__all__ = [
    "EPOCH_METRICS",
    "SCHEDULES",
    "STATE_FILE",
    "Amp",
    "KnnMonitor",
    "Monitor",
    "NonFiniteLossError",
    "TrainClock",
    "TrainState",
    "WorkerInputs",
    "amp_policy",
    "build_monitor",
    "build_state",
    "flag_collapse",
    "load_encoder_from_checkpoint",
    "load_training_model_from_checkpoint",
    "load_state",
    "lr_schedule",
    "monitor_decode_once",
    "monitor_metrics",
    "resolve_storage_path",
    "restore_training_state",
    "steps_per_epoch",
    "train_step",
    "training_state_dict",
]
