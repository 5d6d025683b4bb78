"""Nearest-neighbour search (``service.search``, ``contrastive index build`` / ``search``):
exact indexes equal a numpy brute force, the approximate one reports its recall against exact
search, and a registered encoder's neighbours of a test image share its label well above the
shuffled-label control. Real faiss, real MLflow registry in SQLite; no mocks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.cli import main
from service.config import BUNDLED_DATA_DIR
from service.search import (
    SearchInputError,
    build_index,
    build_index_from_parquet,
    load_index,
    read_embeddings,
    recall_at_k,
    search_vectors,
)
from tests import registry_store

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_PARQUET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"


def _clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return points.astype(np.float32)


def _brute_force(vectors: np.ndarray, queries: np.ndarray, k: int, cosine: bool):
    if cosine:
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_exact_index_equals_numpy_brute_force(metric):
    vectors = np.random.default_rng(1).normal(size=(500, 16)).astype(np.float32)
    queries = np.random.default_rng(2).normal(size=(20, 16)).astype(np.float32)
    built = build_index(vectors, metric=metric)
    assert built.manifest.kind == "exact" and built.manifest.recall_at_10 is None
    scores, ids = search_vectors(built.index, queries, metric, k=10)
    want_scores, want_ids = _brute_force(vectors, queries, 10, metric == "cosine")
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_approximate_index_reports_its_recall_against_exact_search():
    points = _clustered(6200)
    vectors, queries = points[:6000], points[6000:]  # held-out queries from the same clusters
    built = build_index(vectors, exact_below=5000, recall_queries=300)
    m = built.manifest
    assert m.kind == "ivf-flat" and m.count == 6000
    assert m.nlist == min(round(4 * np.sqrt(6000)), 6000 // 39)
    assert m.recall_at_10 >= 0.9 and m.recall_queries == 300 and 1 <= m.nprobe <= m.nlist
    # an independent measurement on other queries agrees
    _, ids = search_vectors(built.index, queries, "cosine", k=10)
    _, want = _brute_force(vectors, queries, 10, cosine=True)
    assert recall_at_k(ids, want) >= 0.9


def test_index_folder_round_trip_from_shards_keeps_rows_and_the_model(tmp_path):
    vectors = _clustered(300, dim=8)
    shards = tmp_path / "emb"
    shards.mkdir()
    for part in range(3):
        chunk = vectors[part * 100 : (part + 1) * 100]
        table = pa.table(
            {
                "row_id": pa.array(np.arange(part * 100, (part + 1) * 100), pa.int64()),
                "label": pa.array(np.arange(100) % 10, pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), 8),
            }
        ).replace_schema_metadata({"contrastive.model_uri": "models:/enc/3"})
        pq.write_table(table, shards / f"part-{part:05d}.parquet")
    data = read_embeddings(shards)
    np.testing.assert_array_equal(data.vectors, vectors)
    assert data.model_uri == "models:/enc/3" and data.rows.column_names == ["row_id", "label"]
    manifest = build_index_from_parquet(shards, tmp_path / "idx")
    index, rows, loaded = load_index(tmp_path / "idx")
    assert loaded == manifest and loaded.model_uri == "models:/enc/3" and loaded.dim == 8
    assert rows.column("row_id").to_pylist() == list(range(300)) and index.ntotal == 300
    on_disk = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert on_disk["kind"] == "exact" and on_disk["count"] == 300


def test_embeddings_without_an_embedding_column_are_refused(tmp_path):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "x.parquet")
    with pytest.raises(SearchInputError, match="no 'embedding' column"):
        read_embeddings(tmp_path / "x.parquet")


@pytest.fixture(scope="module")
def indexed_test_set(tmp_path_factory):
    """The bundled test subset (1,000 images) embedded with a registered encoder and indexed
    through the command line: (registry, index dir, embeddings path)."""
    directory = tmp_path_factory.mktemp("search")
    registry = registry_store.two_versions(directory)
    model = f"models:/{registry.name}@champion"
    embeddings = directory / "emb.parquet"
    common = ["--tracking-uri", registry.uri]
    argv = ["embed", "--model", model, "--input", str(TEST_PARQUET), "--output", str(embeddings)]
    assert main([*argv, *common]) == 0
    # the embeddings name the model that made them, its alias pinned to a version
    meta = pq.read_schema(embeddings).metadata
    assert meta[b"contrastive.model_uri"] == model.encode()
    assert meta[b"contrastive.model_version"].startswith(f"models:/{registry.name}/".encode())
    out = directory / "index"
    argv = ["index", "build", "--embeddings", str(embeddings), "--out", str(out)]
    assert main(argv) == 0  # no --model: the index takes it from the embeddings
    return registry, out, embeddings


def test_neighbours_of_a_test_image_share_its_label_well_above_chance(
    indexed_test_set, tmp_path, capsys
):
    registry, index_dir, _ = indexed_test_set
    table = pq.read_table(TEST_PARQUET, columns=["image", "label"])
    labels = np.asarray(table.column("label").to_pylist())
    capsys.readouterr()
    image = tmp_path / "query.png"
    image.write_bytes(table.column("image")[5].as_py())
    argv = ["search", "--index", str(index_dir), "--image", str(image), "-k", "11"]
    assert main([*argv, "--tracking-uri", registry.uri]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert "rank" in captured.err and "label_name" in captured.err  # the table, on stderr
    top = result["results"]
    assert [r["rank"] for r in top] == list(range(1, 12)) and result["kind"] == "exact"
    assert top[0]["row_id"] == 5 and top[0]["score"] == pytest.approx(1.0, abs=1e-4)

    # 20 queries through the library (the model loads once per call; the index is exact)
    index, rows, manifest = load_index(index_dir)
    data = read_embeddings(indexed_test_set[2])
    queries = np.arange(0, 1000, 50)
    _, ids = search_vectors(index, data.vectors[queries], manifest.metric, k=11)
    neighbours = ids[:, 1:]  # the query itself is first
    agreement = float(np.mean(labels[neighbours] == labels[queries][:, None]))
    shuffled = np.random.default_rng(0).permutation(labels)
    control = float(np.mean(shuffled[neighbours] == shuffled[queries][:, None]))
    print(f"label agreement {agreement:.3f}, shuffled control {control:.3f}")
    assert agreement > 0.2 and agreement > control + 0.08, (agreement, control)


def test_text_query_on_an_image_only_model_is_refused_with_exit_2(indexed_test_set, capsys):
    registry, index_dir, _ = indexed_test_set
    argv = ["search", "--index", str(index_dir), "--text", "a photo of a dog"]
    assert main([*argv, "--tracking-uri", registry.uri]) == 2
    assert "image-only encoder" in capsys.readouterr().err


def test_text_search_on_an_image_text_model_ranks_like_its_two_towers(tmp_path, capsys):
    """An image–text version: backbone features projected into the joint space at build time;
    a text query's ranking equals the towers' own cosine ranking; an index of backbone features
    refuses text queries and says how to rebuild it."""
    import torch

    from service.config import Config
    from service.data.augment import eval_transform
    from service.data.decode import decode_image
    from service.models import build_image_text_model
    from service.registry import register_encoder
    from service.text import Tokenizer
    from service.tracking.runs import start_pretrain_run

    config = Config()
    config.mlflow.experiment, config.mlflow.registered_model_name = "test-search", "clip-search"
    config.text.column, config.text.vocab_size, config.text.context_length = "text", 300, 16
    config.text.width, config.text.layers, config.text.heads = 32, 1, 2
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    table = pq.read_table(BUNDLED_DATA_DIR / "cifar10-test-captions.parquet").slice(0, 40)
    tokenizer = Tokenizer.fit(table.column("text").to_pylist(), config.text.vocab_size)
    torch.manual_seed(0)
    model = build_image_text_model(config).eval()
    run_id = start_pretrain_run(config, uri, run_name="clip")
    register_encoder(model.backbone, config, tracking_uri=uri, run_id=run_id,
                     metric_name="knn_top1", metric_value=0.5, image_text=model,
                     tokenizer=tokenizer)  # fmt: skip
    pq.write_table(table, tmp_path / "in.parquet")
    model_uri, common = "models:/clip-search@champion", ["--tracking-uri", uri]
    embed = ["embed", "--model", model_uri, "--input", str(tmp_path / "in.parquet")]
    assert main([*embed, "--output", str(tmp_path / "emb.parquet"), *common]) == 0
    build = ["index", "build", "--embeddings", str(tmp_path / "emb.parquet"), "--model", model_uri]
    assert main([*build, "--out", str(tmp_path / "joint"), "--project", "joint", *common]) == 0
    assert main([*build, "--out", str(tmp_path / "backbone"), *common]) == 0
    capsys.readouterr()

    query = ["search", "--text", "a photo of a dog", "-k", "5", *common]
    assert main([*query, "--index", str(tmp_path / "joint")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
    images = torch.stack([transform(decode_image(b)) for b in table.column("image").to_pylist()])
    with torch.no_grad():
        image_vectors = model.encode_image(images)
        text_vector = model.encode_text(tokenizer.encode(["a photo of a dog"], 16))
    scores = (image_vectors @ text_vector.T).squeeze(1)
    assert [r["row_id"] for r in result["results"]] == scores.argsort(descending=True)[:5].tolist()
    assert result["results"][0]["score"] == pytest.approx(float(scores.max()), abs=1e-4)

    assert main([*query, "--index", str(tmp_path / "backbone")]) == 2
    assert "--project joint" in capsys.readouterr().err
