"""Decode once: training rows → one uint8 tensor ``[N, 3, S, S]`` in shared memory.

With ``augment.backend=batched`` the PyTorch reader decodes every training row once, up front,
into a single tensor that DataLoader workers read without copies (``share_memory_()``: forked
or spawned workers map the same pages). Each step then gathers an index batch (``[b, 3, S, S]``
uint8, 4x fewer bytes than float views) and augments it on the model's device
(:class:`~service.data.batch_augment.BatchSimCLRAugment`). Per-image Python work happens once
per row, not once per row, view and epoch.

Image size: every row gets an ``S x S`` slot with ``S = data.image_size``. Rows already that
size (CIFAR at 32 px) are stored pixel for pixel as :func:`~service.data.decode.decode_image`
returns them; other rows are stored **whole**, resized (PIL bilinear with antialiasing) so that
their longer side is ``S``, at the top left of the slot, and their extent ``(h, w)`` is kept in
``sizes``: the batched augmentation draws each random-resized crop within its image's extent,
so crops cover the whole image as the per-image ``torchvision`` backend's do (a 400x300 image
at 224 px is stored as 224x168; nothing outside it is ever cropped). Images of any size share
one tensor and its bytes are known before anything is decoded. The price, against the
``torchvision`` backend: crops of large images are cut from ``S`` px, not from the full
resolution. For CIFAR-size data (the case this path is for) nothing changes.

Corrupt rows are skipped, counted in :class:`~service.data.decode.DecodeStats` and held to
``data.max_bad_fraction`` exactly as ``ParquetImageDataset`` does (a fraction of the whole split;
row ids are global rows of the Parquet files).

Whether to decode once is decided from the exact size (``N * 3 * S * S`` bytes, one copy per rank
on the node) against available memory (:func:`decode_once_plan`); data that does not fit streams
through ``ParquetImageDataset`` instead, still batched on the device.

Shared copy (``data.share_decoded``, the default): the driver of a multi-worker run, or of a Tune
sweep (for all its trials), decodes once and puts the arrays in Ray's object store
(:func:`share_training_rows`); each rank maps them read-only (:func:`load_shared`), so a node holds
one copy however many ranks and concurrent trials train on it. A copy carries a
:class:`DecodedKey` (file, row ids, image size, caption column) and a worker refuses a copy whose
key differs from the rows its own config selects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from service.config import Config
from service.data.augment import eval_pixels
from service.data.batch_augment import Pixels
from service.data.captions import is_caption
from service.data.decode import DecodeStats, decode_image
from service.data.errors import CorruptImageError
from service.data.parquet import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    default_columns,
)
from service.data.sources import inspect_source
from service.data.torch_dataset import NO_LABEL

# Decode once only if all ranks' copies take at most this share of the memory available now:
# the rest is for the model, the loader's batches, Ray's object store and other processes.
DECODE_MEMORY_FRACTION = 0.5


def fit_uint8(image: Image.Image, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB image → ``(uint8 [3, size, size], (h, w))``: unchanged when already ``size x size``,
    else the whole image resized so its longer side is ``size`` (aspect kept), at the top left
    of a zero slot; ``(h, w)`` is its extent there (see the module docstring).

    >>> pixels, extent = fit_uint8(Image.new("RGB", (40, 30), (9, 8, 7)), 16)
    >>> extent, pixels[:, 11, 15].tolist(), pixels[:, 12, 0].tolist()  # 16 x 12, then padding
    ((12, 16), [9, 8, 7], [0, 0, 0])
    """
    if image.size != (size, size):
        w, h = image.size
        scale = size / max(w, h)
        extent = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = image.resize(extent, Image.Resampling.BILINEAR, reducing_gap=None)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    h, w = pixels.shape[1:]
    slot = torch.zeros(3, size, size, dtype=torch.uint8)
    slot[:, :h, :w] = pixels
    return slot, (h, w)


