"""How well the Ray Data reader mixes a class-sorted file, and what it costs: classes per batch
and label entropy (bits) of the training batches, beside the images/s of the epoch, for the
block size whose order is shuffled every epoch (the shipped SHUFFLE_BLOCK_ROWS, and the map
batch size it replaced). JSON lines; random batches of 32 from 10 balanced classes would give
~9.66 classes and ~3.2 bits.

    python bench/shuffle.py --blocks 256 32 16 --epochs 2
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.config import BUNDLED_DATA_DIR, load_config


def _sorted_copy(folder: Path) -> str:
    table = pq.read_table(BUNDLED_DATA_DIR / "cifar10-train-subset.parquet")
    order = np.argsort(table.column("label").to_numpy(), kind="stable")
    path = folder / "class-sorted.parquet"
    pq.write_table(table.take(pa.array(order)), path, row_group_size=1000)
    return str(path)


def measure(path: str, block_rows: int, epochs: int, batch: int) -> dict:
    import service.data.ray_dataset as rd

    rd.SHUFFLE_BLOCK_ROWS = block_rows
    overrides = {"data.train": path, "data.reader": "ray", "data.val_fraction": 0.0}
    shard = rd.build_ray_train_dataset(load_config(overrides=overrides)).streaming_split(1)[0]
    entropy, classes, images = [], [], 0
    started = time.perf_counter()
    for _ in range(epochs):
        for _, labels in rd.iter_image_batches(shard, batch, drop_last=True):
            counts = np.array(list(collections.Counter(labels.tolist()).values())) / batch
            entropy.append(float(-(counts * np.log2(counts)).sum()))
            classes.append(len(counts))
            images += batch
    seconds = time.perf_counter() - started
    return {"block_rows": block_rows, "classes_per_batch": round(float(np.mean(classes)), 2),
            "entropy_bits": round(float(np.mean(entropy)), 3),
            "images_per_s": round(images / seconds, 1), "epochs": epochs}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 32, 16])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        path = _sorted_copy(Path(tmp))
        measure(path, args.blocks[0], 1, args.batch)  # warm-up: workers, imports
        for block_rows in args.blocks:
            print(json.dumps(measure(path, block_rows, args.epochs, args.batch)), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
