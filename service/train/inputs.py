"""What the driver hands each Ray Train worker, typed, and the quantities derived from it.

Everything a worker needs crosses the Ray boundary in one :class:`WorkerInputs` (pickled by
Ray); the storage location is derived here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.config import Config
from service.data.pipeline import PreparedData


def resolve_storage_path(path: str) -> str:
    """Absolute local path, or an object-store URI (``s3://``, ``gs://``) unchanged."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class WorkerInputs:
    """The per-worker ``train_loop_config["inputs"]`` of a pretraining run."""

    config: Config
    storage_path: str  # resolved (see resolve_storage_path)
    run_name: str
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    # Image–text mode (text.column set): the run's tokenizer (service.text.Tokenizer.to_json),
    # fitted on the driver; workers tokenise their caption batches with it.
    tokenizer_json: str | None = None
    # The data path the driver decided (service.data.pipeline.prepare: mode, rows and their key,
    # the shared decoded copy); None: each worker prepares its own (tests, benches).
    data: PreparedData | None = None

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    @property
    def fault_marker_dir(self) -> Path:
        """Where one-shot fault-injection markers live (test drills; local storage only)."""
        return Path(self.run_dir) / "faults"
