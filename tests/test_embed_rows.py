"""``embed`` output: ``row_id`` is the input row index (rows match back across skipped corrupt
rows), ``--normalize`` L2-normalises, the default keeps the raw backbone features. Real MLflow
registry in SQLite; the reference is the registered backbone run by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from service.cli import main
from service.config import BUNDLED_DATA_DIR
from service.data.augment import eval_transform
from service.data.decode import decode_image
from service.registry import embed_parquet
from tests import registry_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sqlite_registry(tmp_path_factory):
    return registry_store.two_versions(tmp_path_factory.mktemp("sqlite-registry"))


TEST_PARQUET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"
CORRUPT_AT = (0, 7, 13)  # input row indices holding corrupt images


@pytest.fixture(scope="module")
def with_corrupt_rows(tmp_path_factory):
    """20 good images with corrupt rows inserted at CORRUPT_AT; (path, good table)."""
    good = pq.read_table(TEST_PARQUET, columns=["image", "label"]).slice(0, 20)
    rows = good.to_pylist()
    for index in CORRUPT_AT:
        rows.insert(index, {"image": b"not an image", "label": -1})
    path = tmp_path_factory.mktemp("embed-rows") / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=good.schema), path)
    return path, good


def _reference(registry, good: pa.Table) -> np.ndarray:
    config = registry.config
    transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
    images = torch.stack([transform(decode_image(b)) for b in good.column("image").to_pylist()])
    with torch.no_grad():
        return registry.backbones[0](images).numpy()


def test_row_id_is_the_input_row_index_across_skipped_rows(
    sqlite_registry, with_corrupt_rows, tmp_path
):
    source, good = with_corrupt_rows
    out = tmp_path / "emb.parquet"
    model = f"models:/{sqlite_registry.name}@champion"
    summary = embed_parquet(model, str(source), out, batch_size=8, tracking_uri=sqlite_registry.uri)
    assert summary["skipped_corrupt"] == 3 and summary["first_corrupt_rows"] == list(CORRUPT_AT)
    result = pq.read_table(out)
    assert result.column_names == ["row_id", "label", "embedding"]
    expected_ids = [i for i in range(23) if i not in CORRUPT_AT]
    assert result.column("row_id").to_pylist() == expected_ids
    # matched back by row_id, each row is the input row it names
    inputs = pq.read_table(source).column("label").to_pylist()
    assert [inputs[i] for i in expected_ids] == result.column("label").to_pylist()
    embeddings = np.stack(result.column("embedding").to_numpy(zero_copy_only=False))
    reference = _reference(sqlite_registry, good)
    np.testing.assert_allclose(embeddings, reference, atol=1e-5)  # raw features by default
    assert not np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3)
    assert summary["normalized"] is False


def test_normalize_flag_gives_unit_rows_in_the_same_direction(
    sqlite_registry, with_corrupt_rows, tmp_path
):
    source, good = with_corrupt_rows
    out = tmp_path / "unit.parquet"
    argv = ["embed", "--model", f"models:/{sqlite_registry.name}/1", "--input", str(source)]
    argv += ["--output", str(out), "--normalize", "--tracking-uri", sqlite_registry.uri]
    assert main(argv) == 0
    embeddings = np.stack(pq.read_table(out).column("embedding").to_numpy(zero_copy_only=False))
    reference = _reference(sqlite_registry, good)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(embeddings, reference, atol=1e-5)


def test_input_with_a_row_id_column_is_refused_before_loading(tmp_path, capsys):
    path = tmp_path / "has_row_id.parquet"
    pq.write_table(pa.table({"image": [b"x"], "row_id": [5]}), path)
    argv = ["embed", "--model", "models:/nowhere@champion", "--input", str(path)]
    assert main([*argv, "--output", str(tmp_path / "o.parquet")]) == 2  # bad input
    assert "already has a 'row_id'" in capsys.readouterr().err
