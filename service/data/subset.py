"""Make the small stratified CIFAR-10 subset bundled with the repo (the demo and tests' default).

python -m service.data.subset ../shared/data/cifar10-train.parquet OUT.parquet --per-class 500
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def stratified_subset(table: pa.Table, per_class: int, seed: int = 0) -> pa.Table:
    """Take ``per_class`` random rows of every label, shuffled together (seeded)."""
    rng = np.random.default_rng(seed)
    labels = table.column("label").to_numpy()
    picks = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < per_class:
            raise ValueError(f"label {label} has {len(rows)} rows, fewer than {per_class}")
        picks.append(rng.choice(rows, size=per_class, replace=False))
    order = rng.permutation(np.concatenate(picks))
    return table.take(pa.array(order))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    subset = stratified_subset(pq.read_table(args.source), args.per_class, args.seed)
    pq.write_table(subset, args.out, compression="zstd")
    counts = pc.value_counts(subset.column("label")).to_pylist()
    print(f"wrote {subset.num_rows} rows to {args.out}: {counts}")


if __name__ == "__main__":
    main()
