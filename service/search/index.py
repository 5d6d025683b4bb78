"""Nearest-neighbour indexes over embedding Parquet (the output of ``contrastive embed``).

An index folder holds three files:

* ``index.faiss``: the faiss index; vector ``i`` is row ``i`` of the metadata;
* ``rows.parquet``: ``row_id`` and every other non-embedding column of the embeddings
  (``label``, ``label_name``, ``text``, the source file, ...), in index order;
* ``manifest.json``: what was indexed and how (``MANIFEST_FILE``; see :class:`Manifest`).

**Which index.** Below ``exact_below`` vectors (default ``EXACT_BELOW`` = 100,000) the index is
exact: ``IndexFlatIP`` (brute force, every query scans every vector). At or above it, it is an
inverted file of flat vectors (``IndexIVFFlat``) with ``nlist = min(4·√n, n // 39)`` k-means cells
(at least 39 training points per cell, as faiss asks; trained on
at most ``TRAIN_SAMPLE`` vectors); ``nprobe`` (cells scanned per query) starts at 8 and doubles
until recall@10 against exact search on ``RECALL_QUERIES`` sampled vectors (leave-one-out: a
query's own match is not counted) reaches
``TARGET_RECALL`` (0.95) or every cell is scanned. The recall reached is printed and stored.

**Metric.** ``cosine`` (the default) L2-normalises the vectors and the queries, so the inner
product is the cosine similarity; ``ip`` keeps them as they are (raw inner product).

    >>> import numpy as np
    >>> vectors = np.eye(3, dtype=np.float32)
    >>> built = build_index(vectors, metric="cosine")
    >>> built.manifest.kind, built.manifest.count
    ('exact', 3)
    >>> scores, ids = search_vectors(built.index, vectors[:1] * 2, built.manifest.metric, k=2)
    >>> ids[0].tolist()[0], round(float(scores[0][0]), 3)
    (0, 1.0)
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from service.search.errors import SearchInputError

Metric = Literal["cosine", "ip"]
METRICS = ("cosine", "ip")
EXACT_BELOW = 100_000  # brute force below this many vectors: < ~50 ms per query at d = 512
TARGET_RECALL = 0.95
RECALL_QUERIES = 1000
RECALL_K = 10
FIRST_NPROBE = 8
TRAIN_SAMPLE = 256 * 1024  # k-means training vectors (faiss warns beyond 256 per centroid)
INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"
MANIFEST_FILE = "manifest.json"
EMBEDDING_COLUMN = "embedding"
FORMAT_VERSION = 1
# Schema-metadata keys under which embedding Parquet may say which model produced it.
MODEL_KEYS = {"model_uri": (b"contrastive.model_uri", b"model_uri"),
              "model_version": (b"contrastive.model_version", b"model_version")}  # fmt: skip


@dataclass
class Manifest:
    """``manifest.json``: the index's kind and parameters, and what it was built from."""

    kind: Literal["exact", "ivf-flat"]
    metric: Metric
    dim: int
    count: int
    model_uri: str | None = None
    model_version: str | None = None
    space: Literal["backbone", "joint"] = "backbone"  # joint: image–text space (text queries)
    embeddings: str = ""
    nlist: int | None = None
    nprobe: int | None = None
    recall_at_10: float | None = None  # approximate kinds only, vs exact on sampled queries
    recall_queries: int | None = None
    build_seconds: float = 0.0
    parameters: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def save(self, directory: Path) -> Path:
        path = directory / MANIFEST_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST_FILE
        if not path.exists():
            raise SearchInputError(
                f"{directory} is not an index folder (no {MANIFEST_FILE}); build one with "
                "`contrastive index build --embeddings DIR --out DIR`"
            )
        data = json.loads(path.read_text())
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise SearchInputError(f"{path} is from a newer contrastive-service; upgrade it")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Embeddings:
    """Vectors ``[n, d]`` float32, the other columns (``rows``), and the model named in the
    Parquet schema metadata, if any."""

    vectors: np.ndarray
    rows: pa.Table
    model_uri: str | None = None
    model_version: str | None = None


@dataclass
class BuiltIndex:
    index: Any  # faiss.Index
    manifest: Manifest


def _say(message: str) -> None:
    print(f"[index] {message}", file=sys.stderr, flush=True)


