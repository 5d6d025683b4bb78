"""PNG plots logged with a run: training curves, a 2-D map of the learned embeddings, and the
pretrained-vs-random-init comparison.

Uses matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no global figure state,
no GUI backend, safe in Ray workers and threads. Each ``plot_*`` writes a PNG and returns its path;
the ``*_figure`` builders return the :class:`~matplotlib.figure.Figure` (for tests and notebooks).

Epochs are user-facing (``docs/architecture.md``): 1..N count completed epochs and epoch 0 is the
random-init evaluation before training.

    >>> history = [{"epoch": 0, "knn_top1": 0.18},
    ...            {"epoch": 1, "train_loss": 5.1, "lr": 1e-3, "knn_top1": 0.31}]
    >>> plot_training_curves(history, "/tmp/doc-curves.png", chance_loss=5.54).name
    'doc-curves.png'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_LOSS_KEYS = ("train_loss", "loss", "step_loss", "train/loss")
_LR_KEYS = ("lr", "learning_rate", "train/lr")
_TEMPERATURE_KEYS = ("temperature",)
_KNN_KEYS = ("knn_top1", "val_knn_top1", "eval/knn_top1", "val/knn_top1")
# Image-text validation monitor (service.eval.image_text): (history keys, legend label). MLflow
# rejects '@' in metric names, so the monitor says "recall_at_5"; "@5" is accepted too.
_IMAGE_TEXT_SERIES = (
    (("val_zeroshot_top1",), "zero-shot top-1"),
    (("val_i2t_recall_at_5", "val_i2t_recall@5"), "image→text recall@5"),
    (("val_t2i_recall_at_5", "val_t2i_recall@5"), "text→image recall@5"),
)
# Representation health (service.eval.health, the validation monitor): effective ranks on the
# left axis, the O(1) scores on the right; (history key, legend label).
_HEALTH_RANKS = (
    ("health_effective_rank", "effective rank (projection)"),
    ("health_backbone_effective_rank", "effective rank (backbone)"),
    ("health_text_effective_rank", "effective rank (captions)"),  # image–text runs only
)
_HEALTH_SCORES = (  # (key, label, colour)
    ("health_alignment", "alignment ↓", "tab:red"),
    ("health_uniformity", "uniformity ↓", "tab:purple"),
    ("health_positive_gap", "positive − hardest negative ↑", "tab:green"),
)
COLLAPSE_RANK = 2.0  # = service.eval.health.MIN_EFFECTIVE_RANK (tracking does not import eval)
_DPI = 120
_REFERENCE_STYLE = {"linestyle": "--", "color": "0.45", "linewidth": 1.2}


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig: Any, out_png: str | os.PathLike[str]) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _first(row: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    return next((float(row[k]) for k in keys if row.get(k) is not None), None)


def user_epochs(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows that have an ``epoch``, renumbered to user-facing epochs if needed.

    Histories written before the epoch-0 (random-init) entry existed numbered training epochs
    from 0: a row with a training loss at epoch 0 marks one, and its epochs are shifted by one.

    >>> [r["epoch"] for r in user_epochs([{"epoch": 0, "train_loss": 5.0}, {"epoch": 1}])]
    [1, 2]
    >>> [r["epoch"] for r in user_epochs([{"epoch": 0, "knn_top1": 0.1}, {"epoch": 1}])]
    [0, 1]
    """
    rows = [dict(r) for r in history if r.get("epoch") is not None]
    zero_based = any(r["epoch"] == 0 and _first(r, _LOSS_KEYS) is not None for r in rows)
    for r in rows:
        r["epoch"] = int(r["epoch"]) + int(zero_based)
    return rows


