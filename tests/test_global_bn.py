"""Global BatchNorm (``model.sync_batchnorm``) on real gloo process groups.

Contract:

* ``GlobalBatchNorm`` on W ranks (even with unequal row counts) equals ``nn.BatchNorm`` on the
  concatenated batch: outputs, input gradients, the sum of the ranks' weight/bias gradients (DDP
  averages them; the loss of the concatenated batch is the sum of the ranks' losses), running
  statistics on every rank, eval outputs. With one process it is ``nn.BatchNorm``.
* One real ``train_step`` of W workers x b, shipped small CNN + BN projection head, NT-Xent over the
  global batch, DDP on gloo, equals one process x W*b: loss, every gradient and the running
  statistics, for W = 2 and 3. With global BN off they differ: the batch statistics (and so the
  running statistics, until DDP re-broadcasts rank 0's at the next forward) are per rank.
* Cached-gradient steps (``train.micro_batch_size = m``): micro-batch k is normalised by the
  statistics of the k-th micro-batches of *all* ranks together. Equivalently: one process with
  micro-batches of W*m on the global batch reordered so that its k-th micro-batch holds exactly the
  ranks' k-th micro-batches (NT-Xent does not depend on the order of the samples).

float64 for the contracts (the maths, not float32 rounding: agreement ~1e-14), plus the equal-step
check once in float32 to 1e-5 of the largest gradient.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from service.config import Config, LossConfig, ModelConfig, TrainConfig
from service.losses import MoCoLoss
from service.models import (
    GlobalBatchNorm,
    build_model,
    convert_to_global_bn,
    convert_to_local_bn,
    maybe_convert_sync_batchnorm,
    unwrap,
)
from service.train import build_state, train_step
from tests._dist_utils import run_in_gloo_group

pytestmark = pytest.mark.distributed

DTYPE = torch.float64
GLOBAL_BATCH, IMAGE, MICRO = 12, 16, 2  # 12 = 2 x 6 = 3 x 4 samples (x 2 views)
BN_SHAPES = {"1d": (5,), "2d": (4, 3, 3)}  # per-row shapes: BatchNorm1d / BatchNorm2d inputs
STEP_SCENARIOS = {
    "on": {"sync": True, "micro": None},
    "off": {"sync": False, "micro": None},
    "gradcache_on": {"sync": True, "micro": MICRO},
    "on_float32": {"sync": True, "micro": None, "dtype": torch.float32},  # as CPU training runs
}


# --- GlobalBatchNorm itself ------------------------------------------------------------------


def _rows(rank: int) -> int:
    return 2 + rank  # unequal on purpose: the counts are all-reduced too


def _bn_inputs(kind: str, world: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(7)
    n = sum(_rows(r) for r in range(world))
    shape = (n, *BN_SHAPES[kind])
    return {
        name: torch.randn(shape, generator=g, dtype=DTYPE) * scale + shift
        for name, scale, shift in (("x1", 2.0, 3.0), ("x2", 0.5, -1.0), ("x3", 1.0, 0.0))
    } | {f"g{i}": torch.randn(shape, generator=g, dtype=DTYPE) for i in (1, 2)}


def _bn_layer(kind: str, cls: type[nn.Module], momentum: float | None) -> nn.Module:
    layer = cls(BN_SHAPES[kind][0], momentum=momentum).to(DTYPE)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g, dtype=DTYPE) + 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=DTYPE))
    return layer


def run_bn(layer: nn.Module, data: dict[str, Tensor], rows: slice) -> dict[str, Any]:
    """Two training passes (forward + backward of sum(g * y)), then eval on x3, on ``rows``."""
    out: dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": []}
    for x_name, g_name in (("x1", "g1"), ("x2", "g2")):
        layer.zero_grad()
        x = data[x_name][rows].clone().requires_grad_()
        y = layer(x)
        (y * data[g_name][rows]).sum().backward()
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        out["dw"].append(layer.weight.grad.clone())
        out["db"].append(layer.bias.grad.clone())
    out["buffers"] = {k: v.clone() for k, v in layer.named_buffers()}
    with torch.no_grad():
        out["eval"] = layer.eval()(data["x3"][rows])
    return out


def _bn_cases() -> list[tuple[str, float | None]]:
    return [(kind, momentum) for kind in BN_SHAPES for momentum in (0.1, None)]


def _bn_rank(rank: int, world: int) -> dict[str, Any]:
    start = sum(_rows(r) for r in range(rank))
    rows = slice(start, start + _rows(rank))
    return {
        (kind, m): run_bn(_bn_layer(kind, GlobalBatchNorm, m), _bn_inputs(kind, world), rows)
        for kind, m in _bn_cases()
    }


# --- one train_step ----------------------------------------------------------------------------


def step_config(sync: bool, world: int, micro: int | None) -> Config:
    """The smoke model (small CNN + 2-layer BN head) and loss, float64-friendly settings."""
    return Config(
        model=ModelConfig(
            arch="small_cnn", proj_hidden_dim=256, proj_out_dim=128, sync_batchnorm=sync
        ),
        loss=LossConfig(name="ntxent", temperature=0.2),
        train=TrainConfig(
            global_batch_size=GLOBAL_BATCH, num_workers=world, optimizer="adamw", lr=1e-3,
            grad_clip_norm=None, amp="off", micro_batch_size=micro,
        ),
    )  # fmt: skip


def global_views(dtype: torch.dtype = DTYPE) -> Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, GLOBAL_BATCH, 3, IMAGE, IMAGE, generator=g, dtype=DTYPE).to(dtype)


def run_step(config: Config, views: Tensor, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """One ``train_step`` on ``views`` ([2, b, ...]); loss, gradients and BN buffers after it."""
    torch.manual_seed(0)  # same init everywhere (DDP also broadcasts rank 0's weights)

    def wrap(model: nn.Module) -> nn.Module:
        model = model.to(views.dtype)
        return DistributedDataParallel(model) if world > 1 else model

    s = build_state(config, torch.device("cpu"), 1, rank=rank, world=world, wrap=wrap)
    loss = train_step(s, list(views))
    model = unwrap(s.model)
    return {
        "loss": loss,
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers() if "running" in n},
        "n_global_bn": sum(isinstance(m, GlobalBatchNorm) for m in model.modules()),
    }


def _step_rank(rank: int, world: int) -> dict[str, Any]:
    b = GLOBAL_BATCH // world
    return {
        name: run_step(
            step_config(spec["sync"], world, spec["micro"]),
            global_views(spec.get("dtype", DTYPE))[:, rank * b : (rank + 1) * b],
            rank,
            world,
        )
        for name, spec in STEP_SCENARIOS.items()
    }


def _rank_main(rank: int, world: int) -> dict[str, Any]:
    return {"bn": _bn_rank(rank, world), "step": _step_rank(rank, world)}


_CACHE: dict[int, list[dict[str, Any]]] = {}


def results_for(world: int) -> list[dict[str, Any]]:
    """Per-rank results; every world size is spawned once for all the tests below."""
    if world not in _CACHE:
        _CACHE[world] = run_in_gloo_group(_rank_main, world)
    return _CACHE[world]


def reference_step(name: str, world: int) -> dict[str, Any]:
    """One process on the global batch; for the cached step, the batch reordered so that its
    micro-batch k (of W*m samples) is the ranks' k-th micro-batches together."""
    spec = STEP_SCENARIOS[name]
    views = global_views(spec.get("dtype", DTYPE))
    micro = spec["micro"]
    if micro is not None:
        b = GLOBAL_BATCH // world
        order = [
            r * b + k + j for k in range(0, b, micro) for r in range(world) for j in range(micro)
        ]
        views, micro = views[:, order], micro * world
    return run_step(step_config(spec["sync"], 1, micro), views)


