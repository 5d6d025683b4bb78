"""After pretraining, on the driver: plots, augmentation preview and test-split embeddings into
the MLflow run, then registration of the backbone with the alias rules.

The run's lifecycle (open, FINISHED/FAILED) belongs to the caller (``service.tracking.run``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from service.config import Config
from service.tracking.run import TrackedRun


def _progress(message: str) -> None:
    print(f"[finalize] {message}", file=sys.stderr, flush=True)


def finalize_run(
    config: Config,
    tracking: TrackedRun | None,
    checkpoint_dir: str | None,
    workdir: Path,
    tokenizer_json: str | None = None,
) -> dict[str, Any]:
    """Log plots of the final encoder and register it (image–text mode: both towers and the
    run's tokenizer, ``tokenizer_json``). Returns summary additions."""
    if tracking is None or checkpoint_dir is None:
        return {}
    from service.train.checkpoint import load_state, load_training_model_from_checkpoint

    logger = tracking.logger()
    state = load_state(checkpoint_dir)
    history = state["history"]
    model, _ = load_training_model_from_checkpoint(checkpoint_dir)
    _log_plots(config, logger, model.backbone, history, workdir, state.get("chance_loss"))
    summary: dict[str, Any] = {"run_id": tracking.run_id, "tracking_uri": tracking.uri}
    if config.mlflow.registered_model_name:
        summary.update(_register(config, tracking, model, history, tokenizer_json))
    # Flushed after registration: that call waits out a tracking-server outage with MLflow's
    # own retries, so buffered plots/metrics get their best chance to land here.
    report = logger.flush()
    if not getattr(report, "ok", True):
        _progress(f"some MLflow records could not be logged: {report}")
    return summary


def _log_plots(
    config: Config, logger: Any, backbone: Any, history: list, workdir: Path, chance: float | None
) -> None:
    """Training curves, the augmentation preview and the test split's embedding plot."""
    from service.data.augment import eval_transform
    from service.data.preview import save_augmentation_preview
    from service.eval.features import extract_features
    from service.tracking.plots import plot_embeddings, plot_training_curves

    _progress("plotting training curves and augmentation preview")
    curves = plot_training_curves(
        history, workdir / "training_curves.png", chance_loss=chance,
        chance_label=chance_label(config),
    )  # fmt: skip
    logger.log_artifact(curves, "plots")
    preview = save_augmentation_preview(
        config.data.train, workdir / "augmentation_preview.png", config.augment,
        config.data.image_size,
    )  # fmt: skip
    logger.log_artifact(preview, "plots")
    if config.data.test:
        _progress(f"embedding the test split {config.data.test}")
        transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
        features, labels = extract_features(backbone, config.data.test, transform)
        names = class_names(config.data.test, config.text.class_name_column)
        embedded = plot_embeddings(
            features.numpy(), labels.numpy(), workdir / "test_embeddings.png", names
        )
        logger.log_artifact(embedded, "plots")


def _register(
    config: Config, tracking: TrackedRun, model: Any, history: list, tokenizer_json: str | None
) -> dict[str, Any]:
    """Register the backbone (the champion rule on the configured metric)."""
    from service.registry.register import register_encoder

    _progress(f"registering the backbone as {config.mlflow.registered_model_name!r}")
    knn = next((h["knn_top1"] for h in reversed(history) if "knn_top1" in h), None)
    metric_name, metric_value = champion_metric(config, history)
    registered = register_encoder(
        model.backbone,
        config,
        tracking_uri=tracking.uri,
        run_id=tracking.run_id,
        knn=knn,
        metric_name=metric_name,
        metric_value=metric_value,
        higher_is_better=not metric_name.endswith("loss"),
        **_text_tower(config, model, tokenizer_json),
    )
    verdict = "champion" if registered["champion"] else "not champion"
    _progress(f"{registered['model_uri']}: {verdict}: {registered['decision']}")
    summary = {k: registered[k] for k in ("model_uri", "version", "champion")}
    return {**summary, "champion_decision": registered["decision"]}


def _text_tower(config: Config, model: Any, tokenizer_json: str | None) -> dict[str, Any]:
    """``register_encoder``'s image–text arguments: the whole two-tower model and the tokenizer
    it trained with. A Tune trial does not hand one over; fitting is deterministic (the same
    training captions give the same tokenizer), so it is fitted again here."""
    if not config.text.column:
        return {}
    from service.text import Tokenizer, fit_tokenizer

    tokenizer = Tokenizer.from_json(tokenizer_json) if tokenizer_json else fit_tokenizer(config)
    return {"image_text": model, "tokenizer": tokenizer}


def champion_metric(config: Config, history: list[dict[str, Any]]) -> tuple[str, float]:
    """The value of ``mlflow.champion_metric`` (latest epoch that has it) that the champion
    alias compares; a metric the run never logged is an error, never a relabelled other one."""
    name = config.mlflow.champion_metric
    value = next((h[name] for h in reversed(history) if name in h), None)
    if value is None:
        logged = sorted({k for h in history for k in h})
        raise ValueError(
            f"mlflow.champion_metric={name!r} was never logged by this run (it logged {logged}); "
            f"choose one of those, e.g. knn_top1 (needs a validation split) or train_loss"
        )
    return name, float(value)


def chance_label(config: Config) -> str:
    """The legend of the loss curve's reference line: the loss of indistinguishable embeddings
    (NT-Xent: log(nB−1)), whose value the workers save with each checkpoint (``chance_loss``:
    the driver does not build the loss again).

    >>> from service.config import Config
    >>> chance_label(Config())
    'indistinguishable embeddings (2 views, B=128)'
    """
    n_views, batch = config.augment.n_views, config.train.global_batch_size
    if config.text.column:  # image-text: one image and one caption per row, not augmented views
        return f"indistinguishable embeddings (B={batch})"
    return f"indistinguishable embeddings ({n_views} views, B={batch})"


def class_names(path: str, column: str) -> dict[int, str] | None:
    """``{label: name}`` from the data's ``label`` and ``column`` (e.g. ``label_name``) columns;
    None when the data has no such column (plots then show the integer labels).

    >>> class_names("service/data/bundled/cifar10-test-subset.parquet", "label_name")[3]
    'cat'
    """
    from service.data.parquet import LABEL_COLUMN
    from service.data.sources import inspect_source

    source = inspect_source(path)
    if column not in source.columns or LABEL_COLUMN not in source.columns:
        return None
    table = source.read([LABEL_COLUMN, column]).group_by([LABEL_COLUMN, column]).aggregate([])
    labels, names = table.column(LABEL_COLUMN).to_pylist(), table.column(column).to_pylist()
    return {int(k): str(v) for k, v in zip(labels, names, strict=True) if v is not None}
