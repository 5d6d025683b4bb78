"""Run plots rendered for real (matplotlib Agg → PNG files), checked on what a reader would see:
the reference lines and their values, the best-epoch annotation, legend names, epoch numbering."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from service.config import BUNDLED_DATA_DIR, load_config
from service.tracking.plots import (
    baseline_comparison_figure,
    embeddings_figure,
    plot_baseline_comparison,
    plot_embeddings,
    plot_training_curves,
    training_curves_figure,
    user_epochs,
)

TEST_SUBSET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"

# What the loop records: an epoch-0 row (random-init validation kNN, no training loss), then one
# row per completed epoch 1..N. kNN peaks at epoch 2 (0.422), dips, then ties at epoch 4.
RANDOM_INIT_KNN = 0.183
HISTORY = [{"epoch": 0, "global_step": 0, "knn_top1": RANDOM_INIT_KNN}] + [
    {
        "epoch": e,
        "global_step": 40 * e,
        "train_loss": 6.2 - 0.3 * e,
        "lr": 1e-3 / e,
        "temperature": 0.5,
        "images_per_s": 900.0,
        "knn_top1": knn,
    }
    for e, knn in zip(range(1, 5), (0.30, 0.422, 0.41, 0.422), strict=True)
]


def _rendered(fig, path):
    """Save like the plot_* functions do and check real pixels came out."""
    fig.savefig(path)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn, not a blank canvas
    return pixels


def _axis(fig, title_start):
    return next(ax for ax in fig.axes if ax.get_title().startswith(title_start))


def _dashed(ax):
    return [line for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_training_curves_size_and_panels(tmp_path):
    out = plot_training_curves(HISTORY, tmp_path / "plots" / "curves.png", chance_loss=6.24)
    with Image.open(out) as image:
        width, height = image.size
    assert width >= 1400 and height >= 450  # 12 x 4 in at 120 dpi or more
    titles = [ax.get_title() for ax in training_curves_figure(HISTORY).axes if ax.get_title()]
    assert [t.split("\n")[0] for t in titles] == [
        "train loss",
        "kNN top-1 (validation split)",
        "learning rate and temperature",
    ]


def test_loss_panel_has_the_indistinguishable_embeddings_reference(tmp_path):
    """NT-Xent, 2 views, global batch 256: the dashed line sits at log(2*256 - 1)."""
    from service.losses import build_loss
    from service.train.finalize import chance_label

    def chance_loss(config):  # what a worker saves with its checkpoint, and the legend
        criterion = build_loss(config.loss, config.model.proj_out_dim, gather_distributed=False)
        n_views, batch = config.augment.n_views, config.train.global_batch_size
        return criterion.expected_initial_loss(n_views, batch), chance_label(config)

    config = load_config(None, ["train.global_batch_size=256", "augment.n_views=2"])
    value, label = chance_loss(config)
    assert value == pytest.approx(math.log(2 * 256 - 1))
    assert "2 views" in label and "B=256" in label
    fig = training_curves_figure(HISTORY, chance_loss=value, chance_label=label)
    _rendered(fig, tmp_path / "curves.png")
    loss_ax = _axis(fig, "train loss")
    (reference,) = _dashed(loss_ax)
    assert list(reference.get_ydata()) == pytest.approx([math.log(511)] * 2)
    assert [t.get_text() for t in loss_ax.texts] == [f"{label} = {math.log(511):.2f}"]
    assert loss_ax.get_ylim()[1] > math.log(511)  # the line and its label inside the panel
    (curve,) = [line for line in loss_ax.get_lines() if line.get_label() == "train loss"]
    assert list(curve.get_xdata()) == [1, 2, 3, 4]  # no training loss at epoch 0

    # n views: log(nB - 1)
    four = load_config(None, ["train.global_batch_size=64", "augment.n_views=4"])
    assert chance_loss(four)[0] == pytest.approx(math.log(4 * 64 - 1))


def test_knn_panel_starts_at_random_init_and_names_the_best_epoch(tmp_path):
    fig = training_curves_figure(HISTORY)
    _rendered(fig, tmp_path / "curves.png")
    knn_ax = _axis(fig, "kNN top-1")
    # The peak 0.422 is epoch 2 (the 2nd trained epoch; epoch 4 only ties it): not "epoch 1".
    assert knn_ax.get_title().endswith("best 0.422 at epoch 2")
    (curve,) = [line for line in knn_ax.get_lines() if line.get_label() == "kNN top-1"]
    assert list(curve.get_xdata()) == [0, 1, 2, 3, 4]
    assert curve.get_ydata()[0] == pytest.approx(RANDOM_INIT_KNN)
    (random_line,) = _dashed(knn_ax)
    assert list(random_line.get_ydata()) == pytest.approx([RANDOM_INIT_KNN] * 2)
    assert "random init = 0.183" in [t.get_text() for t in knn_ax.get_legend().get_texts()]


def test_history_without_the_epoch0_entry_or_knn(tmp_path):
    """Checkpoints written before the epoch-0 row numbered epochs from 0: shown as 1..N."""
    legacy = [
        {"epoch": e, "train_loss": 6 - e, "lr": 1e-3, "knn_top1": k}
        for e, k in enumerate((0.3, 0.422, 0.4))
    ]
    assert [r["epoch"] for r in user_epochs(legacy)] == [1, 2, 3]
    fig = training_curves_figure(legacy)
    _rendered(fig, tmp_path / "legacy.png")
    knn_ax = _axis(fig, "kNN top-1")
    assert knn_ax.get_title().endswith("best 0.422 at epoch 2")
    assert not _dashed(knn_ax)  # no random-init value recorded, so no line claiming one

    no_val = [{k: v for k, v in r.items() if k != "knn_top1"} for r in HISTORY[1:]]
    fig = training_curves_figure(no_val)
    _rendered(fig, tmp_path / "no_val.png")
    knn_ax = _axis(fig, "kNN top-1")
    assert [t.get_text() for t in knn_ax.texts] == ["no kNN: no validation split"]
    assert plot_training_curves([], tmp_path / "empty.png").exists()


def test_image_text_runs_plot_zero_shot_and_recall(tmp_path):
    keys = ("val_zeroshot_top1", "val_i2t_recall_at_5", "val_t2i_recall_at_5")  # the monitor's
    history = [{"epoch": 0, **dict.fromkeys(keys, 0.1)}] + [
        {
            "epoch": e,
            "train_loss": 5 - e / 2,
            "lr": 1e-3,
            "temperature": 0.07,
            **{k: 0.1 + e / 10 for k in keys},
        }
        for e in (1, 2, 3)
    ]
    fig = training_curves_figure(history, chance_loss=math.log(128))
    _rendered(fig, tmp_path / "image_text.png")
    panel = _axis(fig, "image–text validation")
    labels = {line.get_label(): list(line.get_xdata()) for line in panel.get_lines()}
    assert labels == {
        "zero-shot top-1": [0, 1, 2, 3],
        "image→text recall@5": [0, 1, 2, 3],
        "text→image recall@5": [0, 1, 2, 3],
    }
    assert not [ax for ax in fig.axes if ax.get_title().startswith("kNN")]  # no kNN in this mode


def test_embedding_legend_uses_class_names(tmp_path):
    from service.train.finalize import class_names

    names = class_names(str(TEST_SUBSET), "label_name")
    assert names is not None and names[0] == "airplane" and names[9] == "truck"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=60)
    features = rng.normal(size=(60, 8)) + np.eye(8)[labels] * 4
    fig = embeddings_figure(features, labels, names, method="pca")
    _rendered(fig, tmp_path / "named.png")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["airplane", "automobile", "bird"]

    fig = embeddings_figure(features, labels, None, method="pca")  # data without names
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["0", "1", "2"]
    assert plot_embeddings(features, labels, tmp_path / "e.png", names, method="pca").exists()
    assert class_names(str(TEST_SUBSET), "no_such") is None


def test_baseline_comparison_bars(tmp_path):
    pretrained = {"knn_top1": 0.416, "linear_top1": 0.499, "n_test": 1000}
    random_init = {"knn_top1": 0.321, "linear_top1": 0.452}
    fig = baseline_comparison_figure(pretrained, random_init, split="test")
    _rendered(fig, tmp_path / "bars.png")
    (ax,) = fig.axes
    assert ax.get_title() == "pretrained vs random init (test split)"
    heights = [round(p.get_height(), 3) for p in ax.patches]
    assert heights == [0.416, 0.499, 0.321, 0.452]  # pretrained kNN, linear; then random init
    assert [t.get_text() for t in ax.get_xticklabels()] == ["kNN top-1", "linear top-1"]
    assert {t.get_text() for t in ax.texts} == {"41.6%", "49.9%", "32.1%", "45.2%"}
    with pytest.raises(ValueError, match="linear_top1"):
        plot_baseline_comparison({"knn_top1": 0.4}, random_init, tmp_path / "bad.png")


def test_evaluation_beside_random_init_logs_the_chart_into_the_run(tmp_path):
    """`contrastive evaluate --baseline random --log-to-run`: a real MLflow (SQLite) store gets
    the metrics and plots/pretrained_vs_random.png."""
    from mlflow import MlflowClient

    from service.commands.evaluate import _log_to_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("plots", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    config = load_config(None, [f"mlflow.tracking_uri={uri}"])
    result = {
        "knn_top1": 0.4,
        "linear_top1": 0.5,
        "baseline_random": {"knn_top1": 0.3, "linear_top1": 0.45},
    }
    _log_to_run(result, config, run_id)
    assert client.get_run(run_id).data.metrics["eval_random_knn_top1"] == pytest.approx(0.3)
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == [
        "plots/pretrained_vs_random.png"
    ]
    png = client.download_artifacts(run_id, "plots/pretrained_vs_random.png", str(tmp_path))
    with Image.open(png) as image:
        assert image.size[0] > 500


def test_health_panel_draws_ranks_scores_and_the_collapse_line(tmp_path):
    from service.eval.health import MIN_EFFECTIVE_RANK
    from service.tracking.plots import COLLAPSE_RANK

    assert COLLAPSE_RANK == MIN_EFFECTIVE_RANK  # the figure's line is the warning's threshold
    health = {
        "health_effective_rank": 3.1, "health_backbone_effective_rank": 35.0,
        "health_alignment": 0.01, "health_uniformity": -0.01, "health_positive_gap": -0.001,
        "health_embedding_std": 0.004,
    }  # fmt: skip
    history = [{**row, **health} for row in HISTORY]
    fig = training_curves_figure(history)
    _rendered(fig, tmp_path / "health.png")
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_title()]
    assert titles[2] == "representation health (validation split)"
    panel = _axis(fig, "representation health")
    drawn = {line.get_label(): list(line.get_xdata()) for line in panel.get_lines()}
    assert drawn["effective rank (projection)"] == [0, 1, 2, 3, 4]  # from random init
    assert drawn["effective rank (backbone)"] == [0, 1, 2, 3, 4]
    assert [line.get_ydata()[0] for line in _dashed(panel)] == [COLLAPSE_RANK]
    twin = next(ax for ax in fig.axes if ax is not panel and ax.bbox.bounds == panel.bbox.bounds)
    assert {line.get_label() for line in twin.get_lines()} == {
        "alignment ↓", "uniformity ↓", "positive − hardest negative ↑",
    }  # fmt: skip
    # a history without health metrics (older runs, image–text) has no such panel
    assert not [ax for ax in training_curves_figure(HISTORY).axes if "health" in ax.get_title()]
