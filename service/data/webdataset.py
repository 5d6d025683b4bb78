"""WebDataset tar shards (the format open_clip, LAION and DataComp ship), read and written.

A shard is a POSIX tar; consecutive members with the same *key* (the member path up to the first
``.`` of its last component) form one sample, and what follows that dot, lowercased, is the
member's *extension*: ``000123.jpg`` (image bytes), ``000123.cls`` (integer label as ASCII text),
``000123.txt`` (utf-8 caption). Shards are named by webdataset's brace patterns
(``shards/{000000..000099}.tar``) or globs, locally or on any ``pyarrow.fs`` URI (``s3://``,
``gs://``, ``file://``, ...). No dependency on the ``webdataset`` package: ``tarfile`` streams
the members.

Rows (:func:`sample_row`) use the Parquet format's names: ``image`` (bytes), ``label`` (int, -1
when absent), plus ``key`` and the caption. :func:`iter_rows` / :func:`take_rows` stream one rank's
rows for an epoch (shard order shuffled the same on every rank, then split; a seeded shuffle
buffer); :func:`read_table` reads eagerly; :func:`read_ray_dataset` goes through Ray Data;
:func:`write_shards` turns a Parquet-format table into shards:

    >>> expand_braces("shards/{000008..000010}.tar")
    ['shards/000008.tar', 'shards/000009.tar', 'shards/000010.tar']
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from service.data.errors import DataError
from service.data.parquet import IMAGE_COLUMN, LABEL_COLUMN, _glob_match

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
CAPTION_EXTENSION = "txt"
KEY_COLUMN = "key"
_GLOB_CHARS = "*?["
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
# A trailing "?name=value&..." of a URI is its query (s3://b/x?region=...), not a glob "?".
_QUERY = re.compile(r"^(.*)\?([A-Za-z_][\w.-]*=[^/?]*(?:&[A-Za-z_][\w.-]*=[^/?]*)*)$")
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))


# ---------------------------------------------------------------- brace expansion and locations


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as webdataset (braceexpand) does it: ``{a,b}`` lists, ``{0..9}`` and
    ``{0..9..2}`` ranges (inclusive; zero padding kept), several and nested braces. A brace that
    is neither stays literal.

    >>> expand_braces("{train,val}-{0..1}.tar")
    ['train-0.tar', 'train-1.tar', 'val-0.tar', 'val-1.tar']
    >>> expand_braces("s{08..10}/{x}")
    ['s08/{x}', 's09/{x}', 's10/{x}']
    """
    span = _first_brace(pattern)
    if span is None:
        return [pattern]
    head, body, tail = pattern[: span[0]], pattern[span[0] + 1 : span[1]], pattern[span[1] + 1 :]
    tails = expand_braces(tail)
    choices = _brace_choices(body)
    if choices is None:
        return [f"{head}{{{b}}}{rest}" for b in expand_braces(body) for rest in tails]
    return [head + c + rest for choice in choices for c in expand_braces(choice) for rest in tails]


def _first_brace(text: str) -> tuple[int, int] | None:
    depth, start = 0, -1
    for i, char in enumerate(text):
        if char == "{":
            start = i if depth == 0 else start
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                return start, i
    return None


def _brace_choices(body: str) -> list[str] | None:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    if parts:
        return [*parts, body[start:]]
    match = _RANGE.match(body)
    if match is None:
        return None
    first, last, step = int(match[1]), int(match[2]), abs(int(match[3] or 1)) or 1
    ends = (match[1].lstrip("-"), match[2].lstrip("-"))
    width = max(map(len, match.group(1, 2))) if any(len(e) > 1 and e[0] == "0" for e in ends) else 0
    values = range(first, last + 1, step) if first <= last else range(first, last - 1, -step)
    return [str(v).zfill(width) for v in values]