def _series(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], *, with_init: bool
) -> tuple[list[int], list[float]]:
    """(epochs, values) of the first of ``keys`` each row has; epoch 0 only ``with_init``."""
    picked = [
        (r["epoch"], v)
        for r in rows
        if (with_init or r["epoch"] >= 1) and (v := _first(r, keys)) is not None
    ]
    return [e for e, _ in picked], [v for _, v in picked]


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _epoch_axis(ax: Any, last_epoch: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(-0.3, max(last_epoch, 1) + 0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = random init)")
    ax.grid(alpha=0.3)


def _marker(n: int) -> str | None:
    return "o" if n <= 40 else None


def _loss_panel(
    ax: Any, rows: Sequence[Mapping[str, Any]], chance_loss: float | None, chance_label: str
) -> None:
    xs, ys = _series(rows, _LOSS_KEYS, with_init=False)
    ax.set_title("train loss")
    if not xs:
        _no_data(ax, "no training loss recorded")
        return
    ax.plot(xs, ys, marker=_marker(len(xs)), markersize=4, linewidth=1.8, label="train loss")
    if chance_loss is not None:
        ax.axhline(chance_loss, **_REFERENCE_STYLE, label=f"{chance_label} = {chance_loss:.2f}")
        # Labelled on the line (a legend box would sit on the curve); headroom keeps it inside.
        low, high = min(min(ys), chance_loss), max(max(ys), chance_loss)
        pad = 0.08 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + 2 * pad)
        ax.annotate(
            f"{chance_label} = {chance_loss:.2f}",
            xy=(0.02, chance_loss),
            xycoords=("axes fraction", "data"),
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=8,
            color="0.3",
        )


