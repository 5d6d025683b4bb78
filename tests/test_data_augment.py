"""Augmentations (strength knob, eval transform, views), folder packing, preview PNG, commands."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from service.commands.data import pack_command, preview_command
from service.config import BUNDLED_DATA_DIR, AugmentConfig
from service.data import (
    DataError,
    MultiViewTransform,
    ParquetImageDataset,
    decode_image,
    denormalize,
    eval_transform,
    pack_image_folder,
    read_image_table,
    save_augmentation_preview,
    simclr_transform,
)
from tests.helpers import solid_png

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_SUBSET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


@pytest.fixture(scope="module")
def images():
    table = read_image_table(str(TEST_SUBSET), columns=["image"], limit=32, seed=3)
    return [decode_image(b) for b in table.column("image").to_pylist()]


def _colour_shift(cfg: AugmentConfig, images) -> float:
    """Mean |per-image channel mean/std of a view - of the original| (unnormalised, 0-1 scale)."""
    t = simclr_transform(cfg, 32)
    base = eval_transform(32, cfg.mean, cfg.std)
    torch.manual_seed(0)
    diffs = []
    for image in images:
        for _ in range(2):
            view, orig = (
                denormalize(t(image), cfg.mean, cfg.std),
                denormalize(base(image), cfg.mean, cfg.std),
            )
            stats = lambda x: torch.cat([x.mean(dim=(1, 2)), x.std(dim=(1, 2))])  # noqa: E731
            diffs.append((stats(view) - stats(orig)).abs().mean().item())
    return float(np.mean(diffs))


def test_strength_changes_colour_statistics(images):
    # Only jitter differs between the two settings: no greyscale, full-image crops (flips only).
    common = dict(min_scale=1.0, grayscale_p=0.0, jitter_p=1.0)
    none = _colour_shift(AugmentConfig(strength=0.0, **common), images)
    full = _colour_shift(AugmentConfig(strength=1.0, **common), images)
    assert none < 0.01  # flips do not move colour statistics (measured ~1e-9)
    assert full > 0.08  # measured ~0.13-0.15 (0-1 pixel scale)


def test_strength_flows_into_the_jitter_once():
    t = simclr_transform(AugmentConfig(strength=0.5, jitter_p=0.7), 32)
    [apply] = [op for op in t.transforms if isinstance(op, v2.RandomApply)]
    jitter = apply.transforms[0]
    assert apply.p == 0.7
    assert jitter.brightness == pytest.approx((0.6, 1.4))
    assert jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue == pytest.approx((-0.1, 0.1))
    crop = t.transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.2, 1.0)
    # s = 0 is valid and means no colour jitter at all.
    zero = simclr_transform(AugmentConfig(strength=0.0), 32)
    assert not any(isinstance(op, v2.RandomApply) for op in zero.transforms)
    with pytest.raises(DataError, match="augment.strength must be in"):
        simclr_transform(AugmentConfig(strength=3.0), 32)


def test_blur_option_and_view_shapes(images):
    cfg = AugmentConfig(blur=True)
    t = simclr_transform(cfg, 64)
    [blur] = [op.transforms[0] for op in t.transforms if isinstance(op, v2.RandomApply)][1:]
    assert isinstance(blur, v2.GaussianBlur) and tuple(blur.kernel_size) == (7, 7)
    views = MultiViewTransform(t, 3)(images[0])
    assert len(views) == 3 and all(
        v.shape == (3, 64, 64) and v.dtype == torch.float32 for v in views
    )
    assert not torch.equal(views[0], views[1])  # independent draws


def test_eval_transform_is_deterministic_and_normalised():
    t = eval_transform(24, MEAN, STD)
    colour = (124, 30, 250)
    image = Image.new("RGB", (48, 32), colour)
    a, b = t(image), t(image)
    assert a.shape == (3, 24, 24) and torch.equal(a, b)
    expected = (torch.tensor(colour) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(a[:, 5, 7], expected, atol=1e-5, rtol=0)
    wide = t(Image.new("RGB", (100, 20)))  # shorter side → 24, centre crop
    assert wide.shape == (3, 24, 24)


def test_pack_round_trip(tmp_path):
    src = tmp_path / "folder"
    files = {
        "zebra/a.png": solid_png((0, 0, 0)),
        "cat/b.png": solid_png((255, 0, 0)),
        "cat/nested/c.PNG": solid_png((0, 255, 0), size=(40, 7)),
        "dog/d.jpg": solid_png((0, 0, 255)),  # PNG bytes under a .jpg name: stored as is
        "dog/broken.jpg": b"not an image",
    }
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (src / "dog" / "README.txt").write_text("ignored")

    summary = pack_command(str(src), str(tmp_path / "out" / "packed.parquet"))
    assert summary["rows"] == 4 and summary["classes"] == ["cat", "dog", "zebra"]
    assert summary["per_class"] == {"cat": 2, "dog": 1, "zebra": 1}
    assert summary["unreadable"] == 1 and "broken.jpg" in summary["unreadable_files"][0]

    table = pq.read_table(summary["out"])
    columns = [table.column(c).to_pylist() for c in ("label", "label_name", "image")]
    rows = sorted(zip(*columns, strict=True))
    assert rows == [
        (0, "cat", files["cat/b.png"]),
        (0, "cat", files["cat/nested/c.PNG"]),
        (1, "dog", files["dog/d.jpg"]),
        (2, "zebra", files["zebra/a.png"]),
    ]  # labels in sorted class-name order, bytes as stored
    ds = ParquetImageDataset(summary["out"], eval_transform(8, MEAN, STD))
    assert len(ds) == 4 and ds.class_names == {0: "cat", 1: "dog", 2: "zebra"}


def test_pack_writes_a_seeded_random_order(tmp_path):
    """Rows are not in class order (a block-shuffling reader would see class runs), and the
    same seed writes the same file."""
    src = tmp_path / "folder"
    for c in range(4):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(16):
            (src / f"class{c}" / f"{i:02d}.png").write_bytes(solid_png((c, i, 0)))
    labels = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        pack_image_folder(src, tmp_path / f"{name}.parquet", seed=seed)
        labels[name] = pq.read_table(tmp_path / f"{name}.parquet").column("label").to_pylist()
    assert labels["a"] == labels["b"] != labels["c"]
    assert sorted(labels["a"]) == [c for c in range(4) for _ in range(16)]
    assert labels["a"] != sorted(labels["a"])
    runs = sum(1 for x, y in zip(labels["a"], labels["a"][1:], strict=False) if x != y)
    assert runs > 20  # class order would have 3 changes; a random order ~48


def test_pack_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        pack_image_folder(tmp_path / "nope", tmp_path / "o.parquet")
    (tmp_path / "src" / "empty_class").mkdir(parents=True)
    (tmp_path / "src" / "ok").mkdir()
    (tmp_path / "src" / "ok" / "a.png").write_bytes(solid_png((1, 2, 3)))
    with pytest.raises(DataError, match=r"without images.*\['empty_class'\]"):
        pack_image_folder(tmp_path / "src", tmp_path / "o.parquet")


def test_preview_png(tmp_path):
    cfg = AugmentConfig()
    out = save_augmentation_preview(str(TEST_SUBSET), tmp_path / "p.png", cfg, 32, n_images=3)
    with Image.open(out) as png:
        assert png.format == "PNG"
        pixels = np.asarray(png.convert("RGB"))
    tile, pad, header, label_w = 96, 4, 22, 96
    assert pixels.shape == (  # header, 3 rows of tiles, 3 footer lines with the settings
        4 * header + 3 * (tile + pad) + pad,
        label_w + 3 * (tile + pad) + pad,
        3,
    )
    # The original of row 0 is the (upscaled) image itself, un-normalised.
    table = read_image_table(str(TEST_SUBSET), limit=3, seed=0)
    first = np.asarray(decode_image(table.column("image")[0].as_py()).resize((tile, tile), 0))
    y, x = header + pad, label_w + pad
    assert np.array_equal(pixels[y : y + tile, x : x + tile], first)
    # Same arguments → same picture (seeded sample and views).
    again = save_augmentation_preview(str(TEST_SUBSET), tmp_path / "q.png", cfg, 32, n_images=3)
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), pixels)


def test_preview_shows_the_backend_in_use(tmp_path):
    """augment.backend=batched: the views are BatchSimCLRAugment's (seeded), not the PIL ones."""
    pictures = {}
    for backend in ("torchvision", "batched", "batched"):
        cfg = AugmentConfig(backend=backend)
        out = save_augmentation_preview(
            str(TEST_SUBSET), tmp_path / f"{backend}.png", cfg, 32, n_images=3
        )
        pixels = np.asarray(Image.open(out).convert("RGB"))
        if backend in pictures:  # seeded: the same picture again
            assert np.array_equal(pixels, pictures[backend])
        pictures[backend] = pixels
    tile, pad, header, label_w = 96, 4, 22, 96
    x = label_w + pad + tile + pad  # view 1 of row 0
    views = {b: p[header + pad : header + pad + tile, x : x + tile] for b, p in pictures.items()}
    assert not np.array_equal(views["torchvision"], views["batched"])


def test_preview_command_applies_overrides(tmp_path):
    summary = preview_command(
        str(TEST_SUBSET),
        str(tmp_path / "v.png"),
        None,
        ["augment.strength=0.25", "augment.n_views=3"],
    )
    assert summary["augment"]["strength"] == 0.25 and summary["n_views"] == 3
    with Image.open(summary["out"]) as png:
        assert png.width == 96 + 4 * (96 + 4) + 4  # original + 3 views