def relative_grad_error(got: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """Largest gradient difference relative to the largest gradient."""
    scale = max(float(g.abs().max()) for g in expected.values())
    return max(float((got[n] - expected[n]).abs().max()) for n in expected) / scale


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _bn_cases(), ids=lambda c: f"{c[0]}-momentum{c[1]}")
@pytest.mark.parametrize("world", [2, 3])
def test_global_bn_equals_batchnorm_on_the_concatenated_batch(world: int, case: tuple) -> None:
    kind, momentum = case
    cls = nn.BatchNorm1d if kind == "1d" else nn.BatchNorm2d
    expected = run_bn(_bn_layer(kind, cls, momentum), _bn_inputs(kind, world), slice(None))
    per_rank = [r["bn"][case] for r in results_for(world)]
    start = 0
    for r, got in enumerate(per_rank):
        rows = slice(start, start + _rows(r))
        start += _rows(r)
        for key in ("y", "dx"):
            for g, e in zip(got[key], expected[key], strict=True):
                torch.testing.assert_close(g, e[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["eval"], expected["eval"][rows], rtol=1e-10, atol=1e-12)
        for name, value in expected["buffers"].items():  # the same running stats on every rank
            torch.testing.assert_close(got["buffers"][name], value, rtol=1e-10, atol=1e-12)
    for key in ("dw", "db"):  # local sums; summed over ranks = the concatenated batch's
        for step, e in enumerate(expected[key]):
            total = torch.stack([got[key][step] for got in per_rank]).sum(0)
            torch.testing.assert_close(total, e, rtol=1e-10, atol=1e-12)


def test_global_bn_without_a_process_group_is_batchnorm() -> None:
    for kind, momentum in _bn_cases():
        cls = nn.BatchNorm1d if kind == "1d" else nn.BatchNorm2d
        data = _bn_inputs(kind, 1)
        got = run_bn(_bn_layer(kind, GlobalBatchNorm, momentum), data, slice(None))
        expected = run_bn(_bn_layer(kind, cls, momentum), data, slice(None))
        for key in ("y", "dx", "dw", "db"):
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
        torch.testing.assert_close(got["buffers"], expected["buffers"], rtol=0, atol=0)


@pytest.mark.parametrize("world", [2, 3])
def test_train_step_of_w_workers_equals_one_process_with_global_bn(world: int) -> None:
    expected = reference_step("on", world)
    per_rank = [r["step"]["on"] for r in results_for(world)]
    assert per_rank[0]["n_global_bn"] == 5  # 4 in the small CNN, 1 in the projection head
    for got in per_rank:  # the loss is the mean over ranks; DDP gives every rank the average
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)  # reported in fp32
        assert relative_grad_error(got["grads"], expected["grads"]) < 1e-9
        torch.testing.assert_close(got["buffers"], expected["buffers"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("world", [2, 3])
def test_train_step_equality_holds_in_float32_to_1e_5(world: int) -> None:
    """The dtype CPU training runs in: rounding only (measured ~2e-6 of the largest gradient)."""
    expected = reference_step("on_float32", world)
    for got in (r["step"]["on_float32"] for r in results_for(world)):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert relative_grad_error(got["grads"], expected["grads"]) < 1e-5


@pytest.mark.parametrize("world", [2, 3])
def test_without_global_bn_the_batch_statistics_are_per_rank(world: int) -> None:
    expected = reference_step("off", world)
    per_rank = [r["step"]["off"] for r in results_for(world)]
    assert per_rank[0]["n_global_bn"] == 0
    # each rank normalises by its own b samples: not the step of one process on W*b
    assert relative_grad_error(per_rank[0]["grads"], expected["grads"]) > 1e-2
    assert abs(per_rank[0]["loss"] - expected["loss"]) > 1e-4
    # ... and each rank's running statistics are its own (DDP re-broadcasts rank 0's at the next
    # forward); the gradients are still averaged, so every rank holds the same ones
    mean = "backbone.features.1.running_mean"
    assert not torch.allclose(per_rank[0]["buffers"][mean], per_rank[1]["buffers"][mean])
    torch.testing.assert_close(per_rank[0]["grads"], per_rank[-1]["grads"])


@pytest.mark.parametrize("world", [2, 3])
def test_cached_step_normalises_each_micro_batch_over_all_ranks(world: int) -> None:
    expected = reference_step("gradcache_on", world)
    plain = reference_step("on", world)
    for got in (r["step"]["gradcache_on"] for r in results_for(world)):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)  # reported in fp32
        assert relative_grad_error(got["grads"], expected["grads"]) < 1e-9
        torch.testing.assert_close(got["buffers"], expected["buffers"], rtol=1e-9, atol=1e-12)
    # micro-batch statistics are not the whole global batch's: not the plain step
    assert relative_grad_error(expected["grads"], plain["grads"]) > 1e-3


def test_conversion_keeps_weights_and_buffers_and_is_reversible() -> None:
    model = build_model(ModelConfig(arch="small_cnn", proj_hidden_dim=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_global_bn(model)
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert sum(isinstance(m, GlobalBatchNorm) for m in converted.modules()) == len(kinds) == 5
    assert converted.state_dict().keys() == before.keys()
    torch.testing.assert_close(converted.state_dict(), before)
    local = convert_to_local_bn(converted)
    assert [type(m) for m in local.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [
        nn.BatchNorm2d
    ] * 4 + [nn.BatchNorm1d]
    torch.testing.assert_close(local.state_dict(), before)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(converted.eval()(x), local.eval()(x))


def test_sync_batchnorm_config_builds_global_bn_on_cpu() -> None:
    assert ModelConfig().sync_batchnorm is True  # the default (bench/global_bn.py: its cost)
    config = step_config(True, 1, None)
    state = build_state(config, torch.device("cpu"), 1)
    assert sum(isinstance(m, GlobalBatchNorm) for m in state.model.modules()) == 5
    assert maybe_convert_sync_batchnorm(nn.BatchNorm1d(3), enabled=False).__class__ is (
        nn.BatchNorm1d
    )


def test_moco_key_encoder_keeps_per_rank_batchnorm_for_shuffle_bn() -> None:
    model = convert_to_global_bn(build_model(ModelConfig(arch="small_cnn", proj_hidden_dim=64)))
    loss = MoCoLoss(temperature=0.2, queue_size=16, dim=128)
    loss.attach(model)
    target = loss.key_encoder.target
    assert not any(isinstance(m, GlobalBatchNorm) for m in target.modules())
    assert target.state_dict().keys() == model.state_dict().keys()  # the EMA still matches
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    loss.forward_views(model, views).backward()
    loss.after_step(model)
