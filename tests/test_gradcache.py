"""Cached-gradient steps (``service.train.gradcache``) are exact, on real gloo process groups.

Contract: with a model without batch statistics, ``cached_forward_backward`` gives every rank the
same local loss and (after DDP's average) the same parameter gradients — and the same loss
gradients / MoCo queue — as the plain one-shot step ``criterion.forward_views(ddp_model, views)``
on the same global batch, for W in {1, 2, 3}, micro-batches that do and do not divide the local
batch, two and three views. With BatchNorm (and with dropout) it equals a reference that forwards
each micro-batch with a graph (same RNG stream) and backpropagates the full-batch loss once;
BatchNorm running statistics are updated once per micro-batch.

Each world size is spawned once; every rank runs every scenario and the tests compare results.
"""

from __future__ import annotations

import copy
import zlib
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from service.config import Config, LossConfig, ModelConfig, TrainConfig
from service.losses import ContrastiveLoss, NTXentLoss, build_loss
from service.train import (
    build_state,
    gradcache,
    restore_training_state,
    train_step,
    training_state_dict,
)
from service.train.amp import amp_policy
from service.train.gradcache import (
    GradCacheError,
    cached_forward_backward,
    gradcache_problems,
    uses_gradcache,
)
from service.train.state import TrainState
from tests._dist_utils import run_in_gloo_group

IN_DIM, HIDDEN, EMB_DIM = 6, 7, 5
DTYPE = torch.float64  # exactness of the maths, not of float32 rounding

# b: local batch, m: micro-batch size, model: ln (LayerNorm, no batch statistics) | bn | dropout
SCENARIOS: dict[str, dict[str, Any]] = {
    "ntxent_2v_divides": {"loss": "ntxent", "views": 2, "b": 6, "m": 2},
    "ntxent_2v_ragged": {"loss": "ntxent", "views": 2, "b": 5, "m": 2},
    "ntxent_3v_ragged": {"loss": "ntxent", "views": 3, "b": 5, "m": 3},
    "ntxent_3v_m1_chunk": {"loss": "ntxent", "views": 3, "b": 4, "m": 1, "chunk": 5},
    "symmetric_learnable": {"loss": "symmetric", "views": 2, "b": 5, "m": 2, "learnable": True},
    "moco": {"loss": "moco", "views": 2, "b": 5, "m": 2},
    "hard_negative_3v": {"loss": "hard_negative", "views": 3, "b": 4, "m": 3, "top_k": 4},
    "debiased": {"loss": "debiased", "views": 2, "b": 4, "m": 3},
    "bn_2v_ragged": {"loss": "ntxent", "views": 2, "b": 5, "m": 2, "model": "bn"},
    "bn_3v_divides": {"loss": "ntxent", "views": 3, "b": 4, "m": 2, "model": "bn"},
    "dropout_2v": {"loss": "ntxent", "views": 2, "b": 5, "m": 2, "model": "dropout"},
}
PLAIN_EXACT = [n for n, s in SCENARIOS.items() if s.get("model", "ln") == "ln"]
WITH_REFERENCE = [n for n, s in SCENARIOS.items() if s.get("model", "ln") != "ln"]


def _model(kind: str) -> nn.Module:
    torch.manual_seed(1234)
    middle = {
        "ln": nn.LayerNorm(HIDDEN),
        "bn": nn.BatchNorm1d(HIDDEN),
        "dropout": nn.Dropout(0.4),
    }[kind]
    return nn.Sequential(nn.Linear(IN_DIM, HIDDEN), middle, nn.GELU(), nn.Linear(HIDDEN, EMB_DIM))


def _criterion(spec: dict[str, Any]) -> ContrastiveLoss:
    cfg = LossConfig(
        name=spec["loss"], temperature=0.3, chunk_size=spec.get("chunk"),
        learnable_temperature=spec.get("learnable", False), top_k=spec.get("top_k", 64),
        moco_queue_size=7, moco_momentum=0.9,
    )  # fmt: skip
    return build_loss(cfg, EMB_DIM)


def _local_views(name: str, rank: int, world: int) -> list[Tensor]:
    spec = SCENARIOS[name]
    b = spec["b"]
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{world}".encode()))
    views = [torch.randn(world * b, IN_DIM, generator=g, dtype=DTYPE) for _ in range(spec["views"])]
    return [v[rank * b : (rank + 1) * b] for v in views]


def _state(model: nn.Module, criterion: ContrastiveLoss, m: int) -> TrainState:
    """What ``cached_forward_backward`` reads; no optimizer needed."""
    config = Config(train=TrainConfig(micro_batch_size=m))
    cpu = torch.device("cpu")
    return TrainState(config, cpu, model, criterion, None, None, amp_policy("off", cpu))


def _grads(model: nn.Module, criterion: nn.Module) -> dict[str, Tensor]:
    named = [
        *model.named_parameters(),
        *(("loss." + n, p) for n, p in criterion.named_parameters()),
    ]
    return {n: p.grad.clone() for n, p in named if p.requires_grad and p.grad is not None}