@lru_cache(maxsize=64)
def _root_filesystem(root: str, query: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem per ``scheme://authority`` (``from_uri`` on S3 asks for the bucket's region,
    so not once per shard) and the path inside it that the root stands for."""
    if not root:
        return pafs.LocalFileSystem(), ""
    uri = f"{root}/" + (f"?{query}" if query else "")
    try:
        filesystem, base = pafs.FileSystem.from_uri(uri)
    except (OSError, pa.ArrowInvalid, ValueError) as exc:
        raise DataError(f"cannot open data URI {uri!r}: {exc}") from exc
    return filesystem, base.rstrip("/")


@dataclass(frozen=True)
class _Place:
    """Where a shard location points: its filesystem, the path inside it, and the way back."""

    root: str  # "scheme://authority", "" for a local path
    query: str
    filesystem: pafs.FileSystem
    base: str
    path: str

    def location(self, path: str) -> str:
        """The location (as users and Ray name it) of another ``path`` on this filesystem."""
        if not self.root:
            return path
        query = f"?{self.query}" if self.query else ""
        return f"{self.root}/{path[len(self.base) :].lstrip('/')}{query}"


def _place(location: str) -> _Place:
    if "://" not in location:
        path = os.path.abspath(os.path.expanduser(location))
        return _Place("", "", _root_filesystem("", "")[0], "", path)
    scheme, _, rest = location.partition("://")
    authority, _, path = rest.partition("/")
    match = _QUERY.match(path)
    path, query = (match[1], match[2]) if match else (path, "")
    filesystem, base = _root_filesystem(f"{scheme}://{authority}", query)
    return _Place(f"{scheme}://{authority}", query, filesystem, base, f"{base}/{path}")


def _glob(place: _Place) -> list[str]:
    parts = place.path.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    root = "/".join(parts[:fixed]) or "/"
    if place.filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return []
    selector = pafs.FileSelector(root, recursive=len(parts) - fixed > 1)
    infos = place.filesystem.get_file_info(selector)
    return sorted(i.path for i in infos if i.is_file and _glob_match(i.path, place.path))


def _existing(places: list[_Place]) -> set[tuple[int, str]]:
    """``(id(filesystem), path)`` of the places that are files: one listing per directory holding
    several of them (one request for a thousand shards under one S3 prefix, not a thousand)."""
    groups: dict[tuple[int, str], list[_Place]] = {}
    for place in places:
        groups.setdefault((id(place.filesystem), place.path.rsplit("/", 1)[0]), []).append(place)
    found = set()
    for (fs_id, parent), members in groups.items():
        filesystem = members[0].filesystem
        if len(members) == 1:
            infos = [filesystem.get_file_info(members[0].path)]
        else:
            infos = filesystem.get_file_info(pafs.FileSelector(parent or "/", allow_not_found=True))
        found.update((fs_id, i.path) for i in infos if i.is_file)
    return found


def expand_shards(pattern: str, *, field: str = "data.train") -> list[str]:
    """The existing shard files a webdataset pattern names, in expansion order: braces first
    (:func:`expand_braces`), then each result that has glob characters is globbed (sorted).
    Local paths come back absolute; URIs (``s3://``, ``gs://``, ``file://``, ...) as URIs.
    Names that do not exist are dropped; :class:`DataError` when nothing is left."""
    places = [_place(candidate) for candidate in expand_braces(str(pattern))]
    globs = [any(c in p.path for c in _GLOB_CHARS) for p in places]
    try:
        existing = _existing([p for p, is_glob in zip(places, globs, strict=True) if not is_glob])
        found: dict[str, None] = {}
        for place, is_glob in zip(places, globs, strict=True):
            if not is_glob:
                paths = [place.path] if (id(place.filesystem), place.path) in existing else []
            else:
                paths = _glob(place)
            found.update((place.location(path), None) for path in paths)
    except OSError as exc:  # permissions, network, credentials
        raise DataError(f"{field}: cannot list shards of {pattern!r}: {exc}") from exc
    if not found:
        raise DataError(
            f"{field}: pattern {pattern!r} matches no file; check the path (brace ranges like "
            "{000000..000099} are inclusive and keep their zero padding)"
        )
    return list(found)


# ------------------------------------------------------------------------------ reading samples


def _split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name, ``None`` for names that belong to no sample."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, bytes]]:
    for member in tar:
        parts = _split_name(member.name) if member.isreg() else None
        if parts is not None:
            handle = tar.extractfile(member)
            assert handle is not None  # a regular file always has data
            yield parts[0], parts[1], handle.read()


def _group(members: Iterable[tuple[str, str, bytes]], shard: str) -> Iterator[dict[str, Any]]:
    sample: dict[str, Any] | None = None
    seen: set[str] = set()
    for key, extension, data in members:
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                seen.add(sample["__key__"])
                yield sample
            if key in seen:
                raise DataError(
                    f"shard {shard!r}: the members of sample {key!r} are not consecutive; "
                    "re-create the tar with its members sorted by name (tar --sort=name)"
                )
            sample = {"__key__": key, "__url__": shard}
        if extension in sample:
            raise DataError(f"shard {shard!r}: sample {key!r} has two .{extension} members")
        sample[extension] = data
    if sample is not None:
        yield sample


def _unreadable(shard: str, exc: Exception) -> DataError:
    return DataError(
        f"cannot read shard {shard!r} ({type(exc).__name__}: {exc}): the file is missing, "
        "truncated or not a tar archive; re-download or re-create it"
    )


def _check_end(tar: tarfile.TarFile, seekable: pa.NativeFile | None = None) -> None:
    """tarfile takes a truncated header, or a damaged one after the first member, for the end of
    the archive and stops without a word; a complete archive ends in zero blocks only."""
    end = tar.offset + tarfile.BLOCKSIZE  # the end-of-archive block tarfile stopped at
    if seekable is None:  # tarfile's own stream: ``pos`` counts the (decompressed) bytes read
        stream: Any = tar.fileobj
        available = stream.pos
    else:
        stream, available = seekable, seekable.size()
        seekable.seek(tar.offset)
    if available < end:
        raise tarfile.ReadError(f"unexpected end of data at byte {available}")
    for chunk in iter(partial(stream.read, 1 << 16), b""):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"damaged member header at byte {tar.offset}")


def iter_samples(shard: str) -> Iterator[dict[str, Any]]:
    """Stream one shard's samples: ``{"__key__": key, "__url__": shard, ext: bytes, ...}``.

    The tar is read front to back (``r|*``: works on any byte stream, gzip included), so a remote
    shard is never downloaded whole first. A truncated or corrupt tar raises :class:`DataError`
    naming the shard (after the samples before the damage)."""
    place = _place(shard)
    try:
        with place.filesystem.open_input_stream(place.path) as stream:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                yield from _group(_members(tar), shard)
                _check_end(tar)
    except _READ_ERRORS as exc:
        raise _unreadable(shard, exc) from exc


def _extension(text_key: str) -> str:
    return text_key.lstrip(".").lower()


def _label(data: bytes | None) -> int:
    try:
        return int(data.decode("ascii").strip()) if data is not None else -1
    except (UnicodeDecodeError, ValueError):
        return -1


def sample_row(sample: dict[str, Any], text_key: str | None = None) -> dict[str, Any]:
    """One sample as a row with the Parquet format's names: ``image`` (the bytes of its first
    member among :data:`IMAGE_EXTENSIONS`, ``None`` without one), ``label`` (its ``.cls``, -1
    when absent or not an integer), ``key``, and under ``text_key`` (when given) the utf-8 text
    of the member with that extension (``None`` without one).

    >>> sample_row({"__key__": "a/1", "png": b"...", "cls": b" 7\\n", "txt": b"a cat"}, "txt")
    {'image': b'...', 'label': 7, 'key': 'a/1', 'txt': 'a cat'}
    """
    image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    row = {IMAGE_COLUMN: image, LABEL_COLUMN: _label(sample.get(LABEL_EXTENSION))}
    row[KEY_COLUMN] = sample["__key__"]
    if text_key:
        text = sample.get(_extension(text_key))
        row[text_key] = None if text is None else text.decode("utf-8", errors="replace")
    return row


# ------------------------------------------------------------------- one rank's rows per epoch


def is_held_out(key: str, fraction: float, seed: int) -> bool:
    """Whether the sample ``key`` belongs to the held-out (validation) split: a stable hash of
    ``seed`` and the key, so every rank and every run decides alike without seeing all keys.

    >>> sum(is_held_out(str(i), 0.25, seed=0) for i in range(10000))
    2546
    """
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _rank_samples(
    shards: Sequence[str], rank: int, world: int, seed: int, epoch: int
) -> Iterator[dict[str, Any]]:
    """This rank's samples, before filtering: shards in the epoch's order (the same on every
    rank), split by shard when there are enough, else by sample (every rank reads all)."""
    order = list(shards)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    if len(order) >= world:
        for shard in order[rank::world]:
            yield from iter_samples(shard)
        return
    every = (sample for shard in order for sample in iter_samples(shard))
    yield from itertools.islice(every, rank, None, world)


def _shuffled(rows: Iterable[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict]:
    """webdataset's ``shuffle``: a buffer of ``size`` rows; each new row takes the place of a
    random one, which is yielded. ``size <= 1`` keeps the order."""
    if size <= 1:
        yield from rows
        return
    buffer: list[dict[str, Any]] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def iter_rows(
    shards: Sequence[str],
    *,
    rank: int,
    world: int,
    seed: int,
    epoch: int,
    shuffle_buffer: int,
    text_key: str | None = None,
    keep: Callable[[str], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rank ``rank`` of ``world``'s rows (:func:`sample_row`) for one epoch.

    The shard order is shuffled with ``(seed, epoch)``, identically on every rank, then split:
    ``shards[rank::world]`` when there are at least ``world`` shards, else every rank reads every
    shard and keeps each ``world``-th sample. ``keep(key)`` filters (the train/validation split,
    :func:`is_held_out`); a ``(seed, epoch, rank)``-seeded buffer of ``shuffle_buffer`` rows
    shuffles the rest. Over the ranks, every kept sample comes exactly once per epoch."""
    samples = _rank_samples(shards, rank, world, seed, epoch)
    rows = (sample_row(s, text_key) for s in samples if keep is None or keep(s["__key__"]))
    yield from _shuffled(rows, shuffle_buffer, random.Random(f"{seed}:{epoch}:{rank}"))


