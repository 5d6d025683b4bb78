"""The validation monitors decode their rows once (issue 26 item 2): the kNN monitor's bank and
validation rows and the image–text monitor's rows are kept as uint8 after the first epoch, give
exactly the metrics of decoding every epoch, and a later epoch reads nothing from the source.

Reads are counted by a real source: the bundled Parquet file behind a registered ``counted``
format whose ``read`` counts its calls (no mocks).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from service.config import BUNDLED_DATA_DIR, load_config
from service.data.augment import eval_normalize, eval_pixels, eval_transform
from service.data.sources import SOURCE_FORMATS, register_source
from service.models import unwrap
from service.train import KnnMonitor, build_state

pytestmark = pytest.mark.usefixtures("one_thread")

SMOKE = "jobs/configs/smoke-cpu.yaml"
COUNTED = "counted"


class CountingSource:
    """A Parquet source whose ``read`` calls are counted in ``reads`` (shared by every
    inspection of the path, as each reader inspects the path anew)."""

    reads: dict[str, int] = {}

    def __init__(self, path: str) -> None:
        self._inner = SOURCE_FORMATS["parquet"].inspect(path.removesuffix(f"#{COUNTED}"))
        self._key = path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read(self, columns: list[str], indices: np.ndarray | None = None) -> Any:
        CountingSource.reads[self._key] = CountingSource.reads.get(self._key, 0) + 1
        return self._inner.read(columns, indices)


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[str]:
    """A path of the bundled training subset that the ``counted`` format owns."""
    path = f"{BUNDLED_DATA_DIR / 'cifar10-train-subset.parquet'}#{COUNTED}"
    register_source(COUNTED, lambda p: p.endswith(f"#{COUNTED}"), CountingSource)
    CountingSource.reads.clear()
    try:
        yield path
    finally:
        SOURCE_FORMATS.pop(COUNTED)


def _monitor_and_model(path: str, decode_once: bool) -> tuple[KnnMonitor, torch.nn.Module]:
    config = load_config(SMOKE, [f"data.train={path}", "eval.knn_max_train=1000"])
    torch.manual_seed(0)
    s = build_state(config, torch.device("cpu"), steps_per_epoch=4, gather_distributed=False)
    return KnnMonitor(config, decode_once=decode_once), unwrap(s.model)


def test_decoded_once_gives_the_same_metrics_and_reads_nothing_again(counted: str) -> None:
    once, model = _monitor_and_model(counted, decode_once=True)
    again, _ = _monitor_and_model(counted, decode_once=False)
    cpu = torch.device("cpu")
    CountingSource.reads.clear()
    first = once(model, cpu)
    reads_first = CountingSource.reads[counted]
    second = once(model, cpu)
    assert CountingSource.reads[counted] == reads_first  # epoch 2: no read, no decode
    assert once.bank.decodes == once.val.decodes == 1
    assert once.bank.pixels.dtype == torch.uint8 and len(once.bank.pixels) == 1000
    old = again(model, cpu)  # its first call decodes the health pairs too (kept since)
    CountingSource.reads.clear()
    again(model, cpu)
    assert CountingSource.reads[counted] == 2  # the old path: bank + validation every epoch
    assert again.bank.decodes == again.val.decodes == 2
    assert first == second == old  # kNN accuracy and every health metric, exactly
    assert {"knn_top1", "health_effective_rank", "health_alignment"} <= set(first)


def test_the_same_features_either_way(counted: str) -> None:
    once, model = _monitor_and_model(counted, decode_once=True)
    again, _ = _monitor_and_model(counted, decode_once=False)
    x1, y1 = once.val.features(model.backbone)
    x2, y2 = again.val.features(model.backbone)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_eval_pixels_then_normalize_is_the_eval_transform() -> None:
    rng = np.random.default_rng(0)
    for w, h in ((40, 30), (30, 40), (32, 32), (17, 64)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        batch = eval_pixels(image, 24)[None]
        reference = eval_transform(24, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])(image)
        assert torch.equal(eval_normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])(batch)[0], reference)


def test_image_text_monitor_keeps_its_rows_decoded() -> None:
    from service.eval.image_text import ImageTextMonitor
    from service.text import fit_tokenizer

    train = BUNDLED_DATA_DIR / "cifar10-train-captions.parquet"
    config = load_config(overrides=[
        f"data.train={train}", "text.column=text", "loss.name=symmetric",
        "text.vocab_size=300", "text.width=32", "text.layers=1", "text.heads=2",
        "text.context_length=16", "model.proj_out_dim=16", "model.proj_hidden_dim=32",
        "mlflow.champion_metric=val_zeroshot_top1", "eval.knn_max_train=120",
    ])  # fmt: skip
    from service.models import build_training_model

    tokenizer = fit_tokenizer(config)
    torch.manual_seed(0)
    model = build_training_model(config)
    once = ImageTextMonitor(config, tokenizer, decode_once=True)
    each = ImageTextMonitor(config, tokenizer, decode_once=False)
    assert once(model, "cpu") == each(model, "cpu") == once(model, "cpu")
    assert once.data().pixels is not None and len(once.data().pixels) == len(once.data())
    assert once.data().pixels.dtype == torch.uint8 and each.data().pixels is None


def test_rows_that_do_not_fit_are_decoded_every_epoch_with_a_notice(capsys) -> None:
    from service.data.splits import train_val_rows
    from service.train import monitor_decode_once

    config = load_config(SMOKE)
    rows = train_val_rows(config)
    assert monitor_decode_once(config, rows.train_rows(), rows.val)  # 15 MiB: kept
    huge = load_config(SMOKE, ["data.image_size=8192"])  # 5,000 x 201 MiB: never fits
    assert not monitor_decode_once(huge, rows.train_rows(), rows.val)
    err = capsys.readouterr().err
    assert "kNN monitor: decoding its rows every epoch (estimated" in err
    assert "> 50% of" in err and err.count("kNN monitor") == 1
