"""Queries against an index folder: an image file or a text, embedded with the registered model
the index was built from (the manifest's ``model_uri``, or the one given), then searched.

* **image**: decoded and preprocessed exactly as ``contrastive embed`` does
  (``service.registry.load_encoder``'s preprocessing, ``decode_image``); the backbone's features
  for a ``backbone`` index, the image tower's joint embedding for a ``joint`` one.
* **text**: the text tower of an image–text model (``load_text_encoder``), which lives in the
  joint space: the index must be ``joint`` (built with ``--project joint``). An image-only model
  has no text tower and is refused (bad input, exit 2).

    >>> hits = search_index("idx/", text="a photo of a dog", k=5)  # doctest: +SKIP
    >>> hits["results"][0]  # doctest: +SKIP
    {'rank': 1, 'score': 0.41, 'position': 17, 'row_id': 17, 'label': 5, 'label_name': 'dog'}
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.search.errors import SearchInputError
from service.search.index import Manifest, load_index, search_vectors


@torch.inference_mode()
def embed_image_file(
    path: str | Path, model_uri: str, tracking_uri: str | None = None, *, joint: bool = False
) -> np.ndarray:
    """``[1, d]`` embedding of one image file: backbone features (as ``contrastive embed``) or,
    with ``joint``, the image–text model's L2-normalised image-tower embedding."""
    from service.data.decode import decode_image

    image = decode_image(Path(path).read_bytes())
    if joint:
        from service.registry.text import load_image_text

        loaded = load_image_text(model_uri, tracking_uri)
        x = loaded.preprocess()(image).unsqueeze(0)
        return loaded.model.encode_image(x).float().numpy()
    from service.registry.load import load_encoder

    encoder, preprocess = load_encoder(model_uri, tracking_uri)
    return encoder(preprocess(image).unsqueeze(0)).float().numpy()


@torch.inference_mode()
def embed_text(text: str, model_uri: str, tracking_uri: str | None = None) -> np.ndarray:
    """``[1, d]`` joint-space embedding of ``text`` (image–text models only)."""
    from service.registry.text import load_text_encoder

    return load_text_encoder(model_uri, tracking_uri).encode([text]).float().numpy()


@torch.inference_mode()
def project_to_joint(model_uri: str, tracking_uri: str | None = None) -> Any:
    """A function mapping backbone features ``[n, d]`` to the image–text model's joint space
    (its image projection head, then L2 normalisation), in batches."""
    from service.registry.text import load_image_text

    head = load_image_text(model_uri, tracking_uri).model.image_head

    @torch.inference_mode()
    def project(vectors: np.ndarray) -> np.ndarray:
        out = [
            torch.nn.functional.normalize(head(torch.tensor(vectors[i : i + 4096])), dim=1)
            for i in range(0, len(vectors), 4096)
        ]
        return torch.cat(out).float().numpy()

    return project


def _query_vector(
    manifest: Manifest, model: str, image: str | None, text: str | None, tracking_uri: str | None
) -> np.ndarray:
    if (image is None) == (text is None):
        raise SearchInputError("give exactly one of --image FILE and --text TEXT")
    if text is not None:
        vector = embed_text(text, model, tracking_uri)  # image-only models raise (bad input)
        if manifest.space != "joint":
            raise SearchInputError(
                "this index holds backbone features, not the image–text joint space that text "
                "queries live in: rebuild it with `contrastive index build ... --model "
                f"{model} --project joint`"
            )
        return vector
    if not Path(image).is_file():
        raise FileNotFoundError(f"no image file at {image}")
    return embed_image_file(image, model, tracking_uri, joint=manifest.space == "joint")


def search_index(
    index_dir: str | Path,
    *,
    image: str | None = None,
    text: str | None = None,
    model: str | None = None,
    k: int = 10,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """The ``k`` rows nearest to the query (see the module doc): ``results`` (rank, score,
    position in the index, and the row's columns), the model used and the index kind."""
    if k < 1:
        raise SearchInputError(f"k must be >= 1, got {k}")
    index, rows, manifest = load_index(index_dir)
    model = model or manifest.model_uri
    if model is None:
        raise SearchInputError(
            f"{index_dir} does not say which model made its embeddings: give --model "
            "models:/NAME@ALIAS (or build the index with --model)"
        )
    vector = _query_vector(manifest, model, image, text, tracking_uri)
    started = time.monotonic()
    scores, positions = search_vectors(index, vector, manifest.metric, k)
    seconds = time.monotonic() - started
    results = []
    for rank, (score, position) in enumerate(zip(scores[0], positions[0], strict=True), start=1):
        if position < 0:
            continue
        row = rows.slice(int(position), 1).to_pylist()[0]
        results.append({"rank": rank, "score": round(float(score), 6), "position": int(position),
                        **_plain(row)})  # fmt: skip
    return {
        "index": str(index_dir),
        "model_uri": model,
        "query": {"image": image} if image is not None else {"text": text},
        "kind": manifest.kind,
        "metric": manifest.metric,
        "k": k,
        "search_ms": round(seconds * 1000, 3),
        "results": results,
    }


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-able values (bytes columns, e.g. an image kept by mistake, become their length)."""
    return {k: (f"<{len(v)} bytes>" if isinstance(v, bytes) else v) for k, v in row.items()}


def format_results(results: list[dict[str, Any]], width: int = 40) -> str:
    """The results as a plain-text table (rank, score, then the row's columns).

    >>> print(format_results([{"rank": 1, "score": 0.5, "position": 3, "row_id": 3}]))
    rank  score     position  row_id
    1     0.500000  3         3
    """
    if not results:
        return "no results"
    columns = list(results[0])
    cells = [[_cell(r.get(c), width) for c in columns] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    rows = [columns, *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _cell(value: Any, width: int) -> str:
    text = f"{value:.6f}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"