def take_rows(
    shards: Sequence[str], n: int, *, epoch: int, rank: int, world: int, **options: Any
) -> Iterator[dict[str, Any]]:
    """Exactly ``n`` of this rank's rows, starting with :func:`iter_rows` of ``epoch`` and going
    on with the orders of ``epoch + 1``, ``epoch + 2``, ... when this rank's part runs out.

    Shards differ in size, so ranks' parts do too; taking the same ``n`` on every rank makes them
    run the same number of steps (a collective waiting on a rank that stopped early would hang).
    The price: a rank with a short part sees some rows of later epochs early. ``options`` are
    :func:`iter_rows`' (``seed``, ``shuffle_buffer``, ``text_key``, ``keep``). Raises
    :class:`DataError` when the rank gets no row at all."""
    left = n
    for later in itertools.count(epoch):
        if left <= 0:
            return
        got = 0
        rows = iter_rows(shards, rank=rank, world=world, epoch=later, **options)
        with closing(rows):  # closes the open shard stream when n is reached mid-epoch
            for row in itertools.islice(rows, left):
                got += 1
                yield row
        if got == 0:
            raise DataError(
                f"rank {rank} of {world} gets no rows from {len(shards)} shard(s) (after the "
                "validation split); use fewer workers, more shards or a smaller val_fraction"
            )
        left -= got