def fit_item(image: Image.Image, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_uint8` as a DataLoader item: ``(pixels, tensor([h, w]))`` (collated to
    ``[pixels [b, 3, S, S], sizes [b, 2]]``)."""
    pixels, extent = fit_uint8(image, size)
    return pixels, torch.tensor(extent)


def eval_item(image: Image.Image, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image as evaluation sees it (``augment.eval_pixels``: resize, centre crop; uint8),
    :func:`fit_item`'s shape: what a per-epoch evaluation decodes once (the monitor's bank)."""
    return eval_pixels(image, size), torch.tensor([size, size])


def decoded_bytes(rows: int, size: int) -> int:
    """Bytes of ``rows`` decoded ``uint8 [3, size, size]`` images."""
    return rows * 3 * size * size


def available_memory() -> int:
    """Bytes of memory available to new allocations now (``psutil``; ``/proc/meminfo``)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with ray
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024


@dataclass(frozen=True)
class DecodePlan:
    """Whether to decode once, and the numbers behind it (for the log line)."""

    decode_once: bool
    estimated_bytes: int  # all copies on this node
    available_bytes: int
    fraction: float

    def reason(self) -> str:
        verdict = "<=" if self.decode_once else ">"
        return (
            f"estimated {self.estimated_bytes / 2**20:.1f} MiB decoded {verdict} "
            f"{self.fraction:.0%} of {self.available_bytes / 2**20:.0f} MiB available memory"
        )


def decode_once_plan(
    rows: int,
    size: int,
    copies: int = 1,
    available: int | None = None,
    fraction: float = DECODE_MEMORY_FRACTION,
) -> DecodePlan:
    """Decode once when ``copies`` decoded copies fit in ``fraction`` of available memory.

    >>> decode_once_plan(50_000, 32, copies=2, available=2**30).decode_once  # 293 MiB vs 512
    True
    >>> decode_once_plan(1_281_167, 224, available=64 * 2**30).decode_once  # ImageNet: 180 GiB
    False
    """
    estimated = decoded_bytes(rows, size) * max(1, copies)
    available = available_memory() if available is None else available
    return DecodePlan(estimated <= fraction * available, estimated, available, fraction)


@dataclass
class DecodedImages:
    """Decoded training rows: ``images`` uint8 ``[N, 3, S, S]`` in shared memory, ``labels``
    int64 ``[N]`` (``-1`` where unlabelled), the decode outcome, and in image–text mode the
    captions of the same rows (``texts``, aligned with ``images``)."""

    images: torch.Tensor
    labels: torch.Tensor
    stats: DecodeStats
    texts: list[str] | None = None
    sizes: torch.Tensor | None = None  # int64 [N, 2]: each image's (h, w) in its slot

    def __post_init__(self) -> None:
        if self.sizes is None:  # every image fills its slot
            self.sizes = torch.tensor(self.images.shape[2:]).repeat(len(self.images), 1)

    def __len__(self) -> int:
        return len(self.images)


def decode_rows(
    path: str,
    indices: np.ndarray | None,
    size: int,
    max_bad_fraction: float = 0.01,
    text_column: str | None = None,
    fit: Callable[[Image.Image, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> DecodedImages:
    """Decode rows ``indices`` of ``path`` (all when None) into one shared uint8 tensor; with
    ``text_column``, keep each kept row's caption (a null or empty caption drops its row, counted
    like a corrupt image, and a corrupt image drops its caption). ``fit``: image → ``(uint8
    [3, size, size], extent)``, :func:`fit_item` (training) unless given (:func:`eval_item`).

    Raises :class:`~service.data.errors.TooManyBadImagesError` above ``max_bad_fraction``.

    >>> d = decode_rows("service/data/bundled/cifar10-test-subset.parquet", np.arange(4), 32)
    >>> tuple(d.images.shape), d.images.dtype, d.images.is_shared(), d.stats.total
    ((4, 3, 32, 32), torch.uint8, True, 4)
    """
    source = inspect_source(path)
    table = source.read(default_columns(source, text_column), indices)
    n = table.num_rows
    captions = table.column(text_column).to_pylist() if text_column else None
    images = torch.empty((n, 3, size, size), dtype=torch.uint8).share_memory_()
    sizes = torch.empty((n, 2), dtype=torch.long)
    if source.has_label:
        all_labels = table.column(LABEL_COLUMN).to_numpy().astype(np.int64)
    else:
        all_labels = np.full(n, NO_LABEL, dtype=np.int64)
    file_rows = indices if indices is not None else np.arange(n)
    stats = DecodeStats()
    kept: list[int] = []
    for i, blob in enumerate(table.column(IMAGE_COLUMN).to_pylist()):
        if captions is not None and not is_caption(captions[i]):
            stats.add_bad(f"row {int(file_rows[i])} (null or empty caption)")
            continue
        try:
            image = decode_image(blob)
        except CorruptImageError as exc:
            stats.add_bad(f"row {int(file_rows[i])} ({exc})")
            continue
        images[len(kept)], sizes[len(kept)] = (fit or fit_item)(image, size)
        kept.append(i)
        stats.add_ok()
    where = f"{str(path)!r}"
    stats.warn(where)
    stats.check(max_bad_fraction, where)
    labels = torch.from_numpy(all_labels[np.asarray(kept, dtype=np.int64)])
    texts = [captions[i] for i in kept] if captions is not None else None
    # A view of the shared storage: the (few) skipped rows' slots stay unused at the end.
    return DecodedImages(images[: len(kept)], labels, stats, texts, sizes[: len(kept)])


class IndexBatchDataset(Dataset):
    """``dataset[list of row indices]`` → ``(Pixels(uint8 [b, 3, S, S], sizes [b, 2]), int64
    [b])`` (image–text mode: ``(pixels, labels, list of b captions)``): one gather per batch.
    Use with ``DataLoader(batch_size=None, sampler=BatchSampler(...))``; workers index the shared
    tensor, nothing is copied to them."""

    def __init__(self, decoded: DecodedImages) -> None:
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.decoded)

    def __getitem__(self, rows: list[int]) -> tuple[Any, ...]:
        index = torch.as_tensor(rows, dtype=torch.long)
        sizes = self.decoded.sizes[index]  # type: ignore[index]
        images = Pixels(self.decoded.images.index_select(0, index), sizes)
        labels = self.decoded.labels[index]
        if self.decoded.texts is None:
            return images, labels
        return images, labels, [self.decoded.texts[r] for r in rows]


# --- one decoded copy for every rank and every concurrent Tune trial (Ray's object store) ------
#
# The driver decodes the training rows once and ``ray.put``s the arrays; a worker's ``ray.get``
# maps them read-only from its node's object store (zero-copy for numpy arrays), so a node holds
# one copy however many ranks and trials read it. A copy is used only by a worker that would
# have decoded exactly the same rows: the key says which file, which rows, at which size.

# Share only if the copy takes at most this share of the object store's memory.
OBJECT_STORE_FRACTION = 0.5


@dataclass(frozen=True)
class DecodedKey:
    """Which rows a decoded copy holds: file, row count and ids (digest), image size, captions.

    >>> key = decoded_key("a.parquet", np.arange(3), 32)
    >>> key.rows, key.image_size, key == decoded_key("a.parquet", np.arange(3), 32)
    (3, 32, True)
    >>> key == decoded_key("a.parquet", np.array([0, 1, 5]), 32)  # same count, other rows
    False
    """

    path: str
    rows: int
    rows_digest: str
    image_size: int
    text_column: str | None = None

    def describe(self) -> str:
        text = f", captions {self.text_column!r}" if self.text_column else ""
        return (
            f"{self.rows} rows of {self.path!r} at {self.image_size} px "
            f"(rows {self.rows_digest[:12]}{text})"
        )


def decoded_key(
    path: str, indices: np.ndarray, size: int, text_column: str | None = None
) -> DecodedKey:
    """The key of decoding rows ``indices`` of ``path`` at ``size`` px (``text_column``: with
    captions)."""
    import hashlib

    rows = np.ascontiguousarray(indices, dtype=np.int64)
    digest = hashlib.sha256(rows.tobytes()).hexdigest()
    return DecodedKey(str(path), len(rows), digest, size, text_column)


def training_rows(config: Config) -> np.ndarray:
    """The training rows every rank of a run with ``config`` selects (train split, limit)."""
    from service.data.splits import train_val_rows

    return train_val_rows(config).train_rows(config.data.limit)


def training_key(config: Config) -> DecodedKey:
    """The key of the decoded training rows of ``config`` (what a rank would decode)."""
    d = config.data
    return decoded_key(d.train, training_rows(config), d.image_size, config.text.column)


class SharedDecodedMismatchError(ValueError):
    """A shared decoded copy holds other rows than the worker's config selects."""


@dataclass(frozen=True)
class SharedDecoded:
    """A decoded copy in Ray's object store: its key and the ``ObjectRef`` of its arrays (held
    by the driver for as long as the run or sweep lasts; pickled into each worker's inputs)."""

    key: DecodedKey
    ref: Any  # ray.ObjectRef of {"images", "labels", "texts", "stats"}
    nbytes: int


def share_decoded(decoded: DecodedImages, key: DecodedKey) -> SharedDecoded:
    """``ray.put`` ``decoded`` (Ray must be connected): numpy arrays, so readers map them."""
    import ray

    payload = {
        "images": decoded.images.numpy(),
        "labels": decoded.labels.numpy(),
        "texts": decoded.texts,
        "stats": decoded.stats,
        "sizes": decoded.sizes.numpy(),  # type: ignore[union-attr]
    }
    return SharedDecoded(key, ray.put(payload), int(decoded.images.numel()))


def load_shared(shared: SharedDecoded, expected: DecodedKey) -> DecodedImages:
    """The shared copy as :class:`DecodedImages` (read-only tensors over the object store's
    memory), after checking it holds exactly the rows ``expected`` describes.

    Raises :class:`SharedDecodedMismatchError` otherwise: training on other rows than the
    config selects must never happen silently.
    """
    import warnings

    import ray

    if shared.key != expected:
        raise SharedDecodedMismatchError(
            f"the shared decoded copy holds {shared.key.describe()}, but this worker's config "
            f"selects {expected.describe()}; refusing to train on other rows. Run with "
            f"data.share_decoded=false, or share a copy decoded from this config"
        )
    payload = ray.get(shared.ref)
    with warnings.catch_warnings():
        # The arrays are read-only views of the object store; nothing writes to them (batches
        # are gathered with index_select, a copy), so torch's non-writable warning does not apply.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        images = torch.from_numpy(payload["images"])
        labels = torch.from_numpy(payload["labels"])
        sizes = torch.from_numpy(payload["sizes"])
    return DecodedImages(images, labels, payload["stats"], payload["texts"], sizes)


def object_store_bytes() -> int | None:
    """Object-store memory of the connected cluster's nodes, the smallest (None: unknown)."""
    import ray

    sizes = [
        n["Resources"].get("object_store_memory")
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("object_store_memory")
    ]
    return int(min(sizes)) if sizes else None


def share_training_rows(config: Config) -> tuple[SharedDecoded | None, str]:
    """Decode ``config``'s training rows once and put them in the object store, when that
    applies (``data.share_decoded``, the torch reader, ``augment.backend=batched``) and fits
    (memory now, each node's object store); returns the copy (or None) and why, for the log."""
    d = config.data
    if not d.share_decoded:
        return None, "data.share_decoded=false: each rank decodes its own copy"
    if d.reader != "torch" or config.augment.backend != "batched":
        return None, "only the torch reader with augment.backend=batched decodes once"
    rows = training_rows(config)
    plan = decode_once_plan(len(rows), d.image_size, copies=1)
    store = object_store_bytes()
    if not plan.decode_once:
        return None, f"not shared: {plan.reason()}"
    if store is not None and plan.estimated_bytes > OBJECT_STORE_FRACTION * store:
        return None, (
            f"not shared: {plan.estimated_bytes / 2**20:.1f} MiB decoded > "
            f"{OBJECT_STORE_FRACTION:.0%} of a node's {store / 2**20:.0f} MiB object store"
        )
    decoded = decode_rows(d.train, rows, d.image_size, d.max_bad_fraction, config.text.column)
    shared = share_decoded(decoded, training_key(config))
    return shared, f"{shared.key.describe()}, {shared.nbytes / 2**20:.1f} MiB"
