"""Distributed batch embedding: ``contrastive embed --address ADDR`` (or ``--distributed``).

A Parquet corpus (file, directory, glob or URI) is cut into **shards**, the unit of work and of
resume: one input file's consecutive row groups, about ``shard_rows`` rows. A Ray Data actor pool
(``map_batches(EmbedActor, concurrency=N)``, one GPU per actor when the cluster has GPUs) takes
one shard per call: the actor (the model loaded once, in ``__init__``) reads the shard's rows,
decodes them with the run's eval preprocessing, skips and counts corrupt images as the local
``embed`` does, embeds them in forward batches of ``batch_size`` and writes
``part-<first row id>.parquet`` (``row_id``, ``source_file``, the other non-image columns,
``embedding``) to the output directory, written under a temporary name then moved into place, so a
shard file is there whole or not at all. The driver sees one small summary row per shard
(progress and throughput lines); no image or embedding passes through it.

The output directory holds ``_manifest.json``: the model as asked, the **resolved version** it
pinned (an alias that moves mid-run changes nothing), the input's fingerprint and the settings. A
rerun with the same version, input and settings skips the shards already written; a rerun that
resolves to another version, or reads another input, is refused before Ray starts: one output
never mixes two model versions.

``row_id`` is the row's global position in the input (files in the source's order), the same id
the local ``embed`` writes, so the two outputs match row by row.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from service.registry.embed import (
    EMBEDDING_COLUMN,
    ROW_ID_COLUMN,
    _progress,
    model_metadata,
    pinned_model_version,
    vectors_array,
)
from service.registry.errors import RegistryInputError

MANIFEST_FILE = "_manifest.json"
SOURCE_FILE_COLUMN = "source_file"
SHARD_ROWS = 4096  # default rows per shard: one actor call, one output file, one resume unit
IMAGE_COLUMN = "image"


@dataclass(frozen=True)
class Shard:
    """One unit of work: row groups ``groups`` of input file ``file_index``; ``row_start`` is
    the global row id of its first row (also its output file's name)."""

    file_index: int
    groups: tuple[int, ...]
    row_start: int
    rows: int

    @property
    def name(self) -> str:
        return f"part-{self.row_start:012d}.parquet"


@dataclass(frozen=True)
class Manifest:
    """What an output directory holds (``_manifest.json``); a rerun must match it."""

    model: str  # as asked, e.g. models:/enc@champion
    model_version: str  # resolved and pinned: models:/enc/3, or a pulled folder's weights hash
    input: str
    input_fingerprint: str
    normalize: bool
    shard_rows: int

    def conflict(self, other: Manifest) -> str | None:
        """Why a run described by ``other`` may not write into this output (None: it may)."""
        if other.model_version != self.model_version:
            return (
                f"it holds embeddings of {self.model_version} (asked as {self.model!r}) and this "
                f"run resolves {other.model!r} to {other.model_version}; one output never mixes "
                "two model versions: embed into another --output directory"
            )
        if other.input_fingerprint != self.input_fingerprint:
            return (
                f"it holds embeddings of input {self.input!r} (fingerprint "
                f"{self.input_fingerprint}), not of {other.input!r} ({other.input_fingerprint}): "
                "embed into another --output directory"
            )
        for key in ("normalize", "shard_rows"):
            if getattr(other, key) != getattr(self, key):
                return (
                    f"it was written with {key}={getattr(self, key)}, this run asks "
                    f"{getattr(other, key)}: rerun with the same setting or another --output"
                )
        return None


@dataclass(frozen=True)
class EmbedPlan:
    """Everything decided before Ray starts: the input, the pinned model, the shards to do."""

    manifest: Manifest
    source: Any  # a ParquetSource
    output: str
    tracking_uri: str | None
    shards: list[Shard]  # all of them
    pending: list[Shard]  # not yet written
    keep: list[str]  # input columns copied to the output


def _output_fs(output: str) -> tuple[pafs.FileSystem, str]:
    if "://" in output:
        fs, path = pafs.FileSystem.from_uri(output)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(output).expanduser().resolve())


def plan_shards(source: Any, shard_rows: int = SHARD_ROWS) -> list[Shard]:
    """The input cut into shards: per file, consecutive row groups up to ``shard_rows`` rows
    (a row group larger than that is one shard on its own). Reads footers only.

    >>> from service.data.sources import inspect_source
    >>> src = inspect_source("service/data/bundled/cifar10-test-subset.parquet")
    >>> [(s.row_start, s.rows) for s in plan_shards(src, 4096)]
    [(0, 1000)]
    """
    if shard_rows < 1:
        raise RegistryInputError(f"shard_rows must be >= 1, got {shard_rows}")
    shards, offset = [], 0
    for index, file in enumerate(source.files):
        with source.filesystem.open_input_file(file) as handle:
            meta = pq.ParquetFile(handle).metadata
        groups: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if groups and rows + n > shard_rows:
                shards.append(Shard(index, tuple(groups), offset, rows))
                offset, groups, rows = offset + rows, [], 0
            groups.append(g)
            rows += n
        if groups and rows:
            shards.append(Shard(index, tuple(groups), offset, rows))
            offset += rows
    return shards


