"""Decode once (service.data.decoded) and TrainBatches with ``augment.backend=batched``.

The decoded tensor must hold exactly what the PIL decode gives, skip and count corrupt rows as
the per-image reader does, live in shared memory (DataLoader workers read it, nothing is
copied), and TrainBatches must give each rank its own DistributedSampler share, reshuffled every
epoch, as views of the same shape as the torchvision backend's.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from service.config import BUNDLED_DATA_DIR, load_config
from service.data import TooManyBadImagesError, decode_image
from service.data.augmenters import augment_seed
from service.data.decoded import (
    IndexBatchDataset,
    decode_once_plan,
    decode_rows,
    fit_uint8,
)
from service.train.batches import TrainBatches, augment_device
from service.train.inputs import WorkerInputs
from tests.helpers import encode_image

TEST_SUBSET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decoded_pixels_equal_the_pil_decode():
    rows = np.array([0, 3, 17, 40, 99])
    decoded = decode_rows(str(TEST_SUBSET), rows, 32)
    table = pq.read_table(TEST_SUBSET).take(rows)
    assert decoded.images.shape == (5, 3, 32, 32) and decoded.images.dtype == torch.uint8
    for i, blob in enumerate(table.column("image").to_pylist()):
        expected = torch.from_numpy(np.array(decode_image(blob))).permute(2, 0, 1)
        assert torch.equal(decoded.images[i], expected)
    assert decoded.labels.tolist() == table.column("label").to_pylist()
    assert decoded.stats.total == 5 and decoded.stats.bad == 0


def _grey(label: int) -> int:
    return 20 * label + 10


@pytest.fixture()
def corrupt_parquet(tmp_path):
    """10 solid-grey images whose grey encodes the label (sizes vary), 3 corrupt rows between."""
    blobs, labels = [], []
    for label in range(10):
        size = (32, 32) if label % 3 else (48, 20)  # other sizes: resized whole
        blobs.append(encode_image(Image.new("RGB", size, (_grey(label),) * 3)))
        labels.append(label)
    for at in (2, 6, 11):
        blobs.insert(at, b"not an image")
        labels.insert(at, 100 + at)  # would show if a bad row's label leaked
    path = tmp_path / "corrupt.parquet"
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "label": labels}), path)
    return path


def test_decode_skips_counts_and_keeps_labels(corrupt_parquet, caplog):
    with caplog.at_level(logging.WARNING, logger="service.data"):
        decoded = decode_rows(str(corrupt_parquet), None, 16, max_bad_fraction=0.25)
    assert decoded.stats.total == 13 and decoded.stats.bad == 3 and len(decoded) == 10
    assert "skipped 3 of 13 images" in caplog.text and "row 6 (" in caplog.text
    assert decoded.labels.tolist() == list(range(10))
    # each image's grey over its own extent (48x20 ones are stored whole: 16x7 at the top left)
    greys = [
        float(im[:, :h, :w].float().mean())
        for im, (h, w) in zip(decoded.images, decoded.sizes.tolist(), strict=True)
    ]
    assert [round((g - 10) / 20) for g in greys] == list(range(10))
    assert decoded.sizes[0].tolist() == [7, 16] and decoded.sizes[1].tolist() == [16, 16]
    assert decoded.images.shape == (10, 3, 16, 16)
    with pytest.raises(TooManyBadImagesError, match=r"corrupt.parquet.*3 of 13"):
        decode_rows(str(corrupt_parquet), None, 16, max_bad_fraction=0.2)


def test_non_square_images_are_stored_whole_with_their_extent():
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white left edge: outside any centre square
    slot, extent = fit_uint8(image, 12)
    assert slot.shape == (3, 12, 12) and extent == (4, 12)  # 60x20 → 12x4, top left
    assert int(slot[:, :4, 0].min()) >= 250 and int(slot[:, 4:].max()) == 0  # edge kept; padding
    square = Image.new("RGB", (12, 12), (7, 8, 9))
    slot, extent = fit_uint8(square, 12)  # already the size: pixel for pixel, fills the slot
    assert extent == (12, 12) and torch.equal(
        slot, torch.tensor([7, 8, 9]).view(3, 1, 1).expand(3, 12, 12).to(torch.uint8)
    )


def test_batched_crops_reach_every_part_of_a_non_square_image():
    """Issue 27 item 5: on a 400x300 image at 32 px the views must see its left and right
    edges (a centre-square decode never did: x < 50 and x > 350 were cut away)."""
    from service.config import AugmentConfig
    from service.data.batch_augment import BatchSimCLRAugment

    image = Image.new("RGB", (400, 300), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 40, 300))  # red left edge
    image.paste((0, 0, 255), (360, 0, 400, 300))  # blue right edge
    slot, extent = fit_uint8(image, 32)
    cfg = AugmentConfig(
        strength=0.0, grayscale_p=0.0, min_scale=0.08, mean=[0.0] * 3, std=[1.0] * 3
    )
    augment = BatchSimCLRAugment(cfg, 32, n_views=1, seed=0)
    (views,) = augment(slot.expand(256, -1, -1, -1).contiguous(), torch.tensor([extent] * 256))
    red = (views[:, 0] > 0.8) & (views[:, 2] < 0.2)
    blue = (views[:, 2] > 0.8) & (views[:, 0] < 0.2)
    black = views.amax(dim=1) < 0.05  # the padding below the image is never cropped
    assert red.any() and blue.any() and not black.any()


class _WritingDataset(IndexBatchDataset):
    """Writes into the decoded tensor from the worker: visible in the parent only if shared."""

    def __getitem__(self, rows):
        self.decoded.images[rows[0], 0, 0, 0] = 123
        return super().__getitem__(rows)


def test_decoded_tensor_is_shared_with_loader_workers():
    decoded = decode_rows(str(TEST_SUBSET), np.arange(8), 32)
    assert decoded.images.is_shared()
    decoded.images[:, 0, 0, 0] = 0
    dataset = _WritingDataset(decoded)
    sampler = BatchSampler(SequentialSampler(range(len(dataset))), 4, drop_last=True)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=1)
    batches = list(loader)
    assert [tuple(pixels.images.shape) for pixels, _ in batches] == [(4, 3, 32, 32)] * 2
    assert decoded.images[[0, 4], 0, 0, 0].tolist() == [123, 123]  # the worker's writes


def test_decode_once_plan_reason():
    plan = decode_once_plan(1000, 32, copies=2, available=20 * 2**20)
    assert plan.decode_once and plan.estimated_bytes == 2 * 1000 * 3 * 32 * 32
    assert "5.9 MiB decoded <= 50% of 20 MiB" in plan.reason()
    assert not decode_once_plan(10_000, 32, available=10 * 2**20).decode_once


# ----------------------------------------------------------- TrainBatches, backend=batched


def _inputs(tmp_path, **overrides) -> WorkerInputs:
    config = load_config(
        overrides={
            "data.train": str(TEST_SUBSET), "data.limit": 128, "augment.backend": "batched",
            "data.augment_device": "cpu", "train.global_batch_size": 32,
            "train.num_workers": 2, **overrides,
        }
    )  # fmt: skip
    return WorkerInputs(config=config, storage_path=str(tmp_path), run_name="t")


def _epoch_rows(batches: TrainBatches, epoch: int) -> list[int]:
    batches.data.sampler.set_epoch(epoch)
    return list(batches.data.sampler)


def test_train_batches_batched_backend(tmp_path, caplog):
    inputs = _inputs(tmp_path)
    with caplog.at_level(logging.INFO, logger="service.data"):
        ranks = [TrainBatches(inputs, rank, 2) for rank in range(2)]
    assert "decode once into memory, estimated" in caplog.text
    for tb in ranks:
        assert tb.steps_per_epoch == 128 // 32
        decoded = tb.data.loader.dataset.decoded
        assert len(decoded) == 128  # data.limit rows of the training split
        for epoch in (0, 1):
            rows = _epoch_rows(tb, epoch)
            seen = []
            for views, labels in tb.epoch(epoch):
                assert len(views) == 2 and labels.shape == (16,)
                for v in views:
                    assert v.shape == (16, 3, 32, 32) and v.dtype == torch.float32
                assert not torch.equal(views[0], views[1])
                seen += labels.tolist()
            assert seen == decoded.labels[rows].tolist()  # batches follow the sampler's share
    shares = [[set(_epoch_rows(tb, e)) for tb in ranks] for e in (0, 1)]
    for a, b in shares:
        assert len(a) == len(b) == 64 and not a & b  # each rank its own share
    assert _epoch_rows(ranks[0], 0) != _epoch_rows(ranks[0], 1)  # reshuffled every epoch
    # Ranks draw different augmentations.
    assert augment_seed(inputs.config, 0) != augment_seed(inputs.config, 1)


def test_train_batches_batched_streams_when_memory_is_short(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("service.data.decoded.available_memory", lambda: 2**18)
    with caplog.at_level(logging.INFO, logger="service.data"):
        tb = TrainBatches(_inputs(tmp_path, **{"data.limit": 64}), 0, 2)
    assert "streaming (decode per item, batched augment), estimated" in caplog.text
    batches = list(tb.epoch(0))
    assert len(batches) == 2
    for views, labels in batches:
        assert [tuple(v.shape) for v in views] == [(16, 3, 32, 32)] * 2 and labels.shape == (16,)


def test_augment_device():
    config = load_config(overrides={"data.augment_device": "cpu"})
    assert augment_device(config).type == "cpu"
    config = load_config(overrides={"data.augment_device": "auto", "train.use_gpu": False})
    assert augment_device(config).type == "cpu"
    if not torch.cuda.is_available():
        config = load_config(overrides={"data.augment_device": "cuda"})
        with pytest.raises(ValueError, match="no GPU"):
            augment_device(config)


@pytest.mark.parametrize("backend", ["batched", "torchvision"])
def test_train_batches_crop_size_sets_the_view_side(tmp_path, backend):
    # augment.crop_size shrinks the training views only; decoding stays at data.image_size.
    inputs = _inputs(tmp_path, **{"augment.crop_size": 16, "augment.backend": backend})
    tb = TrainBatches(inputs, 0, 2)
    views, labels = next(iter(tb.epoch(0)))
    assert [tuple(v.shape) for v in views] == [(16, 3, 16, 16)] * 2 and labels.shape == (16,)
