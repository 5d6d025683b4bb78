"""Representation health (issue 24 item 3) and the data stall per step (item 4).

Each metric of ``service.eval.health`` against a straightforward numpy-loop reference and on
constructed cases; a forced collapse (constant projection head) through the real monitor code
sees the warning and the MLflow tag (a real SQLite store); the data wait is timed, shown on the
epoch line, and its max taken over a real 2-rank gloo group.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from service.config import Config, load_config
from service.eval.health import (
    MIN_EFFECTIVE_RANK,
    MIN_STD_FRACTION,
    alignment,
    collapse_reason,
    dimension_std,
    effective_rank,
    positive_gap,
    representation_health,
    uniformity,
)
from service.models import unwrap
from service.tracking.logger import MetricLogger
from service.train import KnnMonitor, build_state
from service.train.epoch import HEALTH_PAIRS, EpochMeter, epoch_summary, flag_collapse
from tests._dist_utils import run_in_gloo_group

SMOKE = "jobs/configs/smoke-cpu.yaml"


def _unit(x: np.ndarray) -> np.ndarray:
    return np.array([row / math.sqrt(sum(v * v for v in row)) for row in x])


def _ref_effective_rank(x: np.ndarray) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = [v / s.sum() for v in s if v > 0]
    return math.exp(-sum(q * math.log(q) for q in p))


def _ref_alignment(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _unit(a), _unit(b)
    return sum(sum((a[i] - b[i]) ** 2) for i in range(len(a))) / len(a)


def _ref_uniformity(z: np.ndarray) -> float:
    z = _unit(z)
    terms = [
        math.exp(-2 * sum((z[i] - z[j]) ** 2)) for i in range(len(z)) for j in range(i + 1, len(z))
    ]
    return math.log(sum(terms) / len(terms))


def _ref_std(z: np.ndarray) -> float:
    z = _unit(z)
    stds = []
    for k in range(z.shape[1]):
        mean = sum(z[:, k]) / len(z)
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in z[:, k]) / len(z)))
    return sum(stds) / len(stds)


def _ref_gap(a: np.ndarray, b: np.ndarray) -> float:
    z = _unit(np.concatenate([a, b]))
    n, gaps = len(a), []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        negatives = [float(z[i] @ z[j]) for j in range(2 * n) if j not in (i, partner)]
        gaps.append(float(z[i] @ z[partner]) - max(negatives))
    return sum(gaps) / len(gaps)


@pytest.mark.parametrize("shape", [(40, 8), (16, 24), (64, 3)])
def test_each_metric_matches_its_reference(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)  # noisy positives
    an, bn = a.numpy(), b.numpy()
    assert effective_rank(a) == pytest.approx(_ref_effective_rank(an), rel=1e-9)
    assert alignment(a, b) == pytest.approx(_ref_alignment(an, bn), rel=1e-9)
    assert uniformity(a) == pytest.approx(_ref_uniformity(an), rel=1e-9)
    assert dimension_std(a) == pytest.approx(_ref_std(an), rel=1e-9)
    assert positive_gap(a, b) == pytest.approx(_ref_gap(an, bn), rel=1e-9)
    metrics = representation_health(b, a, a, b)
    assert metrics["health_backbone_effective_rank"] == pytest.approx(_ref_effective_rank(bn))
    assert metrics["health_effective_rank"] == pytest.approx(_ref_effective_rank(an))


def test_collapsed_embeddings() -> None:
    """Every row the same direction (any scale): rank 1, no spread, views equal, no gap."""
    z = torch.tensor([1.0, -2.0, 0.5, 3.0]).repeat(300, 1) * torch.rand(300, 1).add(0.5)
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-5)  # float32 rounding
    assert dimension_std(z) == pytest.approx(0.0, abs=1e-6)
    assert uniformity(z) == pytest.approx(0.0, abs=1e-6)
    assert alignment(z[:150], z[150:]) == pytest.approx(0.0, abs=1e-6)
    assert positive_gap(z[:150], z[150:]) == pytest.approx(0.0, abs=1e-6)
    assert effective_rank(torch.zeros(5, 3)) == 0.0


def test_isotropic_gaussian_uses_every_dimension() -> None:
    d = 16
    z = torch.randn(8192, d, generator=torch.Generator().manual_seed(0))
    assert d - 0.2 < effective_rank(z) <= d
    assert dimension_std(z) * math.sqrt(d) == pytest.approx(1.0, abs=0.02)  # 1/sqrt(d)
    # uniform on S^15: E exp(-2||x-y||^2) = E exp(-4 + 4cos); far below a collapsed 0
    assert uniformity(z) < -2.5
    assert collapse_reason(representation_health(z, z, z, z), d) is None


def test_thresholds_follow_the_math() -> None:
    """Rank below 2, or a tenth of the uniform sphere's per-dimension std, is collapse."""
    healthy = {"health_effective_rank": 2.0, "health_embedding_std": MIN_STD_FRACTION / 8}
    assert MIN_EFFECTIVE_RANK == 2.0 and collapse_reason(healthy, 64) is None
    assert "effective rank 1.99 < 2" in collapse_reason({"health_effective_rank": 1.99}, 64)
    low_std = {"health_embedding_std": 0.99 * MIN_STD_FRACTION / 8}
    assert "per-dimension std" in collapse_reason(low_std, 64)
    assert collapse_reason({"knn_top1": 0.3}, 64) is None  # no health metrics: no verdict


