"""Representation health of image–text runs: the ``ImageTextMonitor``'s ``health_*`` row (image and
caption as the positives) against a hand-written reference and ``representation_health``, a forced
collapse of either tower seen by ``flag_collapse``, and the names the loop, Tune and the
training-curves figure read."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from service.config import BUNDLED_DATA_DIR, Config, load_config
from service.eval.health import (
    effective_rank,
    image_text_health,
    representation_health,
    target_gap,
)
from service.eval.image_text import ImageTextMonitor, image_text_metrics
from service.eval.retrieval import caption_groups
from service.models import build_training_model
from service.text import fit_tokenizer
from service.tracking.logger import MetricLogger
from service.train.epoch import flag_collapse, monitor_metrics
from tests.test_health import ConstantHead

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = str(BUNDLED_DATA_DIR / "cifar10-train-captions.parquet")
DIM = 16  # model.proj_out_dim: the joint embedding space


def _config(*overrides: str) -> Config:
    base = [
        f"data.train={TRAIN}", "text.column=text", "loss.name=symmetric", "text.vocab_size=300",
        "text.width=32", "text.layers=1", "text.heads=2", "text.context_length=16",
        f"model.proj_out_dim={DIM}", "model.proj_hidden_dim=32", "eval.knn_max_train=120",
    ]  # fmt: skip
    return load_config(overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def clip() -> tuple[Config, ImageTextMonitor]:
    config = _config()
    monitor = ImageTextMonitor(config, fit_tokenizer(config))
    monitor.data()  # read once for the module
    return config, monitor


def _model(config: Config) -> nn.Module:
    torch.manual_seed(0)
    return build_training_model(config)


def _ref_gap(images: np.ndarray, texts: np.ndarray, ids: list[int]) -> float:
    """Image i's cos to its own caption string minus its largest cos to any other string."""
    unit = [row / math.sqrt(sum(v * v for v in row)) for row in images]
    tunit = [row / math.sqrt(sum(v * v for v in row)) for row in texts]
    gaps = []
    for i, z in enumerate(unit):
        sims = [float(z @ t) for t in tunit]
        gaps.append(sims[ids[i]] - max(s for j, s in enumerate(sims) if j != ids[i]))
    return sum(gaps) / len(gaps)


def test_the_row_is_representation_health_with_captions_as_the_positives() -> None:
    g = torch.Generator().manual_seed(3)
    features = torch.randn(60, 24, generator=g, dtype=torch.float64)
    images = torch.randn(60, 8, generator=g, dtype=torch.float64)
    captions = [f"caption {i % 7}" for i in range(60)]  # repeated strings: one target each
    ids, distinct = caption_groups(captions)
    texts = images[:7] + 0.3 * torch.randn(7, 8, generator=g, dtype=torch.float64)
    row = image_text_health(features, images, texts, ids)
    paired = texts[ids]  # image i's caption, one row per image
    reference = representation_health(features, images, images, paired)
    assert set(row) == set(reference) | {"health_text_effective_rank"}
    for key in set(reference) - {"health_positive_gap"}:
        assert row[key] == pytest.approx(reference[key], rel=1e-12), key
    assert row["health_text_effective_rank"] == pytest.approx(effective_rank(paired), rel=1e-12)
    assert row["health_positive_gap"] == pytest.approx(
        _ref_gap(images.numpy(), texts.numpy(), ids.tolist()), rel=1e-9
    )
    # an identical caption is the same target, not a negative: the per-row gap would see the
    # other rows' copies of image i's caption as its hardest negatives (a gap <= 0 always)
    assert row["health_positive_gap"] != pytest.approx(target_gap(images, paired, torch.arange(60)))
    with pytest.raises(ValueError, match="at least 2 distinct targets"):
        target_gap(images, texts[:1], torch.zeros(60, dtype=torch.long))


