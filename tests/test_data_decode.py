"""Decoding: every PIL mode → RGB with the right pixel values; corrupt bytes → CorruptImageError."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from service.data import CorruptImageError, DecodeStats, TooManyBadImagesError, decode_image
from tests.helpers import encode_image


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (5, 4), 77), "PNG", (77, 77, 77)),
        (Image.new("1", (5, 4), 1), "PNG", (255, 255, 255)),
        (
            Image.new("RGB", (5, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE),
            "PNG",
            (10, 200, 30),
        ),
        (Image.new("RGB", (5, 4), (10, 200, 30)), "BMP", (10, 200, 30)),
        (Image.new("RGB", (5, 4), (200, 100, 50)), "WEBP", (200, 100, 50)),  # lossless below
        # 16-bit: 65535 is white and 257 * v maps back to v (PIL's convert would clip at 255).
        (Image.fromarray(np.full((4, 5), 40 * 257, np.uint16)), "PNG", (40,) * 3),
        (Image.fromarray(np.full((4, 5), 65535, np.uint16)), "PNG", (255,) * 3),
        (Image.fromarray(np.full((4, 5), 0.5, np.float32)), "TIFF", (128,) * 3),
    ],
)
def test_modes_convert_to_rgb_with_their_colours(image, fmt, expected):
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode_image(image, fmt, **kwargs))
    assert decoded.mode == "RGB" and decoded.size == (5, 4)
    assert np.asarray(decoded)[0, 0].tolist() == list(expected)


def test_transparency_composites_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black → white
    pixels = np.asarray(decode_image(encode_image(rgba)))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[1, 1].tolist() == [255, 0, 0]
    la = Image.new("LA", (4, 4), (100, 255))
    assert np.asarray(decode_image(encode_image(la)))[0, 0].tolist() == [100, 100, 100]


def test_cmyk_jpeg():
    cmyk = Image.new("RGB", (8, 8), (0, 0, 255)).convert("CMYK")
    pixels = np.asarray(decode_image(encode_image(cmyk, "JPEG", quality=100))).astype(int)
    assert np.abs(pixels[4, 4] - [0, 0, 255]).max() <= 3


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    decoded = decode_image(encode_image(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (2, 6)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"<html>404 not found</html>",
        encode_image(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:150],  # truncated
        encode_image(Image.new("RGB", (64, 64)), "PNG")[:60],
    ],
)
def test_corrupt_bytes_raise_corrupt_image_error(blob):
    with pytest.raises(CorruptImageError):
        decode_image(blob)


def test_stats_ceiling_and_warning(caplog):
    stats = DecodeStats()
    stats.add_ok(97)
    for i in range(3):
        stats.add_bad(f"row {i}")
    with caplog.at_level(logging.WARNING, logger="service.data"):
        stats.warn("unit")
    assert "unit: skipped 3 of 100 images" in caplog.text and "row 0, row 1, row 2" in caplog.text
    stats.check(0.03, "unit")  # 3 <= floor(0.03 * 100)
    with pytest.raises(TooManyBadImagesError, match="unit: 3 of 100.*max_bad_fraction=0.02"):
        stats.check(0.02, "unit")
    clean = DecodeStats()
    clean.add_ok(10)
    clean.check(0.0, "clean")  # zero tolerance passes with zero bad
