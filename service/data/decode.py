"""Encoded bytes → RGB ``PIL.Image``; corrupt images are skipped, counted, reported and capped.

Real image collections contain a few files that do not decode (truncated uploads, HTML error pages
saved as .jpg, zero-byte files). A reader must not crash on one of them, must not silently train on
garbage either, and must not hide a data problem: both readers therefore

1. skip an undecodable row (never substituting another row, so labels cannot shift),
2. count it in a :class:`DecodeStats` and log one warning naming the first few bad rows,
3. raise :class:`TooManyBadImagesError` when the bad rows exceed ``data.max_bad_fraction``.

Ceiling semantics: ``bad > floor(max_bad_fraction * rows_checked)`` is an error. The PyTorch
reader checks every row once when the dataset is built, so there it is the fraction of the whole
dataset. The Ray reader only ever sees one batch at a time and applies it per map batch; see
``service.data.ray_dataset`` for what that means.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from service.data.errors import CorruptImageError, TooManyBadImagesError

logger = logging.getLogger("service.data")

_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# Transparent pixels are composited onto white, like a browser shows them; a plain
# convert("RGB") would expose whatever colour an editor left under alpha=0.
_BACKGROUND = (255, 255, 255)


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale → 8-bit "L" by scaling (PIL's convert would clip)."""
    array = np.asarray(image)
    if image.mode == "F":
        top = 1.0 if np.nanmax(array) <= 1.0 else 255.0  # float images are 0-1 or 0-255
        scaled = np.nan_to_num(array) * (255.0 / top)
    else:
        top = 65535.0 if image.mode != "I" or array.max() > 255 else 255.0
        scaled = array.astype(np.float64) * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, 1, P, RGBA, LA, CMYK, YCbCr, I;16, I, F, ...) → 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in {"RGBa", "La"}:  # premultiplied alpha: un-premultiply first
        image = image.convert("RGBA" if image.mode == "RGBa" else "LA")
    if image.mode in {"RGBA", "LA", "PA"}:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) to an RGB image, EXIF rotation applied.

    Raises :class:`CorruptImageError` when the bytes are not a decodable image.

    >>> from PIL import Image; import io
    >>> buf = io.BytesIO(); Image.new("L", (5, 3)).save(buf, "PNG")
    >>> decode_image(buf.getvalue()).mode, decode_image(buf.getvalue()).size
    ('RGB', (5, 3))
    """
    if not data:
        raise CorruptImageError("empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # forces the full decode so truncated files fail here, not later
            try:
                image = ImageOps.exif_transpose(opened)  # a copy: survives closing ``opened``
            except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
                image = opened.copy()
            return to_rgb(image)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ...
        message = str(exc).split(" <_io.")[0]  # drop "<_io.BytesIO object at 0x...>" noise
        raise CorruptImageError(f"{type(exc).__name__}: {message}") from exc


@dataclass
class DecodeStats:
    """Running count of decoded vs skipped images, keeping the first few bad row ids.

    >>> stats = DecodeStats()
    >>> stats.add_ok(98); stats.add_bad("row 7"); stats.add_bad("row 9")
    >>> stats.total, stats.bad, stats.bad_ids
    (100, 2, ['row 7', 'row 9'])
    >>> stats.check(max_bad_fraction=0.05, where="demo")  # 2 <= floor(0.05 * 100): fine
    """

    total: int = 0
    bad: int = 0
    bad_ids: list[str] = field(default_factory=list)
    max_ids: int = 5

    def add_ok(self, n: int = 1) -> None:
        self.total += n

    def add_bad(self, row_id: str | None = None, n: int = 1) -> None:
        self.total += n
        self.bad += n
        if row_id is not None and len(self.bad_ids) < self.max_ids:
            self.bad_ids.append(row_id)

    def merge(self, other: DecodeStats) -> None:
        self.total += other.total
        self.bad += other.bad
        self.bad_ids.extend(other.bad_ids[: max(0, self.max_ids - len(self.bad_ids))])

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def summary(self) -> str:
        ids = ", ".join(self.bad_ids) + (", ..." if self.bad > len(self.bad_ids) else "")
        return f"{self.bad} of {self.total} images could not be decoded (first: {ids})"

    def warn(self, where: str) -> None:
        """Log one warning if anything was skipped."""
        if self.bad:
            logger.warning("%s: skipped %s", where, self.summary())

    def check(self, max_bad_fraction: float, where: str) -> None:
        """Raise :class:`TooManyBadImagesError` if ``bad > floor(max_bad_fraction * total)``."""
        allowed = math.floor(max_bad_fraction * self.total + 1e-9)
        if self.bad > allowed:
            raise TooManyBadImagesError(
                f"{where}: {self.summary()}: {self.bad_fraction:.2%} is above "
                f"data.max_bad_fraction={max_bad_fraction} ({allowed} allowed); fix or drop the "
                "bad rows, or raise data.max_bad_fraction if they are expected"
            )


def decode_many(
    blobs: Sequence[bytes | None], row_ids: Sequence[str], stats: DecodeStats
) -> list[Image.Image | None]:
    """Decode a batch, ``None`` where an image is corrupt; the outcome is counted in ``stats``."""
    images: list[Image.Image | None] = []
    for blob, row_id in zip(blobs, row_ids, strict=True):
        try:
            images.append(decode_image(blob))  # type: ignore[arg-type]  # None → CorruptImageError
            stats.add_ok()
        except CorruptImageError as exc:
            images.append(None)
            stats.add_bad(f"{row_id} ({exc})")
    return images