def test_monitor_health_is_computed_from_the_embeddings_it_scores(clip) -> None:
    from service.data.augment import eval_transform
    from service.data.decode import decode_image

    config, monitor = clip
    model = _model(config)
    metrics = monitor(model, "cpu")
    health = {k: v for k, v in metrics.items() if k.startswith("health_")}
    assert set(health) == {
        "health_alignment", "health_uniformity", "health_effective_rank",
        "health_backbone_effective_rank", "health_text_effective_rank", "health_embedding_std",
        "health_positive_gap",
    }  # fmt: skip
    assert all(math.isfinite(v) for v in health.values())  # a healthy random-init model
    assert health["health_backbone_effective_rank"] > 2 and health["health_text_effective_rank"] > 2
    assert model.training
    # the same recall/zero-shot numbers as without health (one forward, the same embeddings)
    data = monitor.data()
    plain = image_text_metrics(model, monitor.tokenizer, data, config)
    assert {k: v for k, v in metrics.items() if not k.startswith("health_")} == {
        f"val_{k}": v for k, v in plain.items()
    }
    # reference: encode_image / encode_text / embed on the rows, then the health math by hand
    transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
    x = torch.stack([transform(decode_image(b)) for b in data.images])
    ids, distinct = caption_groups(data.captions)
    model.eval()
    with torch.no_grad():
        images, features = model.encode_image(x), model.embed(x)
        texts = model.encode_text(monitor.tokenizer.encode(distinct, config.text.context_length))
    model.train()
    expected = image_text_health(features, images, texts, ids)
    assert health == pytest.approx(expected, rel=1e-4, abs=1e-6)  # batching: float32 rounding


@pytest.mark.parametrize("tower", ["head", "text_head"])
def test_a_collapsed_tower_has_rank_1_and_is_flagged(clip, tower, tmp_path: Path, capsys) -> None:
    config, monitor = clip
    model = _model(config)
    setattr(model, tower, ConstantHead(DIM))
    metrics = {"epoch": 2, **monitor(model, "cpu")}
    rank = "health_effective_rank" if tower == "head" else "health_text_effective_rank"
    assert metrics[rank] == pytest.approx(1.0, abs=1e-5)
    # one point on either side: no image's caption can beat every other caption
    assert metrics["health_positive_gap"] <= 1e-6
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("health")).info.run_id
    with MetricLogger(uri, run_id) as logger:
        line = flag_collapse(metrics, config.model.proj_out_dim, logger)
    what = "" if tower == "head" else "text "
    assert line is not None and f"{what}effective rank 1.00 < 2 (of {DIM} dimensions)" in line
    assert f"[train] {line}" in capsys.readouterr().err
    assert client.get_run(run_id).data.tags["health"] == "collapsed"


def test_collapse_is_judged_in_the_joint_space_and_tune_keeps_its_headline(clip) -> None:
    config, monitor = clip
    model = _model(config)
    x, tokens = torch.zeros(2, 3, 32, 32), monitor.tokenizer.encode(["a cat", "a dog"], 16)
    model.eval()
    with torch.no_grad():  # the loop's flag_collapse dimension is both towers' output
        assert model.encode_image(x).shape[1] == model.encode_text(tokens).shape[1] == DIM
    assert config.model.proj_out_dim == DIM
    metrics = monitor_metrics(config)  # what Tune and the champion may pick: no health_*
    assert next(iter(metrics)) == "val_zeroshot_top1"
    assert not [k for k in metrics if k.startswith("health_")]


def test_the_health_panel_draws_the_caption_rank(tmp_path: Path) -> None:
    from service.tracking.plots import training_curves_figure

    health = {
        "health_effective_rank": 9.0, "health_backbone_effective_rank": 30.0,
        "health_text_effective_rank": 5.0, "health_alignment": 1.5, "health_uniformity": -1.0,
        "health_positive_gap": 0.01, "health_embedding_std": 0.2,
    }  # fmt: skip
    history = [
        {"epoch": e, "global_step": 10 * e, "train_loss": 5.0 - e, "lr": 1e-3,
         "val_zeroshot_top1": 0.1 * (e + 1), "val_i2t_recall_at_5": 0.2, **health}
        for e in range(3)
    ]  # fmt: skip
    fig = training_curves_figure(history)
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("representation health"))
    labels = {line.get_label() for line in panel.get_lines()}
    assert {"effective rank (projection)", "effective rank (captions)"} <= labels