def read_embeddings(path: str | Path) -> Embeddings:
    """Read embedding Parquet (one file, a directory of shards, a glob or a URI)."""
    from service.data.parquet import resolve_parquet_files

    filesystem, files = resolve_parquet_files(str(path))
    if not files:
        raise SearchInputError(f"no Parquet files at {path}")
    dataset = pds.dataset(files, filesystem=filesystem, format="parquet")
    if EMBEDDING_COLUMN not in dataset.schema.names:
        raise SearchInputError(
            f"{path} has no {EMBEDDING_COLUMN!r} column ({dataset.schema.names}): "
            "give the output of `contrastive embed`"
        )
    table = dataset.to_table()
    if table.num_rows == 0:
        raise SearchInputError(f"{path} holds no embeddings")
    column = table.column(EMBEDDING_COLUMN).combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise SearchInputError(f"{EMBEDDING_COLUMN!r} must be a fixed-size list, got {column.type}")
    if column.null_count:
        raise SearchInputError(f"{path}: {column.null_count} rows have a null embedding")
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    vectors = np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)
    meta = dataset.schema.metadata or {}
    found = {
        name: next((meta[k].decode() for k in keys if k in meta), None)
        for name, keys in MODEL_KEYS.items()
    }
    rows = table.drop_columns([EMBEDDING_COLUMN]).replace_schema_metadata(None)
    return Embeddings(vectors, rows, found["model_uri"], found["model_version"])


def prepare_vectors(vectors: np.ndarray, metric: Metric) -> np.ndarray:
    """float32, C-contiguous, L2-normalised for ``cosine`` (zero vectors stay zero)."""
    if metric not in METRICS:
        raise SearchInputError(f"metric must be one of {'|'.join(METRICS)}, got {metric!r}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_index(vectors: np.ndarray) -> Any:
    """Brute-force inner-product index over already prepared vectors."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def ivf_index(vectors: np.ndarray, nlist: int, seed: int = 0) -> Any:
    """``IndexIVFFlat`` (inner product) with ``nlist`` cells, k-means on a seeded sample."""
    import faiss

    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = vectors
    if len(vectors) > TRAIN_SAMPLE:
        sample = vectors[np.sort(rng.choice(len(vectors), TRAIN_SAMPLE, replace=False))]
    index.train(sample)
    index.add(vectors)
    return index


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k.

    >>> recall_at_k(np.array([[0, 1], [2, 9]]), np.array([[1, 0], [2, 3]]))
    0.75
    """
    k = exact_ids.shape[1]
    pairs = zip(approx_ids, exact_ids, strict=True)
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in pairs]
    return float(np.sum(hits) / (len(exact_ids) * k))


def _without_self(ids: np.ndarray, picked: np.ndarray, k: int) -> np.ndarray:
    """Each row's ids without the query's own id (the vector it was sampled as), first ``k``."""
    return np.stack([row[row != own][:k] for row, own in zip(ids, picked, strict=True)])