def plan_embedding(
    model: str,
    input_path: str,
    output: str,
    tracking_uri: str | None = None,
    *,
    normalize: bool = False,
    shard_rows: int = SHARD_ROWS,
) -> EmbedPlan:
    """Inspect the input, pin the model version, check (or write) the output's manifest and
    list the shards still to embed. No Ray: a refused rerun costs no cluster time."""
    from service.data.errors import DataError
    from service.data.sources import inspect_source

    source = inspect_source(input_path)
    if source.format != "parquet":
        raise RegistryInputError(
            f"distributed embed reads Parquet (file, directory, glob or URI); {input_path!r} is "
            f"{source.format}: embed it locally (without --address/--distributed)"
        )
    if ROW_ID_COLUMN in source.columns or EMBEDDING_COLUMN in source.columns:
        raise DataError(
            f"{input_path!r} already has a {ROW_ID_COLUMN!r} or {EMBEDDING_COLUMN!r} column; "
            "the output adds both: rename it first"
        )
    manifest = Manifest(
        model=model,
        model_version=pinned_model_version(model, tracking_uri),
        input=input_path,
        input_fingerprint=source.fingerprint(),
        normalize=normalize,
        shard_rows=shard_rows,
    )
    shards = plan_shards(source, shard_rows)
    fs, root = _output_fs(output)
    _check_or_write_manifest(fs, root, output, manifest)
    written = {info.base_name for info in fs.get_file_info(pafs.FileSelector(root))}
    pending = [s for s in shards if s.name not in written]
    keep = [c for c in source.columns if c not in (IMAGE_COLUMN, SOURCE_FILE_COLUMN)]
    return EmbedPlan(manifest, source, output, tracking_uri, shards, pending, keep)


