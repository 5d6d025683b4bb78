"""Nearest-neighbour search over embeddings: faiss indexes built from ``contrastive embed``
output (``index``: exact below a documented size, IVF-Flat with measured recall beyond) and
queries by image file or text with the registered model they came from (``query``).
Between the registry and the commands in the import order (docs/registry.md, "Search")."""

from service.search.errors import SearchInputError
from service.search.index import (
    EXACT_BELOW,
    METRICS,
    TARGET_RECALL,
    BuiltIndex,
    Embeddings,
    Manifest,
    build_index,
    build_index_from_parquet,
    load_index,
    read_embeddings,
    recall_at_k,
    save_index,
    search_vectors,
)
from service.search.query import (
    embed_image_file,
    embed_text,
    format_results,
    project_to_joint,
    search_index,
)

__all__ = [
    "EXACT_BELOW",
    "METRICS",
    "TARGET_RECALL",
    "BuiltIndex",
    "Embeddings",
    "Manifest",
    "SearchInputError",
    "build_index",
    "build_index_from_parquet",
    "embed_image_file",
    "embed_text",
    "format_results",
    "load_index",
    "project_to_joint",
    "read_embeddings",
    "recall_at_k",
    "save_index",
    "search_index",
    "search_vectors",
]
