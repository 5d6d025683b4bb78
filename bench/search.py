"""Nearest-neighbour index cost and quality (``service.search``): build time, one-query latency
and recall@10 against exact search, exact (IndexFlatIP) vs the approximate IVF-Flat index, on
synthetic clustered unit vectors (Gaussian clusters, like embeddings of a labelled corpus).
JSON lines, one per index kind.

    python bench/search.py --n 50000 --dim 128 --queries 200
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from service.search import build_index, recall_at_k, search_vectors


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim))).astype(
        np.float32
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--queries", type=int, default=200)
    a = parser.parse_args()
    points = clustered(a.n + a.queries, a.dim, a.clusters, seed=0)
    vectors, queries = points[: a.n], points[a.n :]  # queries: same clusters, not indexed
    exact = build_index(vectors, exact_below=a.n + 1)
    _, truth = search_vectors(exact.index, queries, "cosine", k=10)
    for built in (exact, build_index(vectors, exact_below=1)):
        started = time.perf_counter()
        ids = np.concatenate(
            [search_vectors(built.index, q[None], "cosine", 10)[1] for q in queries]
        )
        latency = (time.perf_counter() - started) / a.queries
        m = built.manifest
        print(json.dumps({
            "kind": m.kind, "n": a.n, "dim": a.dim, "build_s": m.build_seconds,
            "query_ms": round(latency * 1000, 3), "recall_at_10": round(recall_at_k(ids, truth), 4),
            "recall_at_10_at_build": m.recall_at_10, "nlist": m.nlist, "nprobe": m.nprobe,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
