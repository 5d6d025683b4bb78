"""Per-step and end-of-epoch bookkeeping: throughput, progress lines, the validation monitor,
report + checkpoint.

Epochs shown to people and recorded in the history count completed epochs from 1 (``epoch`` 1..N);
epoch 0 is the random-init monitor row. ``TrainState.epoch`` stays 0-based (the current epoch).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from service.config import Config
from service.console import say
from service.train.checkpoint import save_state, training_state_dict
from service.train.state import TrainState


class EpochMeter:
    """Loss and images/s of one epoch, and of the window since the last step log line."""

    def __init__(self) -> None:
        self.start = self.window_start = time.perf_counter()
        self.loss_sum, self.steps, self.images, self.window_images = 0.0, 0, 0, 0
        self.end: float | None = None  # when the epoch's last step ended (``finish``)
        self.data_wait_s = 0.0  # this rank's time waiting for its next batch (``timed``)
        self.data_wait_max: tuple[float, float] | None = None  # (s, fraction): max over ranks

    def update(self, loss: float, images: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.images += images
        self.window_images += images

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """``batches``, adding the time each ``next()`` takes (loading, decoding, augmenting:
        everything before the step can start) to ``data_wait_s``."""
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.data_wait_s += time.perf_counter() - start
            yield item

    def finish(self) -> None:
        """The epoch's steps are over (the monitor and checkpoint that follow are not its)."""
        self.end = time.perf_counter()

    def elapsed_s(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    def data_wait_fraction(self) -> float:
        """This rank's share of the epoch's time spent waiting for data."""
        return self.data_wait_s / max(self.elapsed_s(), 1e-9)

    def window_rate(self) -> float:
        """Images/s since the previous call (or the epoch start); starts a new window."""
        now = time.perf_counter()
        rate = self.window_images / max(now - self.window_start, 1e-9)
        self.window_start, self.window_images = now, 0
        return rate

    def epoch_metrics(self, s: TrainState) -> dict[str, Any]:
        """The history row of the epoch that just ended (``epoch``: 1-based, completed);
        ``data_wait_*``: rank 0's, ``data_wait_max_*``: the slowest rank's (``data_wait_max``)."""
        wait_max = self.data_wait_max or (self.data_wait_s, self.data_wait_fraction())
        return {
            "epoch": s.epoch + 1,
            "global_step": s.global_step,
            "train_loss": self.loss_sum / max(1, self.steps),
            "lr": s.scheduler.get_last_lr()[0],
            "temperature": float(s.criterion.temperature),
            "images_per_s": self.images / max(self.elapsed_s(), 1e-9),
            "train_minutes": s.clock.elapsed_s / 60,  # rank 0's training clock (Tune's ASHA axis)
            "data_wait_s": self.data_wait_s,
            "data_wait_fraction": self.data_wait_fraction(),
            "data_wait_max_s": wait_max[0],
            "data_wait_max_fraction": wait_max[1],
        }


def _clock_text(seconds: float | None) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour); ``?`` when unknown."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepProgress:
    """The loop's progress line (rank 0), at most one every ``interval`` seconds, e.g.
    ``epoch 2/4 step 30/39 loss 5.12 412 img/s ETA epoch 0:12 run 1:40``.

    Workers are never TTYs, so these are plain lines. The run ETA is the budget left with
    ``train.time_budget_minutes``, else the remaining steps at this epoch's pace (training only).

        >>> ticks = iter([0.0, 12.0])
        >>> p = StepProgress(epochs=4, steps_per_epoch=40, clock=lambda: next(ticks))
        >>> p.start_epoch(1)
        >>> p.update(epoch_step=20, loss=5.123, images=2560)
        'epoch 2/4 step 20/40 loss 5.12 213 img/s ETA epoch 0:12 run 1:00'
    """

    def __init__(
        self,
        epochs: int,
        steps_per_epoch: int,
        *,
        budgeted: bool = False,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.epochs, self.steps_per_epoch, self.budgeted = epochs, steps_per_epoch, budgeted
        self.interval, self.clock = interval, clock
        self.epoch = 0
        self._epoch_start = self._last = 0.0
        self._loss_sum, self._steps, self._images = 0.0, 0, 0

    def start_epoch(self, epoch: int) -> None:
        """``epoch``: the 0-based epoch starting now (``TrainState.epoch``)."""
        self.epoch = epoch
        self._epoch_start = self._last = self.clock()
        self._loss_sum, self._steps, self._images = 0.0, 0, 0

    def update(
        self,
        epoch_step: int,
        loss: float,
        images: int,
        budget_left_s: float | None = None,
        steps_left: int | None = None,
    ) -> str | None:
        """Count one step; the line to print when ``interval`` has passed, else None.
        ``loss`` shown: the mean since the previous line; img/s: over the same window.
        ``steps_left``: to ``train.max_steps`` (the run's ETA counts no more steps than that)."""
        self._loss_sum, self._steps, self._images = (
            self._loss_sum + loss, self._steps + 1, self._images + images
        )  # fmt: skip
        now = self.clock()
        if now - self._last < self.interval:
            return None
        rate = self._images / max(now - self._last, 1e-9)
        per_step = (now - self._epoch_start) / max(1, epoch_step)
        left_in_epoch = max(0, self.steps_per_epoch - epoch_step)
        if self.budgeted:
            run_left = budget_left_s
            of = ""
        else:
            steps = left_in_epoch + (self.epochs - self.epoch - 1) * self.steps_per_epoch
            run_left = per_step * (steps if steps_left is None else min(steps, steps_left))
            of = f"/{self.epochs}"
        line = (
            f"epoch {self.epoch + 1}{of} step {epoch_step}/{self.steps_per_epoch} "
            f"loss {self._loss_sum / self._steps:.2f} {rate:.0f} img/s "
            f"ETA epoch {_clock_text(per_step * left_in_epoch)} run {_clock_text(run_left)}"
        )
        self._last, self._loss_sum, self._steps, self._images = now, 0.0, 0, 0
        return line


# Not on the epoch line: tags, the budget note's minutes, and what data_wait_text shows.
_NOT_SHOWN = ("epoch", "global_step", "num_nodes", "train_minutes")


def _shown(key: str) -> bool:
    # health_*: MLflow and the curves figure (a collapse gets its own warning line)
    return key not in _NOT_SHOWN and not key.startswith(("data_wait", "health_"))


def data_wait_text(metrics: dict[str, Any]) -> str | None:
    """The epoch line's data stall: rank 0's wait for batches and the slowest rank's.

    >>> data_wait_text({"data_wait_s": 1.234, "data_wait_fraction": 0.031,
    ...                 "data_wait_max_s": 2.5, "data_wait_max_fraction": 0.062})
    'data wait 1.23 s (3.1%; slowest rank 2.5 s, 6.2%)'
    """
    if "data_wait_s" not in metrics:
        return None
    return (
        f"data wait {metrics['data_wait_s']:.3g} s ({metrics['data_wait_fraction']:.1%}; "
        f"slowest rank {metrics['data_wait_max_s']:.3g} s, {metrics['data_wait_max_fraction']:.1%})"
    )


def epoch_summary(metrics: dict[str, Any], epochs: int | None) -> str:
    """The end-of-epoch line: 1-based epoch and rounded metrics, then the data wait.

    >>> epoch_summary({"epoch": 2, "global_step": 78, "train_loss": 5.01234, "knn_top1": 0.41}, 4)
    'epoch 2/4 done (step 78): train_loss 5.012, knn_top1 0.41'
    """
    shown = [
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in metrics.items()
        if _shown(k)
    ]
    wait = data_wait_text(metrics)
    of = f"/{epochs}" if epochs else ""
    line = f"epoch {metrics['epoch']}{of} done (step {metrics['global_step']}): {', '.join(shown)}"
    return f"{line}; {wait}" if wait else line


def budget_note(elapsed_s: float, budget_s: float) -> str:
    """Training time against the budget (both in seconds, as the ``TrainClock`` has them), for
    the end-of-epoch line.

    >>> budget_note(95.4, 25 * 60)
    '[training 1:35 of 25:00]'
    """
    return f"[training {_clock_text(elapsed_s)} of {_clock_text(budget_s)}]"


class Monitor(Protocol):
    """A per-epoch validation monitor (rank 0). ``due(epoch)``: whether to evaluate after the
    1-based epoch ``epoch`` has completed (the last epoch is always evaluated by the loop);
    ``__call__(model, device)``: metrics of the *unwrapped* training model."""

    def due(self, epoch: int) -> bool: ...

    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...


def monitor_due(config: Config, epoch: int) -> bool:
    """Every ``eval.knn_every_epochs`` completed epochs (1-based ``epoch``) and the last one."""
    return epoch >= config.train.epochs or epoch % config.eval.knn_every_epochs == 0


def build_monitor(config: Config, tokenizer_json: str | None = None) -> Monitor | None:
    """The validation monitor of ``config``: None without a validation split; image–text
    retrieval/zero-shot when ``text.column`` is set (with the run's tokenizer); else kNN top-1
    on the backbone."""
    if not config.data.has_val:
        return None
    if config.text.column:
        from service.eval.image_text import ImageTextMonitor
        from service.text import Tokenizer

        tokenizer = Tokenizer.from_json(tokenizer_json) if tokenizer_json else None
        return ImageTextMonitor(config, tokenizer)
    return KnnMonitor(config)


# What every epoch's report has whatever the monitor (EpochMeter), and the better direction.
EPOCH_METRICS = {"train_loss": "min", "images_per_s": "max"}


def monitor_metrics(config: Config) -> dict[str, str]:
    """The metrics ``build_monitor(config)``'s monitor reports, each with its better direction
    (``max``/``min``), its headline metric first; empty without a validation split. What Tune
    may optimise, with :data:`EPOCH_METRICS`.

        >>> monitor_metrics(Config())
        {'knn_top1': 'max'}
    """
    if not config.data.has_val:
        return {}
    if config.text.column:
        from service.eval.image_text import monitor_metric_names

        return dict.fromkeys(monitor_metric_names(config), "max")
    return {"knn_top1": "max"}


def monitor_decode_once(config: Config, bank_rows: np.ndarray, val_rows: np.ndarray | None) -> bool:
    """Whether the kNN monitor keeps its rows decoded (uint8): when they fit the memory
    available now (``decode_once_plan``, the training rows' rule); otherwise one line says so
    and each epoch decodes them again."""
    from service.data.decoded import decode_once_plan
    from service.data.sources import inspect_source

    d = config.data
    n_val = len(val_rows) if val_rows is not None else inspect_source(d.val).num_rows
    plan = decode_once_plan(len(bank_rows) + n_val, d.image_size)
    if not plan.decode_once:
        say("train", f"kNN monitor: decoding its rows every epoch ({plan.reason()})")
    return plan.decode_once


class KnnMonitor:
    """Online kNN top-1 on the validation split (rank 0); memory bank = training rows.

    The validation split is ``data.val`` or the rows held out from ``data.train``
    (``service.data.splits``); neither is ever trained on, and the test split is not used here.
    Both sets of rows are decoded once, at the first call, and kept as uint8 (each epoch then
    costs the forward only) when they fit (``monitor_decode_once``; ``decode_once`` forces it
    either way); otherwise each call decodes them again.
    """

    def __init__(self, config: Config, decode_once: bool | None = None):
        from service.data.splits import train_val_rows
        from service.eval.features import EvalRows

        self.config = config
        d, a = config.data, config.augment
        rows = train_val_rows(config)
        self.bank_rows = rows.train_rows(config.eval.knn_max_train)
        self.val_rows = rows.val if not d.val else None
        if decode_once is None:
            decode_once = monitor_decode_once(config, self.bank_rows, self.val_rows)
        self.bank, self.val = (
            EvalRows(path, ids, d.image_size, a.mean, a.std, decode_once=decode_once,
                     label=f"kNN monitor: {name}")
            for path, ids, name in ((d.train, self.bank_rows, "bank"),
                                    (d.val or d.train, self.val_rows, "validation"))
        )  # fmt: skip
        self.transform = self.val.transform
        self.pairs: HealthPairs | None = None  # decoded at the first call

    def due(self, epoch: int) -> bool:
        return monitor_due(self.config, epoch)

    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """``{"knn_top1": x}`` of ``model.backbone`` (``model``: the unwrapped training model)."""
        from service.eval.knn import knn_top1

        e = self.config.eval
        bank, bank_labels = self.bank.features(model.backbone, device)
        val, val_labels = self.val.features(model.backbone, device)
        top1 = knn_top1(bank, bank_labels, val, val_labels, e.knn_k, e.knn_temperature)
        return {"knn_top1": top1, **self.health(model, val, device)}

    def health(
        self, model: nn.Module, features: torch.Tensor, device: torch.device
    ) -> dict[str, float]:
        """``health_*`` metrics (``service.eval.health``) of the validation ``features`` already
        extracted for kNN (projected by ``model.head``) and of :class:`HealthPairs`' views;
        none for a split of fewer than 2 images (no pairs to compare)."""
        from service.eval.health import representation_health

        if self.pairs is None:
            d = self.config.data
            self.pairs = HealthPairs(self.config, d.val or d.train, self.val_rows)
        if min(len(features), len(self.pairs.images)) < 2:
            return {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                projections = _in_chunks(model.head, features, device)
            view1, view2 = self.pairs.projections(model, device)
        finally:
            model.train(was_training)
        return representation_health(features, projections, view1, view2)


# Validation images whose two augmented views give alignment and the positive gap: a fixed
# sample (seeded), the same views every epoch (seeded augmentation), so epochs compare.
HEALTH_PAIRS = 256
HEALTH_SEED = 0


def _in_chunks(f: Callable, x: torch.Tensor, device: torch.device, rows: int = 256) -> torch.Tensor:
    """``f`` over ``x`` ``rows`` at a time on ``device``; float32 on the CPU."""
    return torch.cat([f(chunk.to(device)).float().cpu() for chunk in x.split(rows)])


class HealthPairs:
    """:data:`HEALTH_PAIRS` validation images (of ``path``'s rows ``rows``, all when None),
    decoded once; ``projections`` embeds two views of each, drawn by the batched augmentation
    with :data:`HEALTH_SEED` (the same views every call)."""

    def __init__(self, config: Config, path: str, rows: np.ndarray | None) -> None:
        from service.data.decoded import decode_rows
        from service.data.sources import inspect_source

        ids = rows if rows is not None else np.arange(inspect_source(path).num_rows)
        rng = np.random.default_rng(HEALTH_SEED)
        pick = np.sort(rng.choice(len(ids), min(HEALTH_PAIRS, len(ids)), replace=False))
        self.config = config
        self.rows = np.asarray(ids)[pick]  # global row ids of ``path``
        # The kNN pass enforces data.max_bad_fraction on the whole split; a sample's share of
        # bad images can exceed it by chance, and health must not stop a run.
        self.images = decode_rows(path, self.rows, config.data.image_size, max_bad_fraction=1.0)

    @torch.no_grad()
    def projections(self, model: nn.Module, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Projections ``[n, d]`` of view 1 and of view 2 (row ``i``: image ``i``)."""
        from service.data.batch_augment import BatchSimCLRAugment

        c = self.config
        augment = BatchSimCLRAugment(c.augment, c.data.image_size, n_views=2, seed=HEALTH_SEED)
        views = augment(self.images.images, self.images.sizes)
        return tuple(_in_chunks(model, view, device) for view in views)


def flag_collapse(metrics: dict[str, Any], dim: int, logger: Any = None) -> str | None:
    """Rank 0, after the monitor of a trained epoch: when ``metrics`` say the ``dim``-d
    projections collapsed (``service.eval.health.collapse_reason``), print a warning line and
    tag the MLflow run (``health=collapsed``, ``health_reason``); returns the line, None when
    healthy. Epoch 0 is not judged: a randomly initialised network maps every image near one
    direction (the smoke model: per-dimension std 0.004, a tenth of a trained epoch's)."""
    from service.eval.health import collapse_reason

    reason = None if metrics.get("epoch") == 0 else collapse_reason(metrics, dim)
    if reason is None:
        return None
    epoch = metrics.get("epoch")
    line = f"WARNING: the representation collapsed (epoch {epoch}): {reason}"
    say("train", line)
    if logger is not None:
        logger.set_tags({"health": "collapsed", "health_reason": f"epoch {epoch}: {reason}"})
    return line


def report_epoch(s: TrainState, metrics: dict[str, Any], final: bool = False) -> None:
    """``ray.train.report`` the epoch, with a checkpoint when due (rank 0 writes it).

    Final metrics always go with a checkpoint: Train V2 keeps ``Result.metrics`` only then
    (``final``: the run stops after this epoch, e.g. its time budget is spent mid-epoch).
    """
    import ray.train

    t = s.config.train
    save = final or s.epoch == t.epochs - 1 or (s.epoch + 1) % t.checkpoint_every_epochs == 0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if save and s.rank == 0:
            save_state(tmp, training_state_dict(s))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