class ConstantHead(nn.Module):
    """A projection head that has collapsed: the same vector for every input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.linspace(-1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(len(x), -1) + 0 * x[:, :1]


@pytest.fixture(scope="module")
def smoke_monitor() -> tuple[Config, KnnMonitor, nn.Module]:
    config = load_config(SMOKE)
    s = build_state(config, torch.device("cpu"), steps_per_epoch=4, gather_distributed=False)
    return config, KnnMonitor(config), unwrap(s.model)


def _val_features(monitor: KnnMonitor, model: nn.Module) -> torch.Tensor:
    from service.eval.features import extract_features

    d = monitor.config.data
    features, _ = extract_features(
        model.backbone, d.train, monitor.transform, indices=monitor.val_rows
    )
    return features


def test_monitor_health_uses_a_fixed_sample_and_fixed_views(smoke_monitor) -> None:
    config, monitor, model = smoke_monitor
    features = _val_features(monitor, model)
    first = monitor.health(model, features, torch.device("cpu"))
    assert len(monitor.pairs.images) == HEALTH_PAIRS
    assert set(monitor.pairs.rows) <= set(monitor.val_rows)  # never a training row
    assert first == monitor.health(model, features, torch.device("cpu"))  # same views each time
    assert model.training  # the monitor gives the model back in training mode
    assert monitor.health(model, features[:1], torch.device("cpu")) == {}  # nothing to compare
    assert first["health_backbone_effective_rank"] > MIN_EFFECTIVE_RANK


def test_constant_projection_head_warns_and_tags_the_run(smoke_monitor, tmp_path: Path, capsys):
    config, monitor, model = smoke_monitor
    d = config.model.proj_out_dim
    collapsed = type(model)(model.backbone, ConstantHead(d))
    metrics = {"epoch": 3, **monitor.health(collapsed, _val_features(monitor, model), "cpu")}
    assert metrics["health_effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["health_embedding_std"] < 1e-6
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("health")).info.run_id
    with MetricLogger(uri, run_id) as logger:
        line = flag_collapse(metrics, d, logger)
        assert flag_collapse({**metrics, "epoch": 0}, d, logger) is None  # random init: not judged
    assert line is not None and line.startswith("WARNING: the representation collapsed (epoch 3)")
    assert f"[train] {line}" in capsys.readouterr().err
    tags = client.get_run(run_id).data.tags
    assert tags["health"] == "collapsed"
    assert tags["health_reason"].startswith("epoch 3: effective rank 1.00 < 2")


def test_healthy_metrics_neither_warn_nor_tag(tmp_path: Path, capsys) -> None:
    z = torch.randn(1024, 32, generator=torch.Generator().manual_seed(1))
    metrics = {"epoch": 1, **representation_health(z, z, z, z + 0.1 * z)}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("health")).info.run_id
    with MetricLogger(uri, run_id) as logger:
        assert flag_collapse(metrics, 32, logger) is None
    assert "WARNING" not in capsys.readouterr().err
    assert "health" not in client.get_run(run_id).data.tags


def _slow_batches(n: int, delay: float):
    for i in range(n):
        time.sleep(delay)
        yield i


def test_data_wait_is_the_time_spent_in_next() -> None:
    meter = EpochMeter()
    for _ in meter.timed(_slow_batches(3, 0.05)):
        time.sleep(0.05)  # the step: not waiting for data
    meter.finish()
    assert 0.15 <= meter.data_wait_s < 0.25
    assert 0.4 < meter.data_wait_fraction() < 0.6
    s = build_state(Config(), torch.device("cpu"), steps_per_epoch=3, gather_distributed=False)
    row = meter.epoch_metrics(s)
    assert row["data_wait_s"] == row["data_wait_max_s"] == meter.data_wait_s  # one rank
    assert row["data_wait_fraction"] == row["data_wait_max_fraction"]
    line = epoch_summary(row, 4)
    assert line.startswith("epoch 1/4 done (step 0): train_loss 0, lr ")
    assert line.endswith("%)") and "; data wait 0.1" in line and "slowest rank 0.1" in line
    assert "data_wait" not in line and "health" not in line


def _rank_wait(rank: int, world: int) -> tuple[float, float]:
    from service.train.loop import _slowest_data_wait

    meter = EpochMeter()
    meter.data_wait_s = [0.5, 2.0][rank]
    meter.finish()
    _slowest_data_wait(SimpleNamespace(world=world, device=torch.device("cpu")), meter)
    return meter.data_wait_max


def test_slowest_rank_wait_is_one_all_reduce_over_the_group() -> None:
    results = run_in_gloo_group(_rank_wait, 2)
    assert [r[0] for r in results] == [2.0, 2.0]  # every rank learns the slowest rank's wait
    assert results[0][1] == results[1][1] > 0


class SlowBatches:
    """Three batches of two views, each ``delay`` seconds late (a starved loader)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def epoch(self, e: int):
        g = torch.Generator().manual_seed(e)
        for _ in range(3):
            time.sleep(self.delay)
            yield [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)], None


def test_run_epoch_times_the_wait_for_each_batch(tmp_path: Path) -> None:
    from service.train.loop import run_epoch

    s = build_state(Config(), torch.device("cpu"), steps_per_epoch=3, gather_distributed=False)
    meter = run_epoch(s, SlowBatches(0.1), None, None, tmp_path)
    assert meter.steps == 3 and s.global_step == 3
    assert 0.3 <= meter.data_wait_s < 0.3 + 0.5  # the three waits, not the steps
    assert meter.data_wait_max == (meter.data_wait_s, meter.data_wait_fraction())
    assert 0 < meter.data_wait_fraction() < 1