def _knn_panel(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    xs, ys = _series(rows, _KNN_KEYS, with_init=True)
    ax.set_title("kNN top-1 (validation split)")
    if not xs:
        _no_data(ax, "no kNN: no validation split")
        return
    ax.plot(xs, ys, marker=_marker(len(xs)), markersize=4, linewidth=1.8, label="kNN top-1")
    if xs[0] == 0:
        ax.axhline(ys[0], **_REFERENCE_STYLE, label=f"random init = {ys[0]:.3f}")
    trained = [(y, x) for x, y in zip(xs, ys, strict=True) if x >= 1]
    if trained:
        # max() keeps the first of equal values: the earliest epoch that reached the best.
        best_y, best_x = max(trained, key=lambda t: t[0])
        ax.set_title(f"kNN top-1 (validation split)\nbest {best_y:.3f} at epoch {best_x}")
        ax.plot([best_x], [best_y], marker="*", markersize=12, color="tab:orange", zorder=3)
    if max(ys) <= 1.0:  # a fraction, not a percentage
        ax.set_ylim(0, min(1.0, max(ys) * 1.25 + 0.02))
    ax.legend(fontsize=8, loc="lower right")


def _image_text_panel(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    ax.set_title("image–text validation")
    for keys, label in _IMAGE_TEXT_SERIES:
        xs, ys = _series(rows, keys, with_init=True)
        if xs:
            ax.plot(xs, ys, marker=_marker(len(xs)), markersize=4, linewidth=1.8, label=label)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")


def _schedule_panel(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Learning rate (left axis) and temperature (right axis): per-epoch (end-of-epoch) values."""
    lr_x, lr_y = _series(rows, _LR_KEYS, with_init=False)
    t_x, t_y = _series(rows, _TEMPERATURE_KEYS, with_init=False)
    ax.set_title("learning rate and temperature")
    if not lr_x and not t_x:
        _no_data(ax, "no schedule recorded")
        return
    handles = []
    if lr_x:
        handles += ax.plot(lr_x, lr_y, marker=_marker(len(lr_x)), markersize=4, label="lr")
        ax.set_ylabel("learning rate")
        ax.yaxis.set_major_formatter(lambda value, _: f"{value:.3g}")  # no detached offset text
    if t_x:
        twin = ax.twinx()
        handles += twin.plot(
            t_x, t_y, marker=_marker(len(t_x)), markersize=4, color="tab:red", label="temperature"
        )
        twin.set_ylabel("temperature")
        twin.set_ylim(0, max(t_y) * 1.25)  # from 0: a constant temperature is a flat line
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8)


def _health_panel(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Effective ranks (left axis, log scale, the collapse line) and alignment, uniformity and
    the positive gap (right axis), from the random-init epoch 0."""
    ax.set_title("representation health (validation split)")
    handles = []
    for key, label in _HEALTH_RANKS:
        xs, ys = _series(rows, (key,), with_init=True)
        if xs:
            handles += ax.plot(xs, ys, marker=_marker(len(xs)), markersize=4, label=label)
    handles.append(ax.axhline(COLLAPSE_RANK, **_REFERENCE_STYLE, label="collapsed below"))
    ax.set_yscale("log")
    ax.set_ylabel("effective rank")
    twin = ax.twinx()
    for key, label, color in _HEALTH_SCORES:
        xs, ys = _series(rows, (key,), with_init=True)
        if xs:
            handles += twin.plot(
                xs, ys, marker=_marker(len(xs)), markersize=3, linestyle=":", color=color,
                label=label,
            )  # fmt: skip
    twin.set_ylabel("alignment, uniformity, gap")
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=7)


def training_curves_figure(
    history: Sequence[Mapping[str, Any]],
    *,
    chance_loss: float | None = None,
    chance_label: str = "indistinguishable embeddings",
) -> Any:
    """The training-curves :class:`~matplotlib.figure.Figure` (see :func:`plot_training_curves`)."""
    rows = user_epochs(history)
    image_text_keys = [k for keys, _ in _IMAGE_TEXT_SERIES for k in keys]
    image_text = any(_first(r, image_text_keys) is not None for r in rows)
    with_knn = not image_text or any(_first(r, _KNN_KEYS) is not None for r in rows)
    panels: list[Any] = [lambda ax: _loss_panel(ax, rows, chance_loss, chance_label)]
    if with_knn:
        panels.append(lambda ax: _knn_panel(ax, rows))
    if image_text:
        panels.append(lambda ax: _image_text_panel(ax, rows))
    if any(_first(r, [k for k, _ in _HEALTH_RANKS]) is not None for r in rows):
        panels.append(lambda ax: _health_panel(ax, rows))
    panels.append(lambda ax: _schedule_panel(ax, rows))
    fig, axes = _figure(4.0 * len(panels), 4.0, ncols=len(panels))
    last_epoch = max((r["epoch"] for r in rows), default=1)
    for ax, draw in zip(axes, panels, strict=True):
        _epoch_axis(ax, last_epoch)
        draw(ax)
    return fig


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    out_png: str | os.PathLike[str],
    *,
    chance_loss: float | None = None,
    chance_label: str = "indistinguishable embeddings",
) -> Path:
    """Per-epoch curves side by side; returns the PNG path.

    ``history`` is the loop's per-epoch rows (``state["history"]``): ``{"epoch": 2,
    "train_loss": 4.3, "lr": 3e-4, "temperature": 0.5, "knn_top1": 0.41}``, with an epoch-0 row
    of random-init validation metrics when the run had a validation split. Panels: train loss
    (with ``chance_loss``, the loss of indistinguishable embeddings, e.g. log(2B−1) for NT-Xent,
    as a dashed line), kNN top-1 from its random-init value (dashed) with the best trained epoch,
    image–text zero-shot/recall@5 when logged, representation health (``health_*``: effective
    ranks, alignment, uniformity, positive gap) when logged, learning rate and temperature.
    Missing series show as a panel saying so.
    """
    return _save(
        training_curves_figure(history, chance_loss=chance_loss, chance_label=chance_label),
        out_png,
    )


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[n, d] → [n, 2] after L2 normalisation (contrastive features live on the sphere).

    ``pca``: top-2 principal components (SVD, deterministic). ``tsne``: scikit-learn t-SNE on
    the top-50 PCs (scikit-learn must be installed).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [n >= 2, d], got shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    pcs = u * s  # principal-component scores, descending variance
    if method == "pca":
        out = pcs[:, :2]
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))  # d == 1 edge case
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(pcs[:, :50])
    raise ValueError(f"projection method must be 'pca' or 'tsne', got {method!r}")


def _default_method() -> str:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return "pca"
    return "tsne"


