"""What the driver hands each Ray Train worker, typed, and the quantities derived from it.

Everything a worker needs crosses the Ray boundary in one :class:`WorkerInputs` (pickled by
Ray); world size, steps per epoch and the storage location are derived here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import Config


def resolve_storage_path(path: str) -> str:
    """Absolute local path, or an object-store URI (``s3://``, ``gs://``) unchanged."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def steps_per_epoch(rows: int, global_batch_size: int) -> int:
    """Full global batches per epoch; the last partial batch is dropped on every rank.

    ``DistributedSampler(drop_last=True)`` + a ``drop_last`` loader give floor(floor(N/W)/b),
    which equals floor(N / (W·b)); the Ray Data reader is cut to the same count.
    """
    return rows // global_batch_size


@dataclass(frozen=True)
class WorkerInputs:
    """The per-worker ``train_loop_config["inputs"]`` of a pretraining run."""

    config: Config
    storage_path: str  # resolved (see resolve_storage_path)
    run_name: str
    rows: int | None = None  # training rows for the Ray Data reader (footer count); None: torch
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    # Image–text mode (text.column set): the run's tokenizer (service.text.Tokenizer.to_json),
    # fitted on the driver; workers tokenise their caption batches with it.
    tokenizer_json: str | None = None
    # Decode once (data.share_decoded): the training rows the driver decoded and put in Ray's
    # object store (service.data.decoded.SharedDecoded); workers map it instead of decoding.
    decoded_ref: Any = None

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    @property
    def fault_marker_dir(self) -> Path:
        """Where one-shot fault-injection markers live (test drills; local storage only)."""
        return Path(self.run_dir) / "faults"
