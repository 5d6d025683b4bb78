"""Finding and validating image Parquet: files, directories, globs, clear errors; seeded limits."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.config import BUNDLED_DATA_DIR, REPO_ROOT
from service.data import DataError, inspect_parquet, read_image_table, resolve_parquet_files
from service.data.ray_dataset import read_ray_dataset

TEST_SUBSET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _write(path, n=3, with_image=True, start=0):
    columns = {"label": pa.array(range(start, start + n), pa.int64())}
    if with_image:
        columns["image"] = pa.array([b"x"] * n, pa.binary())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_resolves_file_directory_and_glob(tmp_path):
    a = _write(tmp_path / "d" / "a.parquet")
    b = _write(tmp_path / "d" / "sub" / "b.parquet")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    (tmp_path / "d" / "notes.txt").write_text("")

    _, files = resolve_parquet_files(str(a))
    assert files == [str(a)]
    _, files = resolve_parquet_files(str(tmp_path / "d"))
    assert files == [str(a), str(b)]  # recursive, sorted, bookkeeping files ignored
    _, files = resolve_parquet_files(str(tmp_path / "d" / "*.parquet"))
    assert files == [str(a)]  # "*" stays within one directory level
    _, files = resolve_parquet_files(str(tmp_path / "d" / "**" / "*.parquet"))
    assert files == [str(a), str(b)]
    _, files = resolve_parquet_files(f"file://{tmp_path / 'd'}")  # URIs go through from_uri
    assert files == [str(a), str(b)]


def test_multi_file_read_concatenates_in_file_order(tmp_path):
    _write(tmp_path / "d" / "a.parquet", n=3, start=0)
    _write(tmp_path / "d" / "b.parquet", n=2, start=3)
    table = read_image_table(str(tmp_path / "d"))
    assert table.column("label").to_pylist() == [0, 1, 2, 3, 4]
    assert inspect_parquet(str(tmp_path / "d")).num_rows == 5


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.parquet"
    for read in (read_image_table, read_ray_dataset):  # both readers validate before reading
        with pytest.raises(DataError, match="nope.parquet.*does not exist"):
            read(str(missing))


def test_directory_without_parquet_and_unmatched_glob(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match="no Parquet files found in directory .*empty"):
        read_image_table(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no files match"):
        read_image_table(str(tmp_path / "empty" / "*.parquet"))


def test_missing_image_column_names_file_and_columns(tmp_path):
    bad = _write(tmp_path / "d" / "b.parquet", with_image=False)
    _write(tmp_path / "d" / "a.parquet")
    for read in (read_image_table, read_ray_dataset):
        with pytest.raises(DataError, match=r"b\.parquet.*no 'image' column.*\['label'\]"):
            read(str(bad.parent))


def test_wrong_image_type_and_not_parquet(tmp_path):
    pq.write_table(pa.table({"image": pa.array([1, 2])}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="ints.parquet.*'image' is int64, expected binary"):
        read_image_table(str(tmp_path / "ints.parquet"))
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="fake.parquet.*not a readable Parquet file"):
        read_image_table(str(tmp_path / "fake.parquet"))


def test_empty_dataset_is_named(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), empty)
    for read in (read_image_table, read_ray_dataset):
        with pytest.raises(DataError, match="empty.parquet.*is empty"):
            read(str(empty))


def test_limit_is_a_seeded_shuffle_not_the_head():
    full = read_image_table(str(TEST_SUBSET), columns=["label"]).column("label").to_numpy()
    a = read_image_table(str(TEST_SUBSET), columns=["label"], limit=50, seed=1)
    b = read_image_table(str(TEST_SUBSET), columns=["label"], limit=50, seed=1)
    c = read_image_table(str(TEST_SUBSET), columns=["label"], limit=50, seed=2)
    assert a.equals(b) and not a.equals(c)
    assert len(set(a.column("label").to_pylist())) > 5  # many classes, not one block
    rows = np.random.default_rng(1).permutation(len(full))[:50]
    assert a.column("label").to_pylist() == full[rows].tolist()
    with pytest.raises(DataError, match="data.limit must be >= 1"):
        read_image_table(str(TEST_SUBSET), limit=0)


def test_unknown_column_request(tmp_path):
    with pytest.raises(DataError, match=r"no column\(s\) \['caption'\]"):
        read_image_table(str(TEST_SUBSET), columns=["image", "caption"])


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="full CIFAR-10 in ../shared/data not present")
def test_full_cifar_footers():
    source = inspect_parquet(str(SHARED_DATA / "cifar10-train.parquet"))
    assert source.num_rows == 50_000 and source.has_label and source.has_label_name
