"""Run identity: a pretraining run is ``train.storage_path/train.run_name``, its checkpoints and
one MLflow run, whose id is kept beside the checkpoints in ``run.json``.

A new pretraining never reuses a finished run's checkpoints by accident: an existing run is
continued only with ``train.resume=true`` (``--resume``), and then only if nothing that changes
what is trained differs from the recorded config. A run that never reached its first checkpoint
(its ``run.json`` is written before Ray starts) trained nothing: it does not block its name, and
a new pretraining under that name starts over. Decided on the driver, before MLflow or Ray:

    >>> from service.config import Config
    >>> plan_run(Config()).kind in {"new", "resume", "done"}  # doctest: +SKIP
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from service.config import Config, ConfigError, flatten
from service.train.inputs import resolve_storage_path

RUN_RECORD = "run.json"
# Keys a resumed run may change: where/how it runs, how it is evaluated and logged. Every other
# key changes what is trained (data, augmentation, model, loss, batch, optimiser, seed).
RESUMABLE_KEYS = {
    "train.epochs", "train.resume", "train.num_workers", "train.use_gpu", "train.cpus_per_worker",
    "train.placement_strategy", "train.log_every_steps", "train.checkpoint_every_epochs",
    "train.max_failures", "train.storage_path", "train.amp",
    "data.val", "data.test", "data.loader_workers", "data.max_bad_fraction",
    "data.share_decoded",
}  # fmt: skip
RESUMABLE_SECTIONS = ("eval.", "mlflow.", "tune.", "fault.")


@dataclass(frozen=True)
class RunPlan:
    """What ``run_pretraining`` will do: train a ``new`` run, ``resume`` one, or nothing
    (``done``: the recorded run already trained every requested epoch, or spent its
    ``train.time_budget_minutes`` or ``train.max_steps``)."""

    kind: str
    run_dir: str
    record: dict[str, Any] | None = None  # run.json of an existing run
    last_epoch: int | None = None  # epoch of the latest checkpoint (0-based)
    note: str | None = None  # a line for the user: a "new" run replaces an attempt that failed

    @property
    def mlflow_run_id(self) -> str | None:
        return (self.record or {}).get("mlflow_run_id")

    @property
    def tracking_uri(self) -> str | None:
        return (self.record or {}).get("tracking_uri")


def _fs(path: str) -> tuple[Any, str]:
    from pyarrow import fs

    if "://" in path:
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), path


def run_dir(config: Config) -> str:
    return posixpath.join(resolve_storage_path(config.train.storage_path), config.train.run_name)


def read_record(directory: str) -> dict[str, Any] | None:
    filesystem, path = _fs(posixpath.join(directory, RUN_RECORD))
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read().decode())
    except FileNotFoundError:
        return None


def write_record(directory: str, record: dict[str, Any]) -> None:
    filesystem, path = _fs(directory)
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(posixpath.join(path, RUN_RECORD)) as stream:
        stream.write(json.dumps(record, indent=2, sort_keys=True).encode())


def latest_checkpoint(directory: str) -> str | None:
    """The newest ``checkpoint_*`` folder holding a ``state.pt`` (Ray names sort by time)."""
    from pyarrow import fs

    from service.train.checkpoint import STATE_FILE

    filesystem, path = _fs(directory)
    try:
        infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return None
    names = sorted(i.base_name for i in infos if i.base_name.startswith("checkpoint_"))
    for name in reversed(names):
        state = posixpath.join(path, name, STATE_FILE)
        if filesystem.get_file_info(state).type == fs.FileType.File:
            return posixpath.join(directory, name)
    return None


def data_fingerprint(path: str) -> str:
    """What identifies the training data independently of where it is mounted or uploaded
    (``ray job submit`` copies the checkout to a new directory per job): each file's name and
    row count, and the schema. Footers only."""
    from service.data.sources import inspect_source

    return inspect_source(path).fingerprint()


def changed_keys(record: dict[str, Any], config: Config) -> list[str]:
    """Keys whose value differs from the recorded run and that change what is trained.

    ``data.train`` is compared by :func:`data_fingerprint` when the record has one."""
    old, new = flatten(record["config"]), config.flat()
    if "data_fingerprint" in record:
        old["data.train"] = record["data_fingerprint"]
        new["data.train"] = data_fingerprint(config.data.train)
    return sorted(
        key
        for key in set(old) | set(new)
        if old.get(key) != new.get(key)
        and key not in RESUMABLE_KEYS
        and not key.startswith(RESUMABLE_SECTIONS)
    )


def _checkpoint_epoch(checkpoint: str) -> tuple[int, dict[str, Any], float, int]:
    """Epoch (0-based), config, training seconds and global step of a checkpoint."""
    from service.train.checkpoint import load_state

    if "://" in checkpoint:  # object store: read the small state through a local download
        import ray.train

        with ray.train.Checkpoint(checkpoint).as_directory() as local:
            saved = load_state(local)
    else:
        saved = load_state(checkpoint)
    seconds, steps = float(saved.get("train_seconds", 0.0)), int(saved.get("global_step", 0))
    return int(saved["epoch"]), saved["config"], seconds, steps


def _attempt_note(name: str, record: dict[str, Any] | None) -> str | None:
    """What to say when a new run replaces an attempt that never reached a checkpoint."""
    if record is None:
        return None
    return (
        f"run {name!r} never reached its first checkpoint (its MLflow run "
        f"{record.get('mlflow_run_id')} stays as it ended); starting it again as a new run"
    )


def plan_run(config: Config) -> RunPlan:
    """Decide new / resume / done for ``config``, or refuse with a message that says why."""
    directory = run_dir(config)
    record = read_record(directory)
    checkpoint = latest_checkpoint(directory)
    name = config.train.run_name
    if not config.train.resume:
        if checkpoint is None:  # nothing trained: an earlier attempt (run.json) does not count
            return RunPlan("new", directory, note=_attempt_note(name, record))
        raise ConfigError(
            f"run {name!r} already exists in {directory}; pass --resume (train.resume=true) to "
            f"continue it, or choose a new train.run_name for a new pretraining"
        )
    if record is None and checkpoint is None:
        raise ConfigError(
            f"nothing to resume: no run {name!r} in {directory}; drop --resume to start it"
        )
    last_epoch, recorded_config, trained_s, steps = (
        _checkpoint_epoch(checkpoint) if checkpoint else (None, None, 0.0, 0)
    )
    record = record if record and record.get("config") else {"config": recorded_config}
    changed = changed_keys(record, config)
    if changed:
        old = flatten(record["config"])
        listed = ", ".join(f"{k}: {old.get(k)!r} -> {config.flat().get(k)!r}" for k in changed)
        raise ConfigError(
            f"cannot resume run {name!r}: these keys change what is trained ({listed}). Resume "
            f"with the recorded values, or start a new run under another train.run_name"
        )
    done = 0 if last_epoch is None else last_epoch + 1
    if config.train.epochs < done:
        raise ConfigError(
            f"cannot resume run {name!r} with train.epochs={config.train.epochs}: it has already "
            f"trained {done} epochs; raise train.epochs to train more"
        )
    budget = config.train.time_budget_minutes  # unchanged from the record (a training key)
    spent = budget is not None and last_epoch is not None and trained_s >= 60 * budget
    max_steps = config.train.max_steps  # a training key too: it shapes the LR schedule
    spent = spent or (max_steps is not None and last_epoch is not None and steps >= max_steps)
    kind = "done" if config.train.epochs == done or spent else "resume"
    return RunPlan(kind, directory, record, last_epoch)
