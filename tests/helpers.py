"""Plain helpers shared by several test modules (fixtures live in tests/conftest.py)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image


def encode_image(image: Image.Image, fmt: str = "PNG", **save_kwargs: Any) -> bytes:
    """``image`` encoded as ``fmt`` bytes (what a Parquet ``image`` column holds)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def solid_png(colour: tuple[int, int, int], size: tuple[int, int] = (10, 12)) -> bytes:
    """A one-colour RGB PNG."""
    return encode_image(Image.new("RGB", size, colour))


def heavy_modules_after(code: str, names: tuple[str, ...] = ("torch", "ray", "mlflow")) -> list:
    """Which of ``names`` a fresh interpreter has imported after running ``code``."""
    import subprocess
    import sys

    probe = f"import sys\n{code}\nprint(sorted(n for n in {names!r} if n in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip())  # noqa: S307 - our own printed list of strings