# ------------------------------------------------------------------------- counting, inspecting


def _count_one(shard: str) -> int:
    place = _place(shard)
    # A local uncompressed tar is seekable: tarfile seeks over member data, reads headers only.
    seek = isinstance(place.filesystem, pafs.LocalFileSystem) and shard.endswith(".tar")
    try:
        opened = place.filesystem.open_input_file if seek else place.filesystem.open_input_stream
        with (
            opened(place.path) as handle,
            tarfile.open(fileobj=handle, mode="r:" if seek else "r|*") as tar,
        ):
            names = (_split_name(m.name) for m in tar if m.isreg())
            count = sum(1 for _ in itertools.groupby(n[0] for n in names if n is not None))
            _check_end(tar, handle if seek else None)
            return count
    except _READ_ERRORS as exc:
        raise _unreadable(shard, exc) from exc


def count_samples(shards: Sequence[str]) -> int:
    """How many samples the shards hold, from the tar headers alone (no member data is decoded;
    local files are not even read past the headers)."""
    if not shards:
        return 0
    with ThreadPoolExecutor(max_workers=min(16, len(shards))) as pool:
        return sum(pool.map(_count_one, shards))


@dataclass(frozen=True)
class ShardsInfo:
    """What :func:`inspect_shards` saw: the shards, their sample count (``None`` when not
    counted), and over the first ``inspected`` samples the extensions and how many samples had
    an image, a ``.cls`` label and the caption member."""

    shards: list[str]
    rows: int | None
    image_extensions: tuple[str, ...]
    extensions: tuple[str, ...]
    inspected: int
    with_image: int
    with_label: int
    with_text: int

    @property
    def has_label(self) -> bool:
        return self.inspected > 0 and self.with_label == self.inspected

    @property
    def has_text(self) -> bool:
        return self.inspected > 0 and self.with_text == self.inspected