def _check_or_write_manifest(
    fs: pafs.FileSystem, root: str, output: str, manifest: Manifest
) -> None:
    path = f"{root}/{MANIFEST_FILE}"
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise RegistryInputError(f"--output {output!r} is a file; give a directory")
    if info.type == pafs.FileType.Directory:
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as handle:
                recorded = Manifest(**json.loads(handle.read()))
            problem = recorded.conflict(manifest)
            if problem:
                raise RegistryInputError(f"refusing to write into {output!r}: {problem}")
            return
        if fs.get_file_info(pafs.FileSelector(root)):
            raise RegistryInputError(
                f"--output {output!r} is a non-empty directory without {MANIFEST_FILE}; "
                "give a new or empty directory"
            )
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(path) as handle:
        handle.write((json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n").encode())


class EmbedActor:
    """One per pool slot: loads the pinned model once, then embeds and writes shard after
    shard (``__call__`` gets a batch of shard descriptors, returns one summary row each)."""

    def __init__(self, plan: EmbedPlan, batch_size: int) -> None:
        import torch
        from PIL import Image

        from service.registry.load import load_encoder

        self.plan, self.batch_size = plan, batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        encoder, self.preprocess = load_encoder(plan.manifest.model_version, plan.tracking_uri)
        self.encoder = encoder.to(self.device)
        with torch.inference_mode():  # the dim, for a shard whose images are all corrupt
            probe = self.preprocess(Image.new("RGB", (8, 8))).unsqueeze(0).to(self.device)
            self.dim = int(self.encoder(probe).shape[1])
        self.fs, self.root = _output_fs(plan.output)
        self.locations = plan.source.locations()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = [self._shard(i, batch) for i in range(len(batch["row_start"]))]
        return {key: np.array([s[key] for s in stats]) for key in stats[0]}

    def _shard(self, i: int, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        started = time.monotonic()
        shard = Shard(int(batch["file_index"][i]), tuple(int(g) for g in batch["groups"][i]),
                      int(batch["row_start"][i]), int(batch["rows"][i]))  # fmt: skip
        source = self.plan.source
        with source.filesystem.open_input_file(source.files[shard.file_index]) as handle:
            table = pq.ParquetFile(handle).read_row_groups(
                list(shard.groups), columns=[IMAGE_COLUMN, *self.plan.keep]
            )
        rows, features = self._embed(table.column(IMAGE_COLUMN).to_pylist())
        out = table.select(self.plan.keep).take(pa.array(rows, pa.int64()))
        ids = pa.array(np.asarray(rows, dtype=np.int64) + shard.row_start, pa.int64())
        out = out.add_column(0, ROW_ID_COLUMN, ids)
        where = pa.array([self.locations[shard.file_index]] * len(rows), pa.string())
        out = out.add_column(1, SOURCE_FILE_COLUMN, where)
        out = out.append_column(EMBEDDING_COLUMN, features)
        self._write(out, shard.name)
        bad = sorted(set(range(table.num_rows)) - set(rows))
        return {"rows_in": table.num_rows, "rows_out": len(rows), "skipped": len(bad),
                "first_bad": int(bad[0] + shard.row_start) if bad else -1,
                "seconds": time.monotonic() - started}  # fmt: skip

    def _embed(self, blobs: list[Any]) -> tuple[list[int], pa.FixedSizeListArray]:
        """The local embed's decoding, preprocessing and forward, ``batch_size`` at a time."""
        import torch
        import torch.nn.functional as F

        from service.data.decode import decode_image
        from service.data.errors import CorruptImageError

        rows, parts = [], []
        for start in range(0, len(blobs), self.batch_size):
            images = []
            for j, blob in enumerate(blobs[start : start + self.batch_size], start):
                try:
                    images.append(self.preprocess(decode_image(blob)))
                    rows.append(j)
                except CorruptImageError:
                    pass  # counted by the caller: rows it was not given back
            if images:
                with torch.inference_mode():
                    features = self.encoder(torch.stack(images).to(self.device)).float()
                if self.plan.manifest.normalize:
                    features = F.normalize(features, dim=1)
                parts.append(features.cpu())
        if not parts:
            return rows, pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), self.dim)
        return rows, vectors_array(torch.cat(parts))

    def _write(self, table: pa.Table, name: str) -> None:
        """Write under a temporary name, then move: a shard file is whole or absent."""
        tmp = f"{self.root}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        m = self.plan.manifest
        table = table.replace_schema_metadata(model_metadata(m.model, m.model_version))
        with self.fs.open_output_stream(tmp) as handle:
            pq.write_table(table, handle, compression="zstd")
        self.fs.move(tmp, f"{self.root}/{name}")


def _resources(cpus_per_actor: float, concurrency: int | None, shards: int) -> dict[str, Any]:
    """GPU actors when the cluster has GPUs (one each), else CPU actors filling the cluster."""
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    slots = gpus if gpus else max(1, int(total.get("CPU", 1) // cpus_per_actor))
    n = max(1, min(concurrency or slots, shards))
    return {"actors": n, "num_cpus": cpus_per_actor, "num_gpus": 1 if gpus else 0}


def _summaries(plan: EmbedPlan, batch_size: int, resources: dict[str, Any]) -> Any:
    """One summary row per pending shard, from an actor pool (lazy: iterate to run it)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our own lines (``_progress``), not Ray Data's bars
    context.print_on_execution_start = False
    items = [{**asdict(s), "groups": list(s.groups)} for s in plan.pending]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EmbedActor,
        fn_constructor_kwargs={"plan": plan, "batch_size": batch_size},
        batch_size=1,  # one shard per call: the actor writes it whole
        compute=ray.data.ActorPoolStrategy(size=resources["actors"]),
        num_cpus=resources["num_cpus"],
        num_gpus=resources["num_gpus"],
    )


# Ray Data's own lines that our progress lines replace.
_RAY_DATA_LINES = (
    ("ray.data._internal.progress", "Progress bars disabled"),
    ("ray.data._internal.execution.streaming_executor", "execution finished in"),
)


def run_embedding(
    plan: EmbedPlan,
    batch_size: int = 256,
    *,
    concurrency: int | None = None,
    cpus_per_actor: float = 1.0,
    progress_every_s: float = 5.0,
) -> dict[str, Any]:
    """Embed ``plan.pending`` with an actor pool on the connected Ray cluster; returns counts
    (this run's: rows, corrupt rows skipped; the output's: shards), throughput, actors."""
    from contextlib import ExitStack

    from service.console import dropping_log_messages

    if batch_size < 1:
        raise RegistryInputError(f"batch_size must be >= 1, got {batch_size}")
    started = last = time.monotonic()
    counts = {"rows_in": 0, "rows_out": 0, "skipped": 0}
    first_bad: list[int] = []
    resources: dict[str, Any] = {"actors": 0, "num_cpus": 0, "num_gpus": 0}
    total = sum(s.rows for s in plan.pending)
    if plan.pending:
        resources = _resources(cpus_per_actor, concurrency, len(plan.pending))
        with ExitStack() as stack:
            for logger, text in _RAY_DATA_LINES:
                stack.enter_context(dropping_log_messages(logger, text))
            for row in _summaries(plan, batch_size, resources).iter_rows():
                for key in counts:
                    counts[key] += int(row[key])
                first_bad += [int(row["first_bad"])] if row["first_bad"] >= 0 else []
                if time.monotonic() - last > progress_every_s or counts["rows_in"] == total:
                    _progress(counts["rows_in"], total, counts["skipped"], started)
                    last = time.monotonic()
    seconds = time.monotonic() - started
    return {
        "model_uri": plan.manifest.model,
        "model_version": plan.manifest.model_version,
        "output": plan.output,
        "shards": len(plan.shards),
        "shards_skipped": len(plan.shards) - len(plan.pending),
        "shards_written": len(plan.pending),
        "rows_in": counts["rows_in"],
        "rows_out": counts["rows_out"],
        "skipped_corrupt": counts["skipped"],
        "first_corrupt_rows": sorted(first_bad)[:10],  # the first of each shard
        "actors": resources["actors"],
        "gpus_per_actor": resources["num_gpus"],
        "seconds": round(seconds, 3),
        "rows_per_s": round(counts["rows_in"] / max(seconds, 1e-9), 1),
    }
