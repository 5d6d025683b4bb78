"""The step-0 check (issue 27 item 10): healthy random-init starts pass, broken setups flag.

The real thing: the smoke model at random init, one real augmented batch of the bundled CIFAR
subset, one real training step (``build_state`` + ``train_step``, no Ray), and the loop's own
``_step0_check`` line.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.config import Config, LossConfig, load_config
from service.data.batch_augment import BatchSimCLRAugment
from service.data.decode import decode_image
from service.data.sources import inspect_source
from service.losses import (
    FirstBatch,
    InitialLossReport,
    NTXentLoss,
    SupConLoss,
    build_loss,
)
from service.models import build_model
from service.train import build_state, train_step
from service.train.loop import _step0_check

BATCH = 256  # smoke-cpu's global batch


@cache
def _bundled_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``BATCH`` uint8 images ``[B, 3, 32, 32]`` and their labels from the bundled subset."""
    config = load_config("jobs/configs/smoke-cpu.yaml", [])
    source = inspect_source(config.data.train)
    rows = np.sort(np.random.default_rng(0).choice(source.num_rows, BATCH, replace=False))
    table = source.read(["image", "label"], rows)
    images = [np.array(decode_image(b.as_py())) for b in table.column("image")]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(table.column("label").to_pylist())


def _smoke_config(*overrides: str) -> Config:
    return load_config("jobs/configs/smoke-cpu.yaml", ["train.num_workers=1", *overrides])


@cache
def _embeddings() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projections of two views of the bundled batch by the random-init smoke model (train
    mode, as in the first step), and the batch's labels."""
    config = _smoke_config()
    torch.manual_seed(0)
    model = build_model(config.model)
    images, labels = _bundled_batch()
    views = BatchSimCLRAugment(config.augment, config.data.image_size, seed=0)(images)
    with torch.no_grad():
        z1, z2 = model(torch.cat(views)).chunk(2)
    return z1, z2, labels


def _first_report(name: str, temperature: float) -> InitialLossReport:
    z1, z2, labels = _embeddings()
    crit = build_loss(LossConfig(name=name, temperature=temperature), 128, gather_distributed=False)
    report = crit.initial_loss_report(float(crit(z1, z2, labels=labels)), 2, BATCH)
    assert report is not None
    return report


@pytest.mark.parametrize(
    ("name", "temperature"),
    [
        ("ntxent", 0.2),  # smoke-cpu as shipped
        ("ntxent", 0.08),  # issue 27: flagged although training was healthy
        ("ntxent", 0.05),
        ("supcon", 0.1),  # the README's command: flagged (26% off), training healthy
        ("symmetric", 0.07),
        ("hard_negative", 0.08),
        ("moco", 0.2),
        ("triplet", 0.1),  # no temperature: the margin plus the batch's distance range
    ],
)
def test_healthy_random_init_starts_do_not_flag(name: str, temperature: float) -> None:
    report = _first_report(name, temperature)
    assert report.problem is None and "CHECK THE SETUP" not in report.line(), report.line()


def test_the_readme_supcon_command_does_not_flag_in_the_training_loop(capsys) -> None:
    """The loop's own line after one real step (build_state + train_step, no Ray)."""
    config = _smoke_config("loss.name=supcon", "loss.temperature=0.1")
    torch.manual_seed(0)
    state = build_state(config, torch.device("cpu"), 4, gather_distributed=False)
    images, labels = _bundled_batch()
    views = BatchSimCLRAugment(config.augment, config.data.image_size, seed=0)(images)
    capsys.readouterr()
    loss = train_step(state, views, labels)
    _step0_check(state, loss)
    line = capsys.readouterr().err
    assert f"step 0 loss {loss:.4f}, expected ~log(candidates) = 6.2364" in line, line
    assert "CHECK THE SETUP" not in line, line


def test_a_temperature_far_too_small_for_the_initial_spread_flags() -> None:
    report = _first_report("ntxent", 0.002)  # 100x too small
    assert report.problem is not None and "loss.temperature=0.002" in report.problem, report


class _Unnormalised(NTXentLoss):
    """A broken NT-Xent: forgets to L2-normalise (the smoke projections have norm ~4)."""

    def compute(self, views):
        z = torch.cat(views)
        logits = (z @ z.T / self.temperature).fill_diagonal_(float("-inf"))
        b = views[0].shape[0]
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
        return F.cross_entropy(logits, target)


class _TemperatureTwice(NTXentLoss):
    """A broken NT-Xent: divides by the temperature once more (5x too large at T=0.2)."""

    def compute(self, views):
        return super().compute(views) / self.temperature


@pytest.mark.parametrize("broken", [_Unnormalised, _TemperatureTwice])
def test_a_loss_above_what_the_first_batch_allows_flags(broken) -> None:
    z1, z2, _ = _embeddings()
    healthy = NTXentLoss(0.2, gather_distributed=False)
    report = healthy.initial_loss_report(float(healthy(z1, z2)), 2, BATCH)
    assert report is not None and report.problem is None, report
    crit = broken(0.2, gather_distributed=False)
    report = crit.initial_loss_report(float(crit(z1, z2)), 2, BATCH)
    assert report is not None and report.problem is not None, report
    assert "above" in report.problem and "CHECK THE SETUP" in report.line()


def test_identical_embeddings_flag_as_collapsed() -> None:
    z = torch.randn(1, 128).expand(BATCH, 128)
    crit = SupConLoss(0.1, gather_distributed=False)
    loss = float(crit(z, z, labels=torch.arange(BATCH) % 10))
    report = crit.initial_loss_report(loss, 2, BATCH)
    assert report is not None and "collapsed" in str(report.problem), report


def test_first_batch_spread_is_the_log_mean_exp_of_centred_similarities() -> None:
    """Two samples, two views: each anchor's negatives are the two views of the other sample."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    first = FirstBatch.of((a, b), paired=False)
    # anchor a0: negatives a1 (cos 0), b1 (cos 0.6); a1: a0 (0), b0 (0); b0: a1 (0), b1 (0.6);
    # b1: a0 (0.6), b0 (0.6)
    expected = [[0.0, 0.6], [0.0, 0.0], [0.0, 0.6], [0.6, 0.6]]
    torch.testing.assert_close(first.negatives, torch.tensor(expected))
    spread = (2 * math.log((1 + math.exp(0.6 / 0.5)) / 2 / math.exp(0.3 / 0.5))) / 4
    assert first.spread(0.5) == pytest.approx(spread, rel=1e-5)
    paired = FirstBatch.of((a, b), paired=True)  # a_i against b_j, j != i
    torch.testing.assert_close(paired.negatives, torch.tensor([[0.6], [0.0]]))


def test_the_reference_without_a_batch_stays_log_candidates() -> None:
    """The loss curve's reference line (saved with checkpoints) is still log(candidates)."""
    crit = NTXentLoss(0.1, gather_distributed=False)
    assert crit.expected_initial_loss(2, BATCH) == pytest.approx(math.log(2 * BATCH - 1))
    assert crit.initial_loss_report(5.0, 2, BATCH) is not None  # no batch seen: the formula