def inspect_shards(
    pattern: str,
    text_key: str | None = None,
    sample_rows: int = 64,
    *,
    field: str = "data.train",
    count_rows: bool = True,
) -> ShardsInfo:
    """Expand ``pattern`` and look at the first ``sample_rows`` samples (in shard order);
    ``count_rows`` also counts every shard's samples from its headers (:func:`count_samples`;
    that reads all of a remote shard, hence the switch)."""
    shards = expand_shards(pattern, field=field)
    every = (sample for shard in shards for sample in iter_samples(shard))
    with closing(every):
        samples = list(itertools.islice(every, sample_rows))
    extensions = sorted({e for s in samples for e in s if not e.startswith("__")})
    text = _extension(text_key) if text_key else None
    return ShardsInfo(
        shards=shards,
        rows=count_samples(shards) if count_rows else None,
        image_extensions=tuple(e for e in extensions if e in IMAGE_EXTENSIONS),
        extensions=tuple(extensions),
        inspected=len(samples),
        with_image=sum(any(e in s for e in IMAGE_EXTENSIONS) for s in samples),
        with_label=sum(LABEL_EXTENSION in s for s in samples),
        with_text=sum(text in s for s in samples) if text else 0,
    )


def shard_problems(
    pattern: str,
    text_key: str | None = None,
    needs_labels: bool = False,
    *,
    field: str = "data.train",
    sample_rows: int = 64,
) -> list[str]:
    """What is wrong with the shards for training, each problem a message saying what to do;
    empty when nothing is. Reads the first ``sample_rows`` samples only."""
    try:
        info = inspect_shards(pattern, text_key, sample_rows, field=field, count_rows=False)
    except DataError as exc:
        message = str(exc)
        return [message if message.startswith(field) else f"{field}: {message}"]
    n, found = info.inspected, ", ".join(f".{e}" for e in info.extensions) or "nothing"
    head = f"{field}={pattern!r}"
    if n == 0:
        return [f"{head}: the shards hold no samples (member names like 000001.jpg)"]
    wanted = "/".join(f".{e}" for e in IMAGE_EXTENSIONS)
    problems = []
    if info.with_image == 0:
        problems.append(f"{head}: no image key: expected one of {wanted}, found {found}")
    elif info.with_image < n:
        problems.append(
            f"{head}: {n - info.with_image} of the first {n} samples have no image member "
            f"(expected one of {wanted}, found {found}); every sample needs one"
        )
    if text_key and not info.has_text:
        problems.append(
            f"{head}: caption key '.{_extension(text_key)}' missing: {n - info.with_text} of the "
            f"first {n} samples have no such member (found {found}); set the caption key to "
            "the shards' caption extension"
        )
    if needs_labels and not info.has_label:
        problems.append(
            f"{head}: the loss trains on labels but {n - info.with_label} of the first {n} "
            f"samples have no .cls member (found {found}); add .cls members (the class id as "
            "text) or choose a self-supervised loss (ntxent, moco, ...)"
        )
    return problems


# ------------------------------------------------------------------------------ eager and Ray


def _text_name(text_key: str | None, text_column: str | None) -> str | None:
    return (text_column or text_key) if text_key else None


def _rows_table(
    rows: Iterable[dict[str, Any]], text_key: str | None, column: str | None
) -> pa.Table:
    rows = list(rows)
    arrays = {
        IMAGE_COLUMN: pa.array([r[IMAGE_COLUMN] for r in rows], pa.binary()),
        LABEL_COLUMN: pa.array([r[LABEL_COLUMN] for r in rows], pa.int64()),
        KEY_COLUMN: pa.array([r[KEY_COLUMN] for r in rows], pa.string()),
    }
    if column:
        arrays[column] = pa.array([r[text_key] for r in rows], pa.string())
    return pa.table(arrays)


def read_table(
    shards: Sequence[str],
    *,
    text_key: str | None = None,
    text_column: str | None = None,
    keep: Callable[[str], bool] | None = None,
    limit: int | None = None,
) -> pa.Table:
    """Every row (or the first ``limit`` kept ones) in shard order, no shuffle, as one table
    with the Parquet format's columns: ``image`` (binary), ``label`` (int64, -1 without
    ``.cls``), ``key`` (string), and the caption from the ``text_key`` member as ``text_column``
    (default: named ``text_key``). For evaluation and decode-once."""
    every = (sample for shard in shards for sample in iter_samples(shard))
    with closing(every):
        kept = (s for s in every if keep is None or keep(s["__key__"]))
        rows = [sample_row(s, text_key) for s in itertools.islice(kept, limit)]
    return _rows_table(rows, text_key, _text_name(text_key, text_column))


