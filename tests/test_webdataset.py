"""WebDataset shards (service/data/webdataset.py): written from the bundled Parquet, read back.

Shards are real tars in tmp directories; nothing is mocked. One test goes through Ray Data
(``read_ray_dataset``) and is marked slow: it starts a one-CPU local Ray.
"""

from __future__ import annotations

import gzip
import io
import itertools
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.config import BUNDLED_DATA_DIR
from service.data.errors import DataError
from service.data.webdataset import (
    count_samples,
    expand_braces,
    expand_shards,
    inspect_shards,
    is_held_out,
    iter_rows,
    iter_samples,
    read_ray_dataset,
    read_table,
    sample_row,
    shard_problems,
    take_rows,
    write_shards,
)

ROWS = 240


@pytest.fixture(scope="module")
def table() -> pa.Table:
    """The first rows of the bundled captioned CIFAR-10 subset: image, label, label_name, text."""
    return pq.read_table(BUNDLED_DATA_DIR / "cifar10-train-captions.parquet").slice(0, ROWS)


@pytest.fixture(scope="module")
def six(table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Six shards of 40 samples (more shards than 2 or 3 ranks)."""
    out = tmp_path_factory.mktemp("six")
    return write_shards(table, str(out), rows_per_shard=40, text_column="text")


@pytest.fixture(scope="module")
def two(table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two shards of 120 samples (fewer shards than 3 ranks)."""
    return write_shards(table, str(tmp_path_factory.mktemp("two")), rows_per_shard=120)


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _keys(rows) -> list[str]:
    return [row["key"] for row in rows]


# ------------------------------------------------------------------------ writing, round trip


def test_round_trip_equals_the_parquet_rows(table: pa.Table, six: list[str]) -> None:
    assert [Path(s).name for s in six] == [f"shard-{i:06d}.tar" for i in range(6)]
    read = read_table(six, text_key="txt", text_column="text")
    assert read.column_names == ["image", "label", "key", "text"]
    assert read.schema.field("image").type == pa.binary()
    assert read.schema.field("label").type == pa.int64()
    assert read["image"].to_pylist() == table["image"].to_pylist()
    assert read["label"].to_pylist() == table["label"].to_pylist()
    assert read["text"].to_pylist() == table["text"].to_pylist()
    assert read["key"].to_pylist() == [f"{i:09d}" for i in range(ROWS)]
    # text_column defaults to the text key; without a text key there is no caption column
    assert read_table(six[:1], text_key="txt").column_names[-1] == "txt"
    assert read_table(six, limit=5, keep=lambda key: key.endswith("1"))["key"].to_pylist() == [
        "000000001",
        "000000011",
        "000000021",
        "000000031",
        "000000041",
    ]


def test_written_shards_are_deterministic_and_sorted(table: pa.Table, tmp_path: Path) -> None:
    first = write_shards(table.slice(0, 10), str(tmp_path / "a"), prefix="x", rows_per_shard=4)
    again = write_shards(table.slice(0, 10), str(tmp_path / "b"), prefix="x", rows_per_shard=4)
    assert [Path(p).name for p in first] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert [Path(p).read_bytes() for p in first] == [Path(p).read_bytes() for p in again]
    with tarfile.open(first[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["000000000.cls", "000000000.jpg"]  # no caption asked
    assert {m.mtime for m in members} == {0}
    assert [m.name for m in members] == sorted(m.name for m in members)


def test_image_extension_comes_from_the_bytes(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 8
    webp = b"RIFF\x00\x00\x00\x00WEBPVP8 "
    table = pa.table({"image": [png, webp, b"???"], "label": [1, 2, None]})
    (shard,) = write_shards(table, str(tmp_path))
    samples = list(iter_samples(shard))
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [
        ["cls", "png"],
        ["cls", "webp"],
        ["bin"],
    ]
    assert [sample_row(s)["image"] for s in samples] == [png, webp, None]
    assert [sample_row(s)["label"] for s in samples] == [1, 2, -1]


def test_write_shards_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no 'image' column"):
        write_shards(pa.table({"label": [1]}), str(tmp_path))
    with pytest.raises(DataError, match="no caption column 'text'"):
        write_shards(pa.table({"image": [b"x"]}), str(tmp_path), text_column="text")


def test_sample_row_reads_members_by_extension() -> None:
    sample = {"__key__": "d/7", "__url__": "x.tar", "png": b"p", "jpeg": b"j", "cls": b"oops"}
    assert sample_row(sample) == {"image": b"j", "label": -1, "key": "d/7"}  # jpeg before png
    assert sample_row(sample, "txt")["txt"] is None
    assert sample_row({"__key__": "k", "caption": "é".encode()}, ".Caption")[".Caption"] == "é"


def test_member_names_group_into_samples(tmp_path: Path) -> None:
    shard = _write_tar(
        tmp_path / "s.tar",
        [
            ("a/x.1.JPG", b"i1"),
            ("a/x.1.cls", b"3"),
            ("a/y.jpg", b"i2"),
            ("README", b"no extension: no sample"),
            ("b/.hidden", b"no key: no sample"),
        ],
    )
    samples = list(iter_samples(shard))
    assert [(s["__key__"], sorted(s)) for s in samples] == [
        ("a/x", ["1.cls", "1.jpg", "__key__", "__url__"]),  # extension: all after the first dot
        ("a/y", ["__key__", "__url__", "jpg"]),
    ]
    assert samples[0]["__url__"] == shard
    assert count_samples([shard]) == 2


def test_members_of_a_sample_must_be_consecutive(tmp_path: Path) -> None:
    shard = _write_tar(tmp_path / "s.tar", [("1.jpg", b"a"), ("2.jpg", b"b"), ("1.cls", b"0")])
    with pytest.raises(DataError, match=r"sample '1' are not consecutive.*sort"):
        list(iter_samples(shard))


# ------------------------------------------------------------------------ patterns


def test_brace_expansion() -> None:
    assert expand_braces("s/{000098..000101}.tar") == [
        "s/000098.tar",
        "s/000099.tar",
        "s/000100.tar",
        "s/000101.tar",
    ]
    assert expand_braces("{9..11}") == ["9", "10", "11"]  # no padding asked
    assert expand_braces("{3..1}-{0..4..2}") == [f"{a}-{b}" for a in (3, 2, 1) for b in (0, 2, 4)]
    assert expand_braces("{a,b{1,2}}.tar") == ["a.tar", "b1.tar", "b2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("{}/{x}") == ["{}/{x}"]


def test_expand_shards_ranges_lists_globs_and_uris(six: list[str]) -> None:
    folder = str(Path(six[0]).parent)
    assert expand_shards(f"{folder}/shard-{{000000..000005}}.tar") == six
    # ranges past the last shard keep only what exists, in expansion order
    assert expand_shards(f"{folder}/shard-{{000004..000099}}.tar") == six[4:]
    assert expand_shards(f"{folder}/shard-{{000003,000001}}.tar") == [six[3], six[1]]
    assert expand_shards(f"{folder}/shard-*.tar") == six
    assert expand_shards(f"{folder}/shard-00000[0-1].tar") == six[:2]
    uris = expand_shards(f"file://{folder}/shard-{{000000..000001}}.tar")
    assert uris == [f"file://{p}" for p in six[:2]]
    assert [s["__key__"] for s in iter_samples(uris[1])][:1] == ["000000040"]
    assert expand_shards(f"file://{folder}/*-000005.tar") == [f"file://{six[5]}"]


def test_expand_shards_with_no_match_says_so(tmp_path: Path) -> None:
    pattern = f"{tmp_path}/shard-{{000000..000003}}.tar"
    with pytest.raises(DataError, match=r"^data\.train: pattern .* matches no file"):
        expand_shards(pattern)
    with pytest.raises(DataError, match=r"^data\.val: pattern .* matches no file"):
        expand_shards(f"{tmp_path}/missing/*.tar", field="data.val")


# ------------------------------------------------------------------------ ranks, epochs


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shard_set", ["six", "two", "one"])
def test_ranks_cover_every_row_once_per_epoch(
    world: int, shard_set: str, six: list[str], two: list[str]
) -> None:
    shards = {"six": six, "two": two, "one": two[:1]}[shard_set]
    expected = sorted(_keys(read_table(shards).to_pylist()))
    for epoch in (0, 1):
        parts = [
            _keys(iter_rows(shards, rank=r, world=world, seed=5, epoch=epoch, shuffle_buffer=16))
            for r in range(world)
        ]
        assert sorted(k for part in parts for k in part) == expected
        assert all(part for part in parts)
        if len(shards) < world:  # split by sample: parts differ by at most one row
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shuffle_is_seeded_by_seed_and_epoch(six: list[str]) -> None:
    def order(epoch: int, seed: int = 0, buffer: int = 32) -> list[str]:
        return _keys(iter_rows(six, rank=1, world=2, seed=seed, epoch=epoch, shuffle_buffer=buffer))

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) != order(0)  # the buffer shuffles within shards too
    assert order(0, seed=1) != order(0)
    # without a buffer, rows keep the shard's order (shards themselves still shuffled)
    flat = order(0, buffer=0)
    assert all(flat[i] < flat[i + 1] for i in range(len(flat) - 1) if i % 40 != 39)


def test_take_rows_goes_on_into_the_next_epoch(six: list[str]) -> None:
    options = {"rank": 0, "world": 4, "seed": 3, "shuffle_buffer": 8}
    part = _keys(iter_rows(six, epoch=2, **options))  # 6 shards, 4 ranks: rank 0 reads 2 of them
    nxt = _keys(iter_rows(six, epoch=3, **options))
    assert len(part) == 80
    taken = _keys(take_rows(six, 100, epoch=2, **options))
    assert taken == part + nxt[:20]
    assert _keys(take_rows(six, 10, epoch=2, **options)) == part[:10]
    assert list(take_rows(six, 0, epoch=2, **options)) == []


def test_take_rows_refuses_a_rank_without_rows(two: list[str]) -> None:
    rows = take_rows(two, 5, rank=1, world=2, seed=0, epoch=0, shuffle_buffer=0, keep=lambda k: 0)
    with pytest.raises(DataError, match="rank 1 of 2 gets no rows from 2 shard"):
        list(rows)


def test_is_held_out_is_a_stable_fraction() -> None:
    keys = [f"{i:09d}" for i in range(20_000)]
    held = {k for k in keys if is_held_out(k, 0.1, seed=0)}
    assert abs(len(held) / len(keys) - 0.1) < 0.01
    assert held == {k for k in keys if is_held_out(k, 0.1, seed=0)}
    assert held != {k for k in keys if is_held_out(k, 0.1, seed=1)}
    assert not any(is_held_out(k, 0.0, seed=0) for k in keys[:500])
    assert all(is_held_out(k, 1.0, seed=0) for k in keys[:500])
    # a larger fraction holds out a superset: growing the validation split never moves rows back
    assert held <= {k for k in keys if is_held_out(k, 0.2, seed=0)}


def test_held_out_split_is_disjoint_and_complete_across_ranks(six: list[str]) -> None:
    def split(keep) -> list[str]:
        return [
            key
            for rank in range(3)
            for key in _keys(
                iter_rows(six, rank=rank, world=3, seed=0, epoch=0, shuffle_buffer=4, keep=keep)
            )
        ]

    train = split(lambda key: not is_held_out(key, 0.25, seed=7))
    val = split(lambda key: is_held_out(key, 0.25, seed=7))
    assert not set(train) & set(val)
    assert sorted(train + val) == [f"{i:09d}" for i in range(ROWS)]
    assert 30 < len(val) < 90


# ------------------------------------------------------------------------ damage, inspection


def _damaged(source: str, folder: Path) -> dict[str, str]:
    data = Path(source).read_bytes()
    with tarfile.open(source) as tar:
        member = tar.getmembers()[10]  # the 4th sample's image (.cls, .jpg, .txt per sample)
    damage = {
        "in-data": data[: member.offset_data + 5],
        "at-header": data[: member.offset],  # complete members, but no end-of-archive blocks
        "bad-header": data[: member.offset] + b"\x07" * 512 + data[member.offset + 512 :],
        "garbage": b"\x01" * 4096,
        "empty": b"",
    }
    for name, content in damage.items():
        (folder / f"{name}.tar").write_bytes(content)
    return {name: str(folder / f"{name}.tar") for name in damage}


def test_corrupt_and_truncated_shards_raise_naming_the_shard(six: list[str], tmp_path: Path):
    for name, shard in _damaged(six[0], tmp_path).items():
        for read in (lambda s: list(iter_samples(s)), lambda s: count_samples([s])):
            with pytest.raises(DataError, match=rf"{name}\.tar.*truncated or not a tar"):
                read(shard)
    # the samples before the damage still come first
    truncated = iter_samples(str(tmp_path / "in-data.tar"))
    assert [s["__key__"] for s in itertools.islice(truncated, 3)] == [f"{i:09d}" for i in range(3)]
    with pytest.raises(DataError, match="missing"):
        count_samples([str(tmp_path / "absent.tar")])


def test_compressed_shards_are_read(six: list[str], tmp_path: Path) -> None:
    shard = tmp_path / "s.tar.gz"
    shard.write_bytes(gzip.compress(Path(six[1]).read_bytes()))
    assert [s["__key__"] for s in iter_samples(str(shard))] == [f"{i:09d}" for i in range(40, 80)]
    assert count_samples([str(shard)]) == 40


def test_count_samples_reads_headers(six: list[str], two: list[str]) -> None:
    assert count_samples(six) == ROWS
    assert count_samples(two[:1]) == 120
    assert count_samples([]) == 0


def test_inspect_shards(six: list[str]) -> None:
    folder = Path(six[0]).parent
    info = inspect_shards(f"{folder}/shard-{{000000..000002}}.tar", text_key="txt", sample_rows=50)
    assert info.shards == six[:3]
    assert info.rows == 120
    assert info.inspected == 50
    assert info.image_extensions == ("jpg",)
    assert info.extensions == ("cls", "jpg", "txt")
    assert info.has_label and info.has_text
    assert not inspect_shards(six[0], text_key="json").has_text
    assert inspect_shards(six[0], count_rows=False).rows is None


def test_shard_problems(six: list[str], two: list[str], tmp_path: Path) -> None:
    assert shard_problems(six[0], text_key="txt", needs_labels=True) == []
    assert shard_problems(two[0], needs_labels=True) == []
    (missing,) = shard_problems(f"{tmp_path}/nothing-{{0..3}}.tar", field="data.test")
    assert missing.startswith("data.test: pattern") and "matches no file" in missing
    odd = _write_tar(tmp_path / "odd.tar", [("1.foo", b"x"), ("1.json", b"{}"), ("2.foo", b"y")])
    problems = shard_problems(odd, text_key="txt", needs_labels=True)
    assert len(problems) == 3
    assert "no image key: expected one of .jpg/.jpeg/.png/.webp, found .foo, .json" in problems[0]
    assert "caption key '.txt' missing: 2 of the first 2 samples" in problems[1]
    assert "no .cls member" in problems[2] and "self-supervised loss" in problems[2]
    (caption,) = shard_problems(two[0], text_key="txt")
    assert "caption key '.txt' missing" in caption
    some = _write_tar(tmp_path / "some.tar", [("1.jpg", b"x"), ("2.txt", b"y")])
    assert "1 of the first 2 samples have no image member" in shard_problems(some)[0]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"\x01" * 4096)
    (unreadable,) = shard_problems(str(broken))
    assert unreadable.startswith("data.train: cannot read shard") and "broken.tar" in unreadable


# ------------------------------------------------------------------------ Ray Data


@pytest.mark.slow
def test_read_ray_dataset_keeps_bytes(table: pa.Table, six: list[str]) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = read_ray_dataset(six[:2], text_key="txt", text_column="caption").take_all()
    finally:
        if started:
            ray.shutdown()
    rows.sort(key=lambda row: row["key"])
    assert len(rows) == 80
    assert set(rows[0]) == {"image", "label", "key", "caption"}
    assert [r["image"] for r in rows] == table["image"].to_pylist()[:80]  # raw bytes, not decoded
    assert [r["label"] for r in rows] == table["label"].to_pylist()[:80]
    assert [r["caption"] for r in rows] == table["text"].to_pylist()[:80]
    assert Counter(type(r["label"]).__name__ for r in rows) == Counter({"int": 80})
