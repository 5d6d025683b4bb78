"""Batch embedding throughput: the local ``contrastive embed`` (one process) beside the
distributed one (``--distributed``: a Ray Data actor pool of CPU actors on an embedded Ray), on
the same corpus in the same run. JSON lines: images/s, seconds, and the machine's load
(``uptime``) before and after, since a shared box moves these figures.

The model is the default config's encoder (small CNN, 32 px), random-init and registered in a
throwaway SQLite MLflow store; the corpus is the bundled train subset copied into ``--files``
Parquet files. The distributed time includes starting the actors (each loads the model once)
but not ``ray.init``.

    python bench/embed.py --files 8 --actors 2 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from service.config import BUNDLED_DATA_DIR, Config
from service.models import build_model
from service.registry import embed_parquet, register_encoder
from service.registry.embed_ray import plan_embedding, run_embedding
from service.tracking.runs import start_pretrain_run


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _setup(folder: Path, files: int) -> tuple[str, str, str, int]:
    """(tracking URI, model URI, corpus directory, rows)."""
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    config = Config()
    config.mlflow.experiment = "bench-embed"
    torch.manual_seed(0)
    backbone = build_model(config.model).backbone.eval()
    run_id = start_pretrain_run(config, uri, run_name="bench-embed")
    register_encoder(backbone, config, tracking_uri=uri, run_id=run_id, metric_name="knn_top1",
                     metric_value=0.0, knn=0.0, name="bench-embed")  # fmt: skip
    table = pq.read_table(BUNDLED_DATA_DIR / "cifar10-train-subset.parquet")
    corpus = folder / "corpus"
    corpus.mkdir()
    for i in range(files):
        pq.write_table(table, corpus / f"part-{i:03d}.parquet", row_group_size=1024)
    return uri, "models:/bench-embed/1", str(corpus), files * table.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-rows", type=int, default=4096)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        folder = Path(tmp)
        uri, model, corpus, rows = _setup(folder, args.files)
        _emit({"bench": "embed", "rows": rows, "files": args.files, "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "uptime": _uptime()})  # fmt: skip
        started = time.perf_counter()
        local = embed_parquet(model, corpus, folder / "local.parquet",
                              batch_size=args.batch_size, tracking_uri=uri)  # fmt: skip
        seconds = time.perf_counter() - started
        _emit({"mode": "local", "images_per_s": round(local["rows_in"] / seconds, 1),
               "seconds": round(seconds, 2), "uptime": _uptime()})  # fmt: skip
        ray.init(num_cpus=args.actors, include_dashboard=False)
        try:
            started = time.perf_counter()
            plan = plan_embedding(model, corpus, str(folder / "dist"), uri,
                                  shard_rows=args.shard_rows)  # fmt: skip
            dist = run_embedding(plan, args.batch_size, concurrency=args.actors)
            seconds = time.perf_counter() - started
        finally:
            ray.shutdown()
        _emit({"mode": "distributed", "actors": dist["actors"], "shards": dist["shards"],
               "images_per_s": round(dist["rows_in"] / seconds, 1),
               "seconds": round(seconds, 2), "uptime": _uptime()})  # fmt: skip


if __name__ == "__main__":
    main()