def plot_embeddings(
    features: np.ndarray,
    labels: np.ndarray,
    out_png: str | os.PathLike[str],
    label_names: Sequence[str] | Mapping[int, str] | None = None,
    *,
    method: str = "auto",
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """Scatter a 2-D projection of ``features`` coloured by ``labels``, with a legend that names
    each class by ``label_names`` (a list indexed by label, or a ``{label: name}`` mapping such as
    the data's ``label_name`` column gives) or by its integer label when there are none.

    ``method``: ``auto`` (t-SNE if scikit-learn is installed, else PCA), ``pca`` or ``tsne``.
    At most ``max_points`` rows (seeded random subset) are drawn to keep t-SNE affordable.
    """
    fig = embeddings_figure(
        features, labels, label_names, method=method, max_points=max_points, seed=seed
    )
    return _save(fig, out_png)


def embeddings_figure(
    features: np.ndarray,
    labels: np.ndarray,
    label_names: Sequence[str] | Mapping[int, str] | None = None,
    *,
    method: str = "auto",
    max_points: int = 5000,
    seed: int = 0,
) -> Any:
    """The :func:`plot_embeddings` :class:`~matplotlib.figure.Figure`."""
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features has {features.shape[0]} rows but labels has {labels.shape[0]}; "
            "they must match"
        )
    if features.shape[0] > max_points:
        keep = np.random.default_rng(seed).choice(features.shape[0], max_points, replace=False)
        features, labels = features[keep], labels[keep]
    method = _default_method() if method == "auto" else method
    xy = project_2d(features, method=method, seed=seed)

    fig, (ax,) = _figure(8, 6)
    classes = np.unique(labels)
    cmap = _colormap(len(classes))
    for i, cls in enumerate(classes):
        mask = labels == cls
        name = _name(cls, label_names)
        ax.scatter(xy[mask, 0], xy[mask, 1], s=9, alpha=0.75, color=cmap(i), label=name)
    ax.set_title(f"embeddings ({method.upper()}, n={len(labels)}, {features.shape[1]}-d)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(
        loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9, markerscale=2, frameon=False
    )
    return fig


def _colormap(n: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"].resampled(max(n, 1))


def _name(cls: Any, label_names: Sequence[str] | Mapping[int, str] | None) -> str:
    if label_names is None:
        return str(cls)
    if isinstance(label_names, Mapping):
        return str(label_names.get(int(cls), cls))
    try:
        return str(label_names[int(cls)])
    except (IndexError, ValueError, TypeError):
        return str(cls)


def plot_baseline_comparison(
    pretrained: Mapping[str, float],
    random_init: Mapping[str, float],
    out_png: str | os.PathLike[str],
    *,
    split: str = "test",
) -> Path:
    """Grouped bars: kNN and linear-probe top-1 of the pretrained encoder beside the same
    architecture at random init, evaluated on ``split``; returns the PNG path.

    ``pretrained`` / ``random_init`` hold ``knn_top1`` and ``linear_top1`` (fractions), as in
    ``service.eval.offline.evaluate_beside_random``'s result and its ``baseline_random``.

    >>> plot_baseline_comparison({"knn_top1": 0.42, "linear_top1": 0.5},
    ...     {"knn_top1": 0.32, "linear_top1": 0.45}, "/tmp/doc-bars.png").name
    'doc-bars.png'
    """
    return _save(baseline_comparison_figure(pretrained, random_init, split=split), out_png)


_PROBES = (("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1"))


def baseline_comparison_figure(
    pretrained: Mapping[str, float], random_init: Mapping[str, float], *, split: str = "test"
) -> Any:
    """The :func:`plot_baseline_comparison` :class:`~matplotlib.figure.Figure`."""
    missing = [k for k, _ in _PROBES for d in (pretrained, random_init) if k not in d]
    if missing:
        raise ValueError(f"baseline comparison needs knn_top1 and linear_top1; missing {missing}")
    fig, (ax,) = _figure(5.5, 3.8)
    x = np.arange(len(_PROBES))
    width = 0.38
    for offset, (label, values, color) in zip(
        (-width / 2, width / 2),
        (("pretrained", pretrained, "tab:blue"), ("random init", random_init, "0.6")),
        strict=True,
    ):
        heights = [float(values[k]) for k, _ in _PROBES]
        bars = ax.bar(x + offset, heights, width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{h:.1%}" for h in heights], padding=2, fontsize=9)
    ax.set_xticks(x, [name for _, name in _PROBES])
    top = max(float(d[k]) for k, _ in _PROBES for d in (pretrained, random_init))
    ax.set_ylim(0, min(1.0, top * 1.2 + 0.05))
    ax.yaxis.set_major_formatter("{x:.0%}")
    ax.set_title(f"pretrained vs random init ({split} split)")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return fig