def _setup(name: str) -> tuple[nn.Module, ContrastiveLoss]:
    spec = SCENARIOS[name]
    model = _model(spec.get("model", "ln")).to(DTYPE)
    criterion = _criterion(spec)
    criterion.attach(model)
    return model, criterion


def _cached(name: str, rank: int, world: int) -> dict[str, Any]:
    model, criterion = _setup(name)
    ddp = DistributedDataParallel(model)
    torch.manual_seed(99 + rank)  # the RNG stream dropout draws from
    state = _state(ddp, criterion, SCENARIOS[name]["m"])
    loss = cached_forward_backward(state, _local_views(name, rank, world))
    return {"loss": loss, "grads": _grads(model, criterion), **_state_of(model, criterion)}


def _plain(name: str, rank: int, world: int) -> dict[str, Any]:
    """The plain one-shot step: one forward over all views of the local batch, DDP average."""
    model, criterion = _setup(name)
    ddp = DistributedDataParallel(model)
    loss = criterion.forward_views(ddp, _local_views(name, rank, world))
    loss.backward()
    return {"loss": loss.detach(), "grads": _grads(model, criterion), **_state_of(model, criterion)}


def _reference(name: str, rank: int, world: int) -> dict[str, Any]:
    """Each micro-batch (all its views) forwarded with a graph, the full-batch loss backpropagated
    once, gradients averaged over ranks by hand (no DDP)."""
    spec = SCENARIOS[name]
    model, criterion = _setup(name)
    views, m, n_views = _local_views(name, rank, world), spec["m"], spec["views"]
    torch.manual_seed(99 + rank)
    outs = [
        model(torch.cat([v[i : i + m] for v in views])).chunk(n_views)
        for i in range(0, spec["b"], m)
    ]
    loss = criterion(*[torch.cat([o[v] for o in outs]) for v in range(n_views)])
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    return {"loss": loss.detach(), "grads": _grads(model, criterion), **_state_of(model, criterion)}


def _state_of(model: nn.Module, criterion: nn.Module) -> dict[str, Any]:
    """Buffers a step may change: BN running statistics, MoCo's queue."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    buffers |= {"loss." + n: b.clone() for n, b in criterion.named_buffers()}
    return {"buffers": buffers}


def _run_all(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SCENARIOS:
        compare = _plain if name in PLAIN_EXACT else _reference
        out[name] = {"cached": _cached(name, rank, world), "expected": compare(name, rank, world)}
    return out


@pytest.fixture(scope="module")
def results() -> dict[int, list[dict[str, Any]]]:
    return {world: run_in_gloo_group(_run_all, world) for world in (1, 2, 3)}


def _assert_same(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    torch.testing.assert_close(got["loss"], want["loss"], msg=f"{where}: loss")
    assert got["grads"].keys() == want["grads"].keys(), where
    for key in want["grads"]:
        torch.testing.assert_close(got["grads"][key], want["grads"][key], msg=f"{where}: {key}")
    for key in want["buffers"]:
        torch.testing.assert_close(
            got["buffers"][key], want["buffers"][key], msg=f"{where}: buffer {key}"
        )


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", PLAIN_EXACT)
def test_cached_step_equals_plain_step(results, world: int, name: str) -> None:
    for rank, per_rank in enumerate(results[world]):
        r = per_rank[name]
        _assert_same(r["cached"], r["expected"], f"{name} W={world} rank {rank}")


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_cached_step_equals_micro_batch_reference(results, world: int, name: str) -> None:
    """BatchNorm: per-micro-batch statistics; running stats updated once (as the reference)."""
    for rank, per_rank in enumerate(results[world]):
        r = per_rank[name]
        _assert_same(r["cached"], r["expected"], f"{name} W={world} rank {rank}")
        if SCENARIOS[name].get("model") == "bn":
            spec = SCENARIOS[name]
            n_micro = -(-spec["b"] // spec["m"])
            assert int(r["cached"]["buffers"]["1.num_batches_tracked"]) == n_micro


# --- single process --------------------------------------------------------------------------


def test_rng_restore_is_what_makes_dropout_exact() -> None:
    """Without restoring pass 1's RNG in pass 3 the dropout masks differ and so do the grads."""
    name = "dropout_2v"
    cached, reference = _cached_local(name), _reference_local(name)
    for key in reference["grads"]:
        torch.testing.assert_close(cached["grads"][key], reference["grads"][key], msg=key)
    with mock.patch.object(gradcache, "_set_rng_state", lambda state, device: None):
        broken = _cached_local(name)
    assert not torch.allclose(broken["grads"]["0.weight"], reference["grads"]["0.weight"])


def _cached_local(name: str) -> dict[str, Any]:
    model, criterion = _setup(name)
    torch.manual_seed(5)
    loss = cached_forward_backward(
        _state(model, criterion, SCENARIOS[name]["m"]), _local_views(name, 0, 1)
    )
    return {"loss": loss, "grads": _grads(model, criterion), "rng": torch.get_rng_state()}


