"""PNG plots logged with a run: training curves and a 2-D map of the learned embeddings.

Uses matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no global figure state,
no GUI backend, safe in Ray workers and threads.

    >>> history = [{"epoch": 1, "step": 10, "loss": 5.1, "lr": 1e-3, "knn_top1": 0.21}]
    >>> plot_training_curves(history, "/tmp/doc-curves.png").name
    'doc-curves.png'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# (panel title, candidate keys in a history row): the loop may prefix names ("train/loss").
_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "train_loss", "train/loss", "step_loss")),
    ("learning rate", ("lr", "learning_rate", "train/lr")),
    ("kNN top-1", ("knn_top1", "val_knn_top1", "eval/knn_top1", "val/knn_top1")),
)


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _series(history: Sequence[dict[str, Any]], keys: tuple[str, ...]) -> tuple[str, list, list]:
    """(x label, xs, ys) for the first key present; x is the first of step / epoch /
    global_step that every such row has (per-epoch history reads best against epochs)."""
    for key in keys:
        rows = [r for r in history if r.get(key) is not None]
        if not rows:
            continue
        for x_key in ("step", "epoch", "global_step"):
            if all(r.get(x_key) is not None for r in rows):
                return x_key, [r[x_key] for r in rows], [float(r[key]) for r in rows]
        return "record", list(range(len(rows))), [float(r[key]) for r in rows]
    return "", [], []


def plot_training_curves(
    history: Sequence[dict[str, Any]], out_png: str | os.PathLike[str]
) -> Path:
    """Loss, learning rate and kNN top-1 against step (or epoch) side by side; returns the path.

    ``history`` rows are whatever the loop recorded, e.g. ``{"step": 120, "epoch": 2,
    "loss": 4.3, "lr": 3e-4}`` per logging step and ``{"epoch": 2, "knn_top1": 0.41}`` per eval.
    Missing series are shown as an empty panel saying so.
    """
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = _figure(13, 3.6, ncols=len(_PANELS))
    for ax, (title, keys) in zip(axes, _PANELS, strict=True):
        x_label, xs, ys = _series(history, keys)
        ax.set_title(title)
        if not xs:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.5)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if title == "kNN top-1":
            if max(ys) <= 1.0:  # a fraction, not a percentage
                ax.set_ylim(0, 1)
            best = int(np.argmax(ys))
            ax.set_title(f"{title} (best {ys[best]:.3f} at {x_label} {xs[best]})")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.savefig(out)
    return out


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
    label_names: Sequence[str] | dict[int, str] | None = None,
    *,
    method: str = "auto",
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """Scatter a 2-D projection of ``features`` coloured by ``labels``, with a legend.

    ``method``: ``auto`` (t-SNE if scikit-learn is installed, else PCA), ``pca`` or ``tsne``.
    At most ``max_points`` rows (seeded random subset) are drawn to keep t-SNE affordable.
    """
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

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax,) = _figure(7.5, 6)
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
        loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2, frameon=False
    )
    fig.savefig(out)
    return out


def _colormap(n: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"].resampled(max(n, 1))


def _name(cls: Any, label_names: Sequence[str] | dict[int, str] | None) -> str:
    if label_names is None:
        return str(cls)
    if isinstance(label_names, dict):
        return str(label_names.get(cls, cls))
    try:
        return str(label_names[int(cls)])
    except (IndexError, ValueError, TypeError):
        return str(cls)