def tune_nprobe(index: Any, vectors: np.ndarray, queries: int, seed: int = 0) -> tuple[int, float]:
    """The smallest doubling of ``nprobe`` (from ``FIRST_NPROBE``) whose recall@10 vs exact on
    ``queries`` sampled vectors reaches ``TARGET_RECALL``; ``(nprobe, recall)``. Each sampled
    vector's own match is left out of both result lists (leave-one-out): counting it would
    flatter the index, since a stored vector always lies in the cell probed first."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(vectors), min(queries, len(vectors)), replace=False))
    sample = vectors[picked]
    k = min(RECALL_K, len(vectors) - 1)
    exact_ids = _without_self(exact_index(vectors).search(sample, k + 1)[1], picked, k)
    nprobe = min(FIRST_NPROBE, index.nlist)
    while True:
        index.nprobe = nprobe
        found = _without_self(index.search(sample, k + 1)[1], picked, k)
        recall = recall_at_k(found, exact_ids)
        if recall >= TARGET_RECALL or nprobe >= index.nlist:
            return nprobe, recall
        nprobe = min(nprobe * 2, index.nlist)


def build_index(
    vectors: np.ndarray,
    *,
    metric: Metric = "cosine",
    exact_below: int = EXACT_BELOW,
    recall_queries: int = RECALL_QUERIES,
    seed: int = 0,
) -> BuiltIndex:
    """An exact index below ``exact_below`` vectors, an IVF-Flat one (``nprobe`` tuned to
    ``TARGET_RECALL``) from there on; see the module doc."""
    if vectors.ndim != 2 or len(vectors) == 0:
        raise SearchInputError(f"need a non-empty [n, d] array of vectors, got {vectors.shape}")
    started = time.monotonic()
    x = prepare_vectors(vectors, metric)
    n, dim = x.shape
    manifest = Manifest(kind="exact", metric=metric, dim=dim, count=n)
    manifest.parameters = {"exact_below": exact_below}
    if n < exact_below:
        index = exact_index(x)
    else:
        nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39))  # >= 39 training points/cell
        index = ivf_index(x, nlist, seed)
        nprobe, recall = tune_nprobe(index, x, recall_queries, seed)
        manifest.kind, manifest.nlist, manifest.nprobe = "ivf-flat", nlist, nprobe
        manifest.recall_at_10 = round(recall, 4)
        manifest.recall_queries = min(recall_queries, n)
        manifest.parameters.update(target_recall=TARGET_RECALL, seed=seed)
    manifest.build_seconds = round(time.monotonic() - started, 3)
    return BuiltIndex(index, manifest)


def search_vectors(
    index: Any, queries: np.ndarray, metric: Metric, k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [q, k], positions [q, k])`` of the ``k`` nearest vectors (-1 past the end)."""
    q = prepare_vectors(np.atleast_2d(queries), metric)
    if q.shape[1] != index.d:
        raise SearchInputError(f"query has dim {q.shape[1]}, the index holds dim {index.d}")
    return index.search(q, min(k, index.ntotal))


def save_index(built: BuiltIndex, rows: pa.Table, out: str | Path) -> Path:
    """Write ``index.faiss``, ``rows.parquet`` and ``manifest.json`` into ``out``."""
    import faiss

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    faiss.write_index(built.index, str(directory / INDEX_FILE))
    pq.write_table(rows, directory / ROWS_FILE, compression="zstd")
    built.manifest.save(directory)
    return directory


def load_index(directory: str | Path) -> tuple[Any, pa.Table, Manifest]:
    """``(faiss index with the manifest's nprobe set, rows, manifest)`` of an index folder."""
    import faiss

    directory = Path(directory)
    manifest = Manifest.load(directory)
    index = faiss.read_index(str(directory / INDEX_FILE))
    if manifest.nprobe is not None:
        index.nprobe = manifest.nprobe
    return index, pq.read_table(directory / ROWS_FILE), manifest


def build_index_from_parquet(
    embeddings: str | Path,
    out: str | Path,
    *,
    metric: Metric = "cosine",
    exact_below: int = EXACT_BELOW,
    model_uri: str | None = None,
    project: Any = None,
) -> Manifest:
    """Read embedding Parquet, build the index (see :func:`build_index`), save it in ``out``.
    ``model_uri`` overrides the model named in the Parquet metadata; ``project`` (vectors →
    vectors) maps backbone features into an image–text model's joint space first."""
    data = read_embeddings(embeddings)
    _say(f"{len(data.vectors)} vectors of dim {data.vectors.shape[1]} from {embeddings}")
    vectors = data.vectors
    if project is not None:
        norms = np.linalg.norm(vectors, axis=1)
        if np.allclose(norms, 1.0, atol=1e-3):
            raise SearchInputError(
                f"{embeddings} holds L2-normalised embeddings; projecting into the joint space "
                "needs the backbone's raw features: embed again without --normalize"
            )
        vectors = project(vectors)
    built = build_index(vectors, metric=metric, exact_below=exact_below)
    m = built.manifest
    m.embeddings, m.model_uri = str(embeddings), model_uri or data.model_uri
    m.model_version = data.model_version if model_uri is None else None
    m.space = "backbone" if project is None else "joint"
    if m.kind == "exact":
        _say(f"exact index (IndexFlatIP, {m.count} < exact_below={exact_below})")
    else:
        _say(
            f"approximate index IVF-Flat nlist={m.nlist} nprobe={m.nprobe}: recall@10 vs exact "
            f"= {m.recall_at_10:.3f} on {m.recall_queries} sampled queries"
        )
    save_index(built, data.rows, out)
    return m