def _reference_local(name: str) -> dict[str, Any]:
    spec = SCENARIOS[name]
    model, criterion = _setup(name)
    views, m = _local_views(name, 0, 1), spec["m"]
    torch.manual_seed(5)
    outs = [model(torch.cat([v[i : i + m] for v in views])).chunk(2) for i in range(0, 5, m)]
    rng = torch.get_rng_state()
    criterion(*[torch.cat([o[v] for o in outs]) for v in range(2)]).backward()
    return {"grads": _grads(model, criterion), "rng": rng}


def test_rng_after_step_continues_as_after_one_pass() -> None:
    name = "dropout_2v"
    assert torch.equal(_cached_local(name)["rng"], _reference_local(name)["rng"])


class _TwoCalls(ContrastiveLoss):
    """A forward_views the cached step was not written for: one model call per view."""

    def forward_views(self, model: nn.Module, views) -> Tensor:
        return NTXentLoss(self.temperature)(model(views[0]), model(views[1]))


class _NoModel(ContrastiveLoss):
    def forward_views(self, model: nn.Module, views) -> Tensor:  # the model is not called
        return NTXentLoss(self.temperature)(views[0], views[1])


def test_any_forward_views_that_calls_the_model_is_exact() -> None:
    views = _local_views("ntxent_2v_ragged", 0, 1)
    plain_model = _model("ln").to(DTYPE)
    _TwoCalls(0.3).forward_views(plain_model, views).backward()
    model = _model("ln").to(DTYPE)
    cached_forward_backward(_state(model, _TwoCalls(0.3), 2), views)
    for (name, got), want in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, msg=name)


def test_refuses_what_it_cannot_do_exactly() -> None:
    model = _model("ln").to(DTYPE)
    with pytest.raises(GradCacheError, match="_NoModel.forward_views never called the model"):
        cached_forward_backward(_state(model, _NoModel(0.5), 2), _local_views("moco", 0, 1))
    config = Config(train=TrainConfig(micro_batch_size=0))
    assert gradcache_problems(config) == [
        "train.micro_batch_size must be a positive integer or null, got 0"
    ]
    for loss in ("ntxent", "symmetric", "moco", "hard_negative", "debiased"):
        ok = Config(loss=LossConfig(name=loss), train=TrainConfig(micro_batch_size=8))
        assert gradcache_problems(ok) == [], loss


def _train_config(micro: int | None) -> Config:
    return Config(
        model=ModelConfig(arch="small_cnn", proj_hidden_dim=32, proj_out_dim=16),
        loss=LossConfig(name="ntxent", temperature=0.5),
        train=TrainConfig(
            global_batch_size=8, num_workers=1, lr=1e-2, lr_scaling="none", epochs=1,
            micro_batch_size=micro, optimizer="sgd",  # SGD: the update is linear in the grads
        ),  # (Adam's first step divides by |g|, so float32 rounding of tiny grads would show)
    )  # fmt: skip


def _eval_mode_state(micro: int | None) -> TrainState:
    torch.manual_seed(0)
    state = build_state(_train_config(micro), torch.device("cpu"), 4, gather_distributed=False)
    state.model.eval()  # BN on running statistics: no batch statistics, so caching is exact
    return state


def _images(seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]


def test_train_step_dispatch_two_steps_checkpoint_resume_match_plain() -> None:
    """``train_step`` takes the cached path for micro < local batch; two optimizer steps with a
    checkpoint + resume in between reproduce the plain run's weights."""
    plain = _eval_mode_state(None)
    plain_losses = [train_step(plain, _images(seed)) for seed in (0, 1)]

    cached = _eval_mode_state(3)
    with mock.patch(
        "service.train.step.cached_forward_backward", wraps=cached_forward_backward
    ) as spy:
        first = train_step(cached, _images(0))
        saved = copy.deepcopy(training_state_dict(cached))
        resumed = _eval_mode_state(3)
        restore_training_state(resumed, saved)
        resumed.epoch, resumed.epoch_step = cached.epoch, cached.epoch_step
        resumed.global_step = cached.global_step
        resumed.model.eval()
        second = train_step(resumed, _images(1))
    assert spy.call_count == 2
    assert [first, second] == pytest.approx(plain_losses, rel=1e-5)
    got, want = resumed.model.state_dict(), plain.model.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)

    with mock.patch("service.train.step.cached_forward_backward") as never:
        train_step(_eval_mode_state(8), _images(0))  # micro == local batch: the plain step
    never.assert_not_called()


def test_micro_batch_is_resolved_once_when_the_state_is_built(monkeypatch) -> None:
    import service.train.micro_batch as micro_batch

    calls = []
    real = micro_batch.gradcache_problems
    monkeypatch.setattr(micro_batch, "gradcache_problems", lambda c: calls.append(1) or real(c))
    state = _eval_mode_state(4)
    assert state.micro_batch == 4 and calls == [1]
    for seed in (1, 2):  # cached steps (4 < the local batch of 8): the rule is not run again
        assert uses_gradcache(state, 8)
        train_step(state, _images(seed))
    assert calls == [1] and state.global_step == 2
    assert not uses_gradcache(state, 4)  # a batch no larger than the micro-batch: plain step
    with pytest.raises(GradCacheError, match="micro_batch_size must be a positive integer"):
        _eval_mode_state(0)