def _ray_rows(batch: pd.DataFrame, text_key: str | None, text_column: str | None) -> pa.Table:
    """A batch of ``read_webdataset`` samples (one column per extension, missing → NaN) → rows."""
    columns = {str(c).lower(): c for c in batch.columns}
    records = batch.to_dict("records")
    samples = [
        {e: r[c] for e, c in columns.items() if isinstance(r[c], bytes)} | {"__key__": r["__key__"]}
        for r in records
    ]
    return _rows_table((sample_row(s, text_key) for s in samples), text_key, text_column)


def read_ray_dataset(
    shards: Sequence[str], *, text_key: str | None = None, text_column: str | None = None
) -> ray.data.Dataset:
    """The shards as a Ray Dataset of rows (``image`` bytes as stored, ``label`` int64 with -1
    when missing, ``key``, and the caption as ``text_column`` when ``text_key`` is given).
    ``decoder=None``: Ray's default decoder would turn images into arrays and labels into ints."""
    import ray.data

    dataset = ray.data.read_webdataset(list(shards), decoder=None)
    rows = partial(_ray_rows, text_key=text_key, text_column=_text_name(text_key, text_column))
    return dataset.map_batches(rows, batch_format="pandas")


# ------------------------------------------------------------------------------------ writing


def _image_extension(data: bytes) -> str:
    """The extension the bytes' magic number says (readers pick images by extension)."""
    for magic, extension in _MAGIC:
        if data.startswith(magic):
            return extension
    return "webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "bin"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime, uid, gid 0 and no user names: same bytes every time
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _sample_members(row: dict[str, Any], text_column: str | None, text_key: str) -> list:
    members = []
    if row.get(IMAGE_COLUMN) is not None:
        members.append((_image_extension(row[IMAGE_COLUMN]), row[IMAGE_COLUMN]))
    if row.get(LABEL_COLUMN) is not None:
        members.append((LABEL_EXTENSION, str(int(row[LABEL_COLUMN])).encode("ascii")))
    if text_column and row.get(text_column) is not None:
        members.append((_extension(text_key), row[text_column].encode("utf-8")))
    return sorted(members)


def write_shards(
    table: pa.Table,
    out_dir: str,
    *,
    prefix: str = "shard",
    rows_per_shard: int = 1000,
    text_column: str | None = None,
    text_key: str = CAPTION_EXTENSION,
) -> list[str]:
    """Write a Parquet-format table (``image`` bytes, optional ``label``, and the caption column
    ``text_column`` as ``.{text_key}`` members; other columns are ignored) as shards
    ``{prefix}-000000.tar``, ... of ``rows_per_shard`` samples under ``out_dir`` (a directory or
    URI). Keys are the zero-padded row numbers; the image's extension comes from its magic
    number (``.bin`` when unknown). The same table gives the same bytes. Returns the shards."""
    if IMAGE_COLUMN not in table.column_names:
        raise DataError(f"the table has no {IMAGE_COLUMN!r} column (columns: {table.column_names})")
    if text_column and text_column not in table.column_names:
        raise DataError(f"the table has no caption column {text_column!r}")
    if rows_per_shard < 1 or table.num_rows == 0:
        raise DataError(f"nothing to write: {table.num_rows} rows, {rows_per_shard} per shard")
    place = _place(out_dir)
    place.filesystem.create_dir(place.path, recursive=True)
    columns = [c for c in (IMAGE_COLUMN, LABEL_COLUMN, text_column) if c in table.column_names]
    width = max(9, len(str(table.num_rows - 1)))
    written = []
    for number, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        path = f"{place.path.rstrip('/')}/{prefix}-{number:06d}.tar"
        rows = table.select(columns).slice(start, rows_per_shard).to_pylist()
        with place.filesystem.open_output_stream(path) as stream:
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for offset, row in enumerate(rows):
                    key = f"{start + offset:0{width}d}"
                    for extension, data in _sample_members(row, text_column, text_key):
                        _add_member(tar, f"{key}.{extension}", data)
        written.append(place.location(path))
    return written
