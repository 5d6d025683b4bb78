"""Image–text data: captions (templated, packed from CSV/JSONL), both readers carrying them aligned
with images and labels, corrupt rows dropping their captions, TrainBatches in text mode, and the
pre-flight rules of the ``text`` section.

Alignment is checked on data whose pixels, label and caption all name the same number: a solid
grey image ``_grey(k)``, label ``k``, caption ``"number k"``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from service.cli import main
from service.config import BUNDLED_DATA_DIR, ConfigError, TextConfig, load_config
from service.data import (
    CAPTION_TEMPLATES,
    DecodeBatchFn,
    MultiViewBatchFn,
    ParquetImageDataset,
    TooManyBadImagesError,
    augment_ray_dataset,
    collate_views,
    decode_image,
    eval_transform,
    iter_captioned_batches,
    pack_image_folder,
    read_ray_dataset,
)
from service.data.checks import text_config_problems
from service.data.decoded import decode_rows
from service.text import Tokenizer
from service.train.batches import TrainBatches
from service.train.inputs import WorkerInputs
from service.train.preflight import preflight
from tests.helpers import solid_png

pytestmark = pytest.mark.usefixtures("one_thread")


def _grey(label: int) -> int:
    return 20 * label + 10


def _label_of(pixels: torch.Tensor) -> int:
    """The label a solid-grey uint8 image ``[3, S, S]`` encodes."""
    return (int(pixels.float().mean().round()) - 10) // 20


@pytest.fixture()
def captioned(tmp_path):
    """10 good rows (grey ↔ label ↔ caption), then a corrupt image with a caption, a good image
    with an empty caption and one with a null caption, interleaved."""
    rows = [(solid_png((_grey(k),) * 3, (32, 32)), k, f"number {k}") for k in range(10)]
    rows.insert(2, (b"not an image", 2, "number 2 corrupt"))
    rows.insert(5, (solid_png((_grey(7),) * 3, (32, 32)), 7, "  "))
    rows.insert(8, (solid_png((_grey(8),) * 3, (32, 32)), 8, None))
    path = tmp_path / "captioned.parquet"
    table = pa.table(
        {
            "image": pa.array([r[0] for r in rows], pa.binary()),
            "label": pa.array([r[1] for r in rows], pa.int64()),
            "label_name": [f"n{r[1]}" for r in rows],
            "text": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    pq.write_table(table, path)
    return path


# ----------------------------------------------------------------------------- captions command


def test_captions_command_is_seeded_varied_and_keeps_rows(tmp_path, capsys):
    src = f"{BUNDLED_DATA_DIR}/cifar10-test-subset.parquet"
    outs = [tmp_path / f"{i}.parquet" for i in range(3)]
    for out, seed in zip(outs, (0, 0, 1), strict=True):
        assert main(["data", "captions", src, str(out), "--seed", str(seed)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 1000 and summary["templates"] == len(CAPTION_TEMPLATES)
    before, first = pq.read_table(src), pq.read_table(outs[0])
    assert first.drop_columns(["text"]).equals(before)  # same rows, same order
    texts, names = first.column("text").to_pylist(), before.column("label_name").to_pylist()
    assert all(n in t for t, n in zip(texts, names, strict=True))
    assert len({t.replace(n, "{}") for t, n in zip(texts, names, strict=True)}) >= 8  # varied
    assert "a photo of an airplane." in texts or "an image showing an airplane." in texts
    assert pq.read_table(outs[1]).equals(first)  # same seed, same file
    assert pq.read_table(outs[2]).column("text").to_pylist() != texts


def test_captions_command_templates_file(tmp_path):
    src = f"{BUNDLED_DATA_DIR}/cifar10-test-subset.parquet"
    templates = tmp_path / "t.txt"
    templates.write_text("# mine\nthe {}!\n\nlook: {}\n")
    out = tmp_path / "o.parquet"
    assert main(["data", "captions", src, str(out), "--templates", str(templates)]) == 0
    texts = set(pq.read_table(out).column("text").to_pylist())
    assert texts == {f"the {n}!" for n in _names()} | {f"look: {n}" for n in _names()}
    templates.write_text("no placeholder\n")
    assert main(["data", "captions", src, str(out), "--templates", str(templates)]) == 2


def _names() -> set[str]:
    return set(
        pq.read_table(f"{BUNDLED_DATA_DIR}/cifar10-test-subset.parquet")
        .column("label_name")
        .to_pylist()
    )


def test_bundled_captioned_files_are_the_subsets_plus_text():
    for split in ("train", "test"):
        subset = pq.read_table(f"{BUNDLED_DATA_DIR}/cifar10-{split}-subset.parquet")
        captioned = pq.read_table(f"{BUNDLED_DATA_DIR}/cifar10-{split}-captions.parquet")
        assert captioned.drop_columns(["text"]).equals(subset)
        texts = captioned.column("text").to_pylist()
        names = subset.column("label_name").to_pylist()
        assert all(n in t for t, n in zip(texts, names, strict=True))


# ------------------------------------------------------------------------------ pack --captions


def _image_folder(root, classes: bool):
    for k in range(4):
        folder = root / f"c{k % 2}" if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (_grey(k),) * 3).save(folder / f"{k}.png")
    return root


def _check_packed(out, expect_labels: bool) -> list[str]:
    table = pq.read_table(out)
    assert ("label" in table.column_names) == expect_labels
    for blob, text in zip(table["image"].to_pylist(), table["text"].to_pylist(), strict=True):
        k = _label_of(torch.from_numpy(np.array(decode_image(blob))))
        assert text == f"caption of {k}"  # each image kept its own caption
    return table["text"].to_pylist()


def test_pack_with_captions_csv_keeps_classes(tmp_path):
    src = _image_folder(tmp_path / "imgs", classes=True)
    captions = tmp_path / "captions.csv"
    lines = ["file,caption"] + [f"c{k % 2}/{k}.png,caption of {k}" for k in (0, 1, 2)]
    captions.write_text("\n".join(lines + ["missing.png,nobody"]) + "\n")
    summary = pack_image_folder(src, tmp_path / "out.parquet", captions=captions)
    assert summary["rows"] == 3 and summary["uncaptioned_files"] == ["c1/3.png"]
    assert summary["captions_without_image_files"] == ["missing.png"]
    _check_packed(tmp_path / "out.parquet", expect_labels=True)
    labels = pq.read_table(tmp_path / "out.parquet")["label_name"].to_pylist()
    assert sorted(labels) == ["c0", "c0", "c1"]


def test_pack_with_captions_jsonl_flat_folder_via_cli(tmp_path, capsys):
    src = _image_folder(tmp_path / "imgs", classes=False)
    captions = tmp_path / "captions.jsonl"
    records = [{"file_name": f"{k}.png", "text": f"caption of {k}"} for k in range(4)]
    captions.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "out.parquet"
    assert main(["data", "pack", str(src), str(out), "--captions", str(captions)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 4
    assert sorted(_check_packed(out, expect_labels=False)) == [f"caption of {k}" for k in range(4)]
    captions.write_text('{"file": "0.png"}\n')
    assert main(["data", "pack", str(src), str(out), "--captions", str(captions)]) == 2


# ------------------------------------------------------------------ readers: captions stay aligned


def test_decode_once_drops_the_caption_of_a_corrupt_row(captioned, caplog):
    with caplog.at_level(logging.WARNING, logger="service.data"):
        decoded = decode_rows(str(captioned), None, 32, max_bad_fraction=0.5, text_column="text")
    assert decoded.stats.total == 13 and decoded.stats.bad == 3
    assert "null or empty caption" in caplog.text
    assert decoded.texts == [f"number {k}" for k in range(10)]
    assert decoded.labels.tolist() == list(range(10))
    assert [_label_of(img) for img in decoded.images] == list(range(10))
    with pytest.raises(TooManyBadImagesError):
        decode_rows(str(captioned), None, 32, max_bad_fraction=0.1, text_column="text")


def test_streaming_reader_carries_captions(captioned):
    transform = eval_transform(32, [0.0] * 3, [1.0] * 3)
    ds = ParquetImageDataset(
        str(captioned), transform, n_views=1, max_bad_fraction=0.5,
        text_column="text", return_text=True,
    )  # fmt: skip
    assert len(ds) == 10 and ds.stats.bad == 3 and ds.texts == [f"number {k}" for k in range(10)]
    views, labels, texts = collate_views([ds[i] for i in range(10)])
    assert len(views) == 1 and views[0].shape == (10, 3, 32, 32)
    assert texts == [f"number {k}" for k in labels.tolist()]
    assert [_label_of(v * 255) for v in views[0]] == labels.tolist()
    plain = ParquetImageDataset(str(captioned), transform, max_bad_fraction=0.5, text_column="text")
    assert len(plain[0]) == 2 and plain.texts == ds.texts  # eval items stay (image, label)


@pytest.mark.parametrize("backend", ["batched", "torchvision"])
def test_ray_map_fn_drops_corrupt_rows_with_their_captions(captioned, backend):
    table = pq.read_table(captioned)
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in ("image", "label", "text")}
    if backend == "batched":
        fn = DecodeBatchFn(32, max_bad_fraction=0.5, text_column="text")
    else:
        augment = load_config().augment
        fn = MultiViewBatchFn(augment, 32, n_views=1, max_bad_fraction=0.5, text_column="text")
    out = fn(batch)
    assert out["label"].tolist() == list(range(10)) and int(out["n_skipped"].sum()) == 3
    assert out["text"].tolist() == [f"number {k}" for k in range(10)]
    if backend == "batched":
        assert [_label_of(torch.from_numpy(p)) for p in out["pixels"]] == list(range(10))


@pytest.mark.slow  # starts a local Ray instance
def test_ray_reader_yields_aligned_images_labels_and_captions(captioned):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = augment_ray_dataset(
            read_ray_dataset(str(captioned), text_column="text"), load_config().augment, 32,
            n_views=1, max_bad_fraction=0.5, text_column="text",
        )  # fmt: skip
        seen = []
        for pixels, labels, texts in iter_captioned_batches(ds, 5, "text", shuffle=True):
            images = pixels.images  # decoded only: the extents travel along (all 32 x 32 here)
            assert images.dtype == torch.uint8 and images.shape == (5, 3, 32, 32)
            assert pixels.sizes.tolist() == [[32, 32]] * 5
            assert [_label_of(i) for i in images] == labels.tolist()
            assert texts == [f"number {k}" for k in labels.tolist()]
            seen += labels.tolist()
        assert sorted(seen) == list(range(10))
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------- TrainBatches, text


def _text_inputs(tmp_path, data, **overrides) -> WorkerInputs:
    config = load_config(
        overrides={
            "data.train": str(data), "data.val_fraction": 0, "data.max_bad_fraction": 0.5,
            "data.augment_device": "cpu", "train.global_batch_size": 4, "train.num_workers": 2,
            "text.column": "text", "text.context_length": 8, **overrides,
        }
    )  # fmt: skip
    tokenizer = Tokenizer.fit([f"number {k}" for k in range(10)], vocab_size=300)
    return WorkerInputs(
        config=config, storage_path=str(tmp_path), run_name="t",
        tokenizer_json=tokenizer.to_json(),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("backend", "stream"), [("batched", False), ("batched", True), ("torchvision", True)]
)
def test_train_batches_text_mode(tmp_path, captioned, monkeypatch, backend, stream):
    if stream:
        monkeypatch.setattr("service.data.decoded.available_memory", lambda: 2**10)
    inputs = _text_inputs(tmp_path, captioned, **{"augment.backend": backend})
    tokenizer = Tokenizer.from_json(inputs.tokenizer_json)
    tb = TrainBatches(inputs, 0, 2)
    assert tb.steps_per_epoch == 10 // 4
    for epoch in (0, 1):
        batches = list(tb.epoch(epoch))
        assert len(batches) == 2
        for views, labels in batches:
            image, tokens = views
            assert image.shape == (2, 3, 32, 32) and image.dtype == torch.float32
            assert tokens.shape == (2, 8) and tokens.dtype == torch.int64
            assert [tokenizer.decode(t) for t in tokens.tolist()] == [
                f"number {k}" for k in labels.tolist()
            ]


def test_train_batches_text_mode_needs_the_tokenizer(tmp_path, captioned):
    inputs = _text_inputs(tmp_path, captioned)
    inputs = WorkerInputs(config=inputs.config, storage_path=str(tmp_path), run_name="t")
    with pytest.raises(ValueError, match="tokenizer_json"):
        TrainBatches(inputs, 0, 2)


# ----------------------------------------------------------------------------------- preflight


def _text_config(**overrides):
    return load_config(
        overrides={
            "text.column": "text",
            "loss.name": "symmetric",  # the image–text losses (symmetric | siglip)
            "mlflow.champion_metric": "train_loss",
            "data.train": f"{BUNDLED_DATA_DIR}/cifar10-train-captions.parquet",
            "data.test": f"{BUNDLED_DATA_DIR}/cifar10-test-captions.parquet",
            **overrides,
        }
    )


def test_preflight_accepts_the_bundled_captioned_data():
    preflight(_text_config())


def test_preflight_names_a_missing_or_wrong_text_column(tmp_path):
    with pytest.raises(ConfigError) as err:
        preflight(_text_config(**{"data.test": f"{BUNDLED_DATA_DIR}/cifar10-test-subset.parquet"}))
    assert "data.test" in str(err.value) and "no caption column 'text'" in str(err.value)
    with pytest.raises(ConfigError, match="no caption column 'caption'"):
        preflight(_text_config(**{"text.column": "caption"}))
    with pytest.raises(ConfigError, match="caption column 'label' is int64, expected strings"):
        preflight(_text_config(**{"text.column": "label"}))
    empty = tmp_path / "empty.parquet"
    table = pq.read_table(f"{BUNDLED_DATA_DIR}/cifar10-test-captions.parquet").slice(0, 64)
    pq.write_table(table.set_column(3, "text", pa.array([""] * 64, pa.string())), empty)
    with pytest.raises(ConfigError, match="captions in 'text' are null or empty"):
        preflight(_text_config(**{"data.train": str(empty), "train.global_batch_size": 8}))


def test_text_section_rules():
    assert text_config_problems(TextConfig()) == []  # image-only: not checked
    problems = text_config_problems(
        TextConfig(column="text", context_length=3, vocab_size=100, width=10, heads=4,
                   templates=["no slot"])
    )  # fmt: skip
    joined = "\n".join(problems)
    for key in ("text.context_length", "text.vocab_size", "text.templates"):
        assert key in joined
    assert "text.width" not in joined  # the tower's shape is the model's rule, reported once
    with pytest.raises(ConfigError, match="text.context_length must be >= 4"):
        preflight(_text_config(**{"text.context_length": 2}), data=False)
