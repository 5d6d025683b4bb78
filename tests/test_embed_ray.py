"""Distributed ``embed`` (``--address`` / ``--distributed``): the same embeddings as the local
``embed`` by ``row_id``, a rerun skips the shards already written, another model version is
refused before Ray starts. Real MLflow registry in SQLite (``tests/registry_store.py``)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.cli import main
from service.config import BUNDLED_DATA_DIR
from service.data.sources import inspect_source
from service.registry import embed_parquet
from service.registry.embed_ray import (
    MANIFEST_FILE,
    plan_embedding,
    plan_shards,
    run_embedding,
)
from service.registry.errors import RegistryInputError
from tests import registry_store

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_PARQUET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"
CORRUPT_AT = 300  # a global row id holding a corrupt image (second file)


@pytest.fixture(scope="module")
def sqlite_registry(tmp_path_factory):
    return registry_store.two_versions(tmp_path_factory.mktemp("sqlite-registry"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The bundled test subset as 4 files of 250 rows (row groups of 100), one corrupt row."""
    table = pq.read_table(TEST_PARQUET, columns=["image", "label"])
    images = table.column("image").to_pylist()
    images[CORRUPT_AT] = b"not an image"
    table = table.set_column(0, "image", pa.array(images, table.schema.field("image").type))
    directory = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        pq.write_table(table.slice(250 * i, 250), directory / f"part-{i}.parquet",
                       row_group_size=100)  # fmt: skip
    return directory


def test_shards_follow_files_and_row_groups(corpus):
    shards = plan_shards(inspect_source(str(corpus)), shard_rows=200)
    # per file: groups of 100, 100, 50 rows → [0, 1] (200 rows) then [2] (50 rows)
    assert [(s.file_index, s.groups, s.row_start, s.rows) for s in shards[:3]] == [
        (0, (0, 1), 0, 200),
        (0, (2,), 200, 50),
        (1, (0, 1), 250, 200),
    ]
    assert len(shards) == 8 and sum(s.rows for s in shards) == 1000


def test_another_model_version_is_refused_before_ray(sqlite_registry, corpus, tmp_path, capsys):
    out = tmp_path / "emb"
    v1 = f"models:/{sqlite_registry.name}/1"
    plan = plan_embedding(v1, str(corpus), str(out), sqlite_registry.uri, shard_rows=200)
    assert plan.manifest.model_version == v1 and len(plan.pending) == 8
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["model_version"] == v1
    # The alias resolves to its version: champion is v1, so this is the same output.
    same = plan_embedding(f"{sqlite_registry.name}@champion", str(corpus), str(out),
                          sqlite_registry.uri, shard_rows=200)  # fmt: skip
    assert same.manifest.model_version == v1
    code = main(["embed", "--distributed", "--model", f"{sqlite_registry.name}@latest-trained",
                 "--input", str(corpus), "--output", str(out), "--shard-rows", "200",
                 "--tracking-uri", sqlite_registry.uri])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "never mixes two model versions" in err and f"{sqlite_registry.name}/2" in err
    import ray

    assert not ray.is_initialized()  # refused before any Ray started
    with pytest.raises(RegistryInputError, match="shard_rows=200"):
        plan_embedding(v1, str(corpus), str(out), sqlite_registry.uri, shard_rows=100)


def test_non_empty_output_without_manifest_is_refused(sqlite_registry, corpus, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RegistryInputError, match="without _manifest.json"):
        plan_embedding(f"models:/{sqlite_registry.name}/1", str(corpus), str(tmp_path),
                       sqlite_registry.uri)  # fmt: skip


@pytest.mark.slow
def test_distributed_matches_local_and_resumes(sqlite_registry, corpus, tmp_path):
    import ray

    model = f"models:/{sqlite_registry.name}@champion"
    local = embed_parquet(model, str(corpus), tmp_path / "local.parquet", batch_size=64,
                          tracking_uri=sqlite_registry.uri)  # fmt: skip
    out = tmp_path / "dist"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        plan = plan_embedding(model, str(corpus), str(out), sqlite_registry.uri, shard_rows=200)
        first = run_embedding(plan, batch_size=64, concurrency=2)
        assert first["shards_written"] == 8 and first["actors"] == 2
        assert first["rows_in"] == 1000 and first["skipped_corrupt"] == 1
        assert first["first_corrupt_rows"] == [CORRUPT_AT] == local["first_corrupt_rows"]
        got = pq.read_table(out).sort_by("row_id")  # the manifest is not a .parquet file
        want = pq.read_table(tmp_path / "local.parquet").sort_by("row_id")
        assert got.column("row_id").to_pylist() == want.column("row_id").to_pylist()
        assert got.column("label").to_pylist() == want.column("label").to_pylist()
        np.testing.assert_allclose(
            np.stack(got.column("embedding").to_numpy(zero_copy_only=False)),
            np.stack(want.column("embedding").to_numpy(zero_copy_only=False)),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip
        files = set(got.column("source_file").to_pylist())
        assert files == {os.path.realpath(corpus / f"part-{i}.parquet") for i in range(4)}

        # Resume: one shard lost, the others untouched.
        shard_files = sorted(out.glob("part-*.parquet"))
        mtimes = {p.name: p.stat().st_mtime_ns for p in shard_files}
        shard_files[3].unlink()
        plan = plan_embedding(model, str(corpus), str(out), sqlite_registry.uri, shard_rows=200)
        assert [s.name for s in plan.pending] == [shard_files[3].name]
        again = run_embedding(plan, batch_size=64)
        assert again["shards_skipped"] == 7 and again["shards_written"] == 1
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")
                if p.name != shard_files[3].name} == {
            k: v for k, v in mtimes.items() if k != shard_files[3].name
        }  # fmt: skip
        assert pq.read_table(out).num_rows == 999
    finally:
        ray.shutdown()
