"""Single-process behaviour of the contrastive losses: references, chunking, AMP, bad input.

Distributed exactness lives in ``test_losses_distributed.py``; the loop references in
``test_losses_reference.py``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import pkgutil
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import service.losses
from service.config import LossConfig, ModelConfig
from service.losses import (
    LOSS_CLASSES,
    LOSS_NAMES,
    MARGIN_LOSS_NAMES,
    PAIRED_LOSS_NAMES,
    ContrastiveLoss,
    DebiasedNTXentLoss,
    HardNegativeNTXentLoss,
    LossInputError,
    MoCoLoss,
    MomentumEncoder,
    NegativeQueue,
    NTXentLoss,
    SymmetricInfoNCELoss,
    build_loss,
    check_loss_config,
    gather_no_grad,
    gather_with_grad,
    get_rank,
    get_world_size,
    loss_config_problems,
    masked_logsumexp,
    momentum_update,
)
from service.models import build_model, unwrap
from tests.test_losses_reference import (
    ref_debiased,
    ref_enqueue,
    ref_hard_negative,
    ref_moco,
    ref_ntxent,
    ref_symmetric,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _views(
    n_views: int, n: int = 6, d: int = 5, seed: int = 0, dtype=torch.float64
) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(n_views)]


def _value_and_grads(fn, views: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    value = fn(*views)
    return value.detach(), list(torch.autograd.grad(value, views))


def _assert_same(ours, ref, rtol: float = 1e-7, atol: float = 1e-10) -> None:
    torch.testing.assert_close(ours[0], ref[0], rtol=rtol, atol=atol)
    for a, b in zip(ours[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --- against the loop references -----------------------------------------------------------------


@pytest.mark.parametrize("n_views", [2, 3, 4])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_ntxent_matches_reference(n_views: int, temperature: float) -> None:
    views = _views(n_views)
    _assert_same(
        _value_and_grads(NTXentLoss(temperature), views),
        _value_and_grads(lambda *v: ref_ntxent(list(v), temperature), views),
    )


def test_ntxent_accepts_a_list_of_views() -> None:
    views = _views(3)
    assert torch.equal(NTXentLoss()(views), NTXentLoss()(*views))


def test_symmetric_matches_reference() -> None:
    views = _views(2)
    _assert_same(
        _value_and_grads(SymmetricInfoNCELoss(0.07), views),
        _value_and_grads(lambda a, b: ref_symmetric(a, b, 1 / 0.07), views),
    )


def test_moco_matches_reference_and_enqueues() -> None:
    q, k = _views(2)
    crit = MoCoLoss(temperature=0.2, queue_size=16, dim=5)
    queue0 = crit.queue.keys.clone().to(torch.float64)
    loss = crit(q, k)
    expected = ref_moco(q, k, queue0, 0.2)
    torch.testing.assert_close(loss, expected)
    grad, expected_grad = torch.autograd.grad(loss, q), torch.autograd.grad(expected, q)
    torch.testing.assert_close(grad, expected_grad)
    expected_queue, expected_ptr = ref_enqueue(queue0, 0, k)
    assert int(crit.queue.ptr) == expected_ptr == 6
    torch.testing.assert_close(crit.queue.keys.to(torch.float64), expected_queue)


def test_moco_key_gets_no_gradient() -> None:
    q, k = _views(2)
    crit = MoCoLoss(temperature=0.2, queue_size=8, dim=5)
    crit(q, k).backward()
    assert k.grad is None and q.grad is not None


def test_moco_eval_mode_does_not_enqueue() -> None:
    crit = MoCoLoss(queue_size=8, dim=5).eval()
    before = crit.queue.keys.clone()
    crit(*_views(2))
    assert torch.equal(crit.queue.keys, before) and int(crit.queue.ptr) == 0


@pytest.mark.parametrize(("n_views", "top_k"), [(2, 3), (3, 7)])
def test_hard_negative_matches_reference(n_views: int, top_k: int) -> None:
    views = _views(n_views)
    _assert_same(
        _value_and_grads(HardNegativeNTXentLoss(0.3, top_k=top_k), views),
        _value_and_grads(lambda *v: ref_hard_negative(list(v), 0.3, top_k), views),
    )


def test_hard_negative_with_every_negative_is_ntxent() -> None:
    views = _views(3)
    every = 3 * 6 - 3
    _assert_same(
        _value_and_grads(HardNegativeNTXentLoss(0.4, top_k=every), views),
        _value_and_grads(NTXentLoss(0.4), views),
    )


@pytest.mark.parametrize(("temperature", "tau_plus"), [(0.5, 0.1), (0.2, 0.3), (0.5, 0.0)])
def test_debiased_matches_reference(temperature: float, tau_plus: float) -> None:
    views = _views(2)
    _assert_same(
        _value_and_grads(DebiasedNTXentLoss(temperature, tau_plus), views),
        _value_and_grads(lambda a, b: ref_debiased(a, b, temperature, tau_plus), views),
    )


def test_debiased_clamp_branch_matches_reference() -> None:
    # A large tau_plus with well-aligned positives drives the debiased sum negative: the floor
    # N * e^{-1/T} is active for some anchors and the loss must still match (and stay finite).
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 5, generator=g, dtype=torch.float64)
    views = [(base + 0.01 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()]
    views.append(
        (base + 0.01 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    )
    _assert_same(
        _value_and_grads(DebiasedNTXentLoss(0.5, 0.9), views),
        _value_and_grads(lambda a, b: ref_debiased(a, b, 0.5, 0.9), views),
    )


def test_two_view_ntxent_equals_simclr_cross_entropy_float32() -> None:
    z1, z2 = _views(2, n=32, d=16, dtype=torch.float32)
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / 0.5).masked_fill(torch.eye(64, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(32, 64), torch.arange(32)])
    expected = nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(NTXentLoss(0.5)(z1, z2), expected, rtol=1e-6, atol=1e-6)


# --- memory-bounded (chunked) mode ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 12, 18, 100])
@pytest.mark.parametrize("n_views", [2, 3])
def test_chunked_ntxent_equals_unchunked(chunk_size: int, n_views: int) -> None:
    views = _views(n_views, n=6)  # 6*n_views keys: most chunk sizes leave a partial last block
    _assert_same(
        _value_and_grads(NTXentLoss(0.1, chunk_size=chunk_size), views),
        _value_and_grads(NTXentLoss(0.1), views),
        rtol=1e-10,
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 5])
def test_chunked_symmetric_and_moco_equal_unchunked(chunk_size: int) -> None:
    views = _views(2)
    _assert_same(
        _value_and_grads(SymmetricInfoNCELoss(0.1, chunk_size=chunk_size), views),
        _value_and_grads(SymmetricInfoNCELoss(0.1), views),
        rtol=1e-10,
    )
    q = views[0]
    chunked = MoCoLoss(0.2, queue_size=11, dim=5, chunk_size=chunk_size)(q, views[1])
    plain = MoCoLoss(0.2, queue_size=11, dim=5)(q, views[1])
    torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.autograd.grad(chunked, q), torch.autograd.grad(plain, q))


def test_chunked_float32_close_to_unchunked_at_moderate_size() -> None:
    views = _views(2, n=300, d=32, dtype=torch.float32)
    _assert_same(
        _value_and_grads(NTXentLoss(0.07, chunk_size=128), views),
        _value_and_grads(NTXentLoss(0.07), views),
        rtol=1e-5,
        atol=1e-7,
    )


def _largest_saved_tensor(fn) -> int:
    """Numel of the biggest tensor autograd saves for backward while running ``fn``."""
    sizes = [0]

    def pack(t: Tensor) -> Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_chunked_mode_never_saves_the_full_logits() -> None:
    n, d = 64, 8  # two views: 128 anchors x 128 keys
    views = _views(2, n=n, d=d, dtype=torch.float32)
    full = 2 * n * 2 * n
    assert _largest_saved_tensor(lambda: NTXentLoss(0.5)(*views)) >= full  # the probe works
    assert _largest_saved_tensor(lambda: NTXentLoss(0.5, chunk_size=16)(*views)) < full / 4


def test_masked_logsumexp_excludes_the_self_band() -> None:
    g = torch.Generator().manual_seed(3)
    x, keys = torch.randn(4, 3, generator=g), torch.randn(10, 3, generator=g)
    logits = x @ keys.T
    logits[torch.arange(4), torch.arange(4) + 5] = -float("inf")  # self columns 5..8
    expected = torch.logsumexp(logits, dim=1)
    for chunk in (None, 1, 3, 6):
        got = masked_logsumexp(x, keys, self_offset=5, chunk_size=chunk)
        torch.testing.assert_close(got, expected)


# --- precision and numerical stability -----------------------------------------------------------


def _loss_factories() -> dict[str, callable]:
    return {
        "ntxent": lambda: NTXentLoss(0.2),
        "ntxent_chunked": lambda: NTXentLoss(0.2, chunk_size=7),
        "symmetric": lambda: SymmetricInfoNCELoss(0.07, learnable_temperature=True),
        "moco": lambda: MoCoLoss(0.2, queue_size=32, dim=16),
        "hard_negative": lambda: HardNegativeNTXentLoss(0.2, top_k=8),
        "debiased": lambda: DebiasedNTXentLoss(0.2, 0.1),
    }


@pytest.mark.parametrize("name", list(_loss_factories()))
def test_bf16_autocast_gives_finite_loss_close_to_fp32(name: str) -> None:
    torch.manual_seed(0)
    encoder = nn.Linear(12, 16)
    inputs = [torch.randn(24, 12) for _ in range(2)]

    def run(amp: bool) -> tuple[Tensor, Tensor]:
        encoder.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            z = [encoder(x) for x in inputs]
            loss = _loss_factories()[name]()(*z)
        assert (z[0].dtype == torch.bfloat16) == amp
        assert loss.dtype == torch.float32  # logits computed in float32 despite autocast
        loss.backward()
        return loss.detach(), encoder.weight.grad.clone()

    (loss16, grad16), (loss32, grad32) = run(True), run(False)
    assert torch.isfinite(loss16) and torch.isfinite(grad16).all()
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)
    cosine = nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0)
    assert cosine > 0.99, cosine


@pytest.mark.parametrize("name", list(_loss_factories()))
def test_tiny_temperature_and_duplicates_stay_finite(name: str) -> None:
    # T = 0.01 on (near-)identical embeddings: logits ~ 100, self similarity masked.
    base = torch.randn(1, 16).repeat(8, 1)
    views = [(base + 1e-4 * torch.randn(8, 16)).requires_grad_() for _ in range(2)]
    factories = {
        "ntxent": lambda: NTXentLoss(0.01),
        "ntxent_chunked": lambda: NTXentLoss(0.01, chunk_size=3),
        "symmetric": lambda: SymmetricInfoNCELoss(0.01),
        "moco": lambda: MoCoLoss(0.01, queue_size=32, dim=16),
        "hard_negative": lambda: HardNegativeNTXentLoss(0.01, top_k=8),
        "debiased": lambda: DebiasedNTXentLoss(0.01, 0.1),
    }
    loss = factories[name]()(*views)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v.grad).all() for v in views if v.grad is not None)
    assert views[0].grad is not None  # MoCo's key is detached; every loss reaches the anchors


# --- temperature ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_loss_factories()))
def test_every_loss_exposes_temperature_as_float(name: str) -> None:
    temperature = _loss_factories()[name]().temperature
    assert isinstance(temperature, float) and temperature > 0


def test_learnable_temperature_is_log_parameterised_and_clamped_after_the_step() -> None:
    crit = SymmetricInfoNCELoss(0.1, learnable_temperature=True, max_logit_scale=50.0)
    assert [n for n, _ in crit.named_parameters()] == ["logit_scale"]
    assert crit.logit_scale.item() == pytest.approx(math.log(10.0))
    assert crit.temperature == pytest.approx(0.1, rel=1e-6)
    views = _views(2, dtype=torch.float32)
    opt = torch.optim.SGD(crit.parameters(), lr=1.0)
    crit(*views).backward()
    assert crit.logit_scale.grad is not None and crit.logit_scale.grad.abs() > 0
    opt.step()
    assert crit.temperature != pytest.approx(0.1)
    with torch.no_grad():
        crit.logit_scale.fill_(math.log(200.0))  # an optimizer step overshot the bound
    crit.after_step(torch.nn.Identity())  # the clamp is applied to the parameter, after the step
    assert crit.logit_scale.item() == pytest.approx(math.log(50.0))
    assert crit.temperature == pytest.approx(1 / 50.0)
    crit.zero_grad()
    crit(*views).backward()
    # At the bound the forward still has a gradient (no clamp inside), so it can come back.
    assert crit.logit_scale.grad.item() != 0.0
    assert crit.temperature_parameters() == [crit.logit_scale]
    assert SymmetricInfoNCELoss(0.1).temperature_parameters() == []


def test_fixed_temperature_symmetric_has_no_parameters() -> None:
    crit = SymmetricInfoNCELoss(0.07)
    assert list(crit.parameters()) == [] and crit.temperature == pytest.approx(0.07)


# --- MoCo helpers ------------------------------------------------------------------------------


def test_queue_wraps_and_keeps_newest_when_overfilled() -> None:
    queue = NegativeQueue(dim=3, size=5)
    expected, ptr = queue.keys.clone(), 0
    g = torch.Generator().manual_seed(0)
    for n in (3, 4, 7):  # 7 > size: only the newest 5 survive
        keys = torch.randn(n, 3, generator=g)
        queue.enqueue(keys)
        expected, ptr = ref_enqueue(expected, ptr, keys)
        assert int(queue.ptr) == ptr
        torch.testing.assert_close(queue.keys, expected)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(5))


def test_queue_state_dict_round_trips() -> None:
    crit = MoCoLoss(queue_size=8, dim=5)
    crit(*_views(2))
    state = crit.state_dict()
    assert set(state) == {"queue.keys", "queue.ptr", "shuffle_step"}
    fresh = MoCoLoss(queue_size=8, dim=5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue.keys, crit.queue.keys)
    assert int(fresh.queue.ptr) == int(crit.queue.ptr) == 6
    # A checkpoint from before shuffle-BN (no step counter) still loads, the counter at 0.
    del state["shuffle_step"]
    fresh.shuffle_step.fill_(5)
    fresh.load_state_dict(state)
    assert int(fresh.shuffle_step) == 0


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_momentum_update_blends_parameters_and_copies_buffers() -> None:
    torch.manual_seed(0)
    online, target = _bn_net(), _bn_net()
    online(torch.randn(8, 4))  # move BN running stats away from the target's
    before = {n: p.clone() for n, p in target.named_parameters()}
    momentum_update(online, target, 0.9)
    for name, p in target.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(online.named_parameters())[name]
        torch.testing.assert_close(p, expected)
    for (_, b_online), (_, b_target) in zip(
        online.named_buffers(), target.named_buffers(), strict=True
    ):
        assert torch.equal(b_online, b_target)


def test_momentum_update_unwraps_ddp() -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tempfile.mkdtemp()}/rdzv", rank=0, world_size=1
    )
    try:
        online = nn.parallel.DistributedDataParallel(_bn_net())
        key_encoder = MomentumEncoder(online, momentum=0.5)
        assert not any(p.requires_grad for p in key_encoder.parameters())
        with torch.no_grad():
            for p in online.parameters():
                p.add_(1.0)
        before = [p.clone() for p in key_encoder.target.parameters()]
        key_encoder.update(online)
        for old, new, o in zip(
            before, key_encoder.target.parameters(), online.module.parameters(), strict=True
        ):
            torch.testing.assert_close(new, 0.5 * old + 0.5 * o)
        out = key_encoder(torch.randn(4, 4))
        assert not out.requires_grad
    finally:
        dist.destroy_process_group()


def test_momentum_update_rejects_mismatched_modules() -> None:
    with pytest.raises(LossInputError, match="differ in parameters"):
        momentum_update(nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3)), 0.9)
    with pytest.raises(LossInputError, match="momentum"):
        momentum_update(nn.Linear(4, 3), nn.Linear(4, 3), 1.5)


# --- not distributed ---------------------------------------------------------------------------


def test_distributed_helpers_without_a_process_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert get_rank() == 0 and get_world_size() == 1
    assert gather_with_grad(x) is x
    assert torch.equal(gather_no_grad(x), x) and not gather_no_grad(x).requires_grad


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf")])
@pytest.mark.parametrize(
    "cls", [NTXentLoss, SymmetricInfoNCELoss, MoCoLoss, HardNegativeNTXentLoss, DebiasedNTXentLoss]
)
def test_bad_temperature_is_rejected(cls, temperature: float) -> None:
    with pytest.raises(ValueError, match=f"temperature must be > 0 and finite, got {temperature}"):
        cls(temperature=temperature)


def test_views_with_different_shapes() -> None:
    with pytest.raises(LossInputError, match=r"same shape, got \[\(6, 5\), \(5, 5\)\]"):
        NTXentLoss()(torch.randn(6, 5), torch.randn(5, 5))
    with pytest.raises(LossInputError, match=r"same shape"):
        SymmetricInfoNCELoss()(torch.randn(6, 5), torch.randn(6, 4))


def test_fewer_than_two_views() -> None:
    with pytest.raises(LossInputError, match="at least two views, got 1"):
        NTXentLoss()(torch.randn(6, 5))
    with pytest.raises(LossInputError, match="at least two views, got 0"):
        NTXentLoss()()
    with pytest.raises(LossInputError, match="exactly 2 views, got 3"):
        SymmetricInfoNCELoss()(*_views(3))
    with pytest.raises(LossInputError, match="exactly 2 views, got 3"):
        DebiasedNTXentLoss()(*_views(3))


def test_views_must_be_2d() -> None:
    with pytest.raises(LossInputError, match=r"view 0 must be \[batch, dim\], got shape \(6,\)"):
        NTXentLoss()(torch.randn(6), torch.randn(6))


@pytest.mark.parametrize("cls", [NTXentLoss, SymmetricInfoNCELoss, DebiasedNTXentLoss])
def test_batch_of_one_is_rejected(cls) -> None:
    with pytest.raises(LossInputError, match="global batch of 1 sample"):
        cls()(torch.randn(1, 5), torch.randn(1, 5))


def test_moco_accepts_a_batch_of_one() -> None:
    loss = MoCoLoss(queue_size=8, dim=5)(torch.randn(1, 5), torch.randn(1, 5))
    assert torch.isfinite(loss)


def test_non_finite_embeddings_name_view_and_rows() -> None:
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    z2[[1, 4], 0] = float("nan")
    z2[4, 1] = float("inf")
    with pytest.raises(LossInputError, match=r"view 1 has 2 row\(s\) with NaN/inf"):
        NTXentLoss()(z1, z2)
    with pytest.raises(LossInputError, match="non-finite"):
        MoCoLoss(queue_size=8, dim=5)(z1, z2)


def test_top_k_larger_than_the_negatives() -> None:
    # 2 views x 4 samples: each anchor has 8 - 2 = 6 negatives.
    with pytest.raises(LossInputError, match="top_k=7 exceeds the 6 negatives"):
        HardNegativeNTXentLoss(top_k=7)(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(LossInputError, match="top_k must be >= 1, got 0"):
        HardNegativeNTXentLoss(top_k=0)


def test_other_bad_hyperparameters() -> None:
    with pytest.raises(LossInputError, match="chunk_size must be a positive integer"):
        NTXentLoss(chunk_size=0)
    with pytest.raises(LossInputError, match="tau_plus must be in"):
        DebiasedNTXentLoss(tau_plus=1.0)
    with pytest.raises(LossInputError, match="queue holds dim 128"):
        MoCoLoss(dim=128)(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(LossInputError, match="below 1/max_logit_scale"):
        SymmetricInfoNCELoss(0.001, learnable_temperature=True)


# --- factory -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("ntxent", NTXentLoss),
        ("symmetric", SymmetricInfoNCELoss),
        ("moco", MoCoLoss),
        ("hard_negative", HardNegativeNTXentLoss),
        ("debiased", DebiasedNTXentLoss),
    ],
)
def test_build_loss_maps_every_name(name: str, cls: type) -> None:
    crit = build_loss(LossConfig(name=name, temperature=0.3, top_k=4), embed_dim=16)
    assert isinstance(crit, cls) and crit.temperature == pytest.approx(0.3)
    assert torch.isfinite(crit(torch.randn(8, 16), torch.randn(8, 16)))


def test_build_loss_passes_the_fields_through() -> None:
    ntxent = build_loss(LossConfig(name="ntxent", chunk_size=512), embed_dim=8)
    assert ntxent.chunk_size == 512
    moco = build_loss(LossConfig(name="moco", moco_queue_size=128, moco_momentum=0.9), embed_dim=32)
    assert moco.queue.size == 128 and moco.queue.dim == 32 and moco.momentum == 0.9
    hard = build_loss(LossConfig(name="hard_negative", top_k=5), embed_dim=8)
    assert hard.top_k == 5
    debiased = build_loss(LossConfig(name="debiased", tau_plus=0.2), embed_dim=8)
    assert debiased.tau_plus == 0.2
    clip = build_loss(LossConfig(name="symmetric", learnable_temperature=True), embed_dim=8)
    assert len(list(clip.parameters())) == 1


def test_build_loss_rejects_unsupported_combinations() -> None:
    with pytest.raises(LossInputError, match="learnable_temperature"):
        build_loss(LossConfig(name="ntxent", learnable_temperature=True), embed_dim=8)
    with pytest.raises(LossInputError, match="chunk_size=64 is not supported"):
        build_loss(LossConfig(name="hard_negative", chunk_size=64), embed_dim=8)
    with pytest.raises(LossInputError, match="loss.name must be one of"):
        build_loss(LossConfig(name="arcface"), embed_dim=8)


def test_check_loss_config_rejects_what_the_loss_cannot_run() -> None:
    for name in LOSS_NAMES:
        check_loss_config(LossConfig(name=name), n_views=2)
    check_loss_config(LossConfig(name="ntxent", chunk_size=64), n_views=4)
    for name in ("symmetric", "moco", "debiased"):
        with pytest.raises(LossInputError, match="takes exactly 2 views; got augment.n_views=3"):
            check_loss_config(LossConfig(name=name), n_views=3)
    with pytest.raises(LossInputError, match="learnable_temperature is not supported"):
        check_loss_config(LossConfig(name="moco", learnable_temperature=True))


def test_loss_names_and_capabilities_are_defined_by_the_classes() -> None:
    assert LOSS_NAMES == tuple(LOSS_CLASSES)
    assert all(issubclass(cls, ContrastiveLoss) for cls in LOSS_CLASSES.values())
    learnable = {n for n, c in LOSS_CLASSES.items() if c.supports_learnable_temperature}
    chunked = {n for n, c in LOSS_CLASSES.items() if c.supports_chunking}
    two_views = {n for n, c in LOSS_CLASSES.items() if c.exact_views == 2}
    labelled = {n for n, c in LOSS_CLASSES.items() if c.needs_labels}
    assert learnable == {"symmetric", "siglip"}
    assert chunked == {"ntxent", "symmetric", "moco"}
    assert two_views == {"symmetric", "moco", "debiased", "siglip"}
    assert labelled == {"supcon", "triplet", "pairwise"}
    assert PAIRED_LOSS_NAMES == ("symmetric", "siglip")
    assert MARGIN_LOSS_NAMES == ("triplet", "pairwise")
    assert {n for n, c in LOSS_CLASSES.items() if not c.in_batch_negatives} == {"moco"}
    with pytest.raises(LossInputError, match="does not support chunk_size"):
        ContrastiveLoss(0.5, chunk_size=4)  # a loss must opt in to chunking


def _loss_classes_in_the_package() -> set[type[ContrastiveLoss]]:
    """Every ``ContrastiveLoss`` subclass defined at module level in ``service.losses`` that
    implements ``compute`` (bases like ``MarginLoss`` do not; doctest toys are not module
    attributes)."""
    for module in pkgutil.iter_modules(service.losses.__path__, "service.losses."):
        importlib.import_module(module.name)
    found, todo = set(), [ContrastiveLoss]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            module = sys.modules.get(sub.__module__)
            defined_here = getattr(module, sub.__qualname__, None) is sub
            if defined_here and sub.__module__.startswith("service.losses."):
                found.add(sub)
    return {cls for cls in found if cls.compute is not ContrastiveLoss.compute}


def test_every_loss_class_is_registered_under_its_name() -> None:
    classes = _loss_classes_in_the_package()
    assert len(classes) >= 9
    unregistered = {cls.__name__ for cls in classes} - {c.__name__ for c in LOSS_CLASSES.values()}
    assert not unregistered, f"add {unregistered} to LOSS_CLASSES in service/losses/factory.py"
    for name, cls in LOSS_CLASSES.items():
        assert cls.name == name
        crit = build_loss(LossConfig(name=name), embed_dim=16, gather_distributed=False)
        assert type(crit) is cls and not crit.gather_distributed


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_registered_classes_build_themselves_from_the_config(name: str) -> None:
    # ``from_config`` comes from the class itself or from an ancestor whose constructor takes
    # every argument this one does: a loss with a hyperparameter of its own must override it.
    cls = LOSS_CLASSES[name]
    owner = next(c for c in cls.__mro__ if "from_config" in vars(c))
    arguments = set(inspect.signature(cls.__init__).parameters)
    assert arguments <= set(inspect.signature(owner.__init__).parameters), (
        f"{cls.__name__} takes {arguments - set(inspect.signature(owner.__init__).parameters)} "
        f"but inherits from_config from {owner.__name__}: override from_config"
    )
    assert cls.config_problems(LossConfig(name=name)) == []  # the defaults are valid


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"name": "ntxent", "temperature": 0.0}, "loss.temperature must be > 0 and finite, got 0"),
        ({"name": "ntxent", "chunk_size": 0}, "loss.chunk_size must be a positive integer"),
        ({"name": "moco", "moco_queue_size": 0}, "loss.moco_queue_size must be >= 1, got 0"),
        ({"name": "moco", "moco_momentum": 1.5}, "loss.moco_momentum must be in [0, 1], got 1.5"),
        ({"name": "hard_negative", "top_k": 0}, "loss.top_k must be >= 1, got 0"),
        ({"name": "debiased", "tau_plus": 1.0}, "loss.tau_plus must be in [0, 1), got 1.0"),
        ({"name": "supcon", "temperature": -1.0}, "loss.temperature must be > 0"),
        ({"name": "triplet", "margin": -0.1}, "loss.margin must be > 0 and finite, got -0.1"),
        ({"name": "pairwise", "margin": float("inf")}, "loss.margin must be > 0 and finite"),
        ({"name": "siglip", "siglip_bias_init": float("nan")}, "loss.siglip_bias_init must be"),
        (
            {"name": "symmetric", "temperature": 0.001, "learnable_temperature": True},
            "loss.temperature=0.001 is below 1/max_logit_scale=0.01",
        ),
    ],
)
def test_config_problems_name_the_key_and_agree_with_the_constructor(fields, problem) -> None:
    cfg = LossConfig(**fields)
    found = loss_config_problems(cfg)
    assert len(found) == 1 and found[0].startswith(problem), found
    with pytest.raises(LossInputError):  # the worker's one check: the constructor's own
        build_loss(cfg, embed_dim=8)


def test_loss_config_problems_reports_everything_at_once() -> None:
    cfg = LossConfig(name="moco", temperature=-1.0, margin=0.5, moco_queue_size=0)
    found = loss_config_problems(cfg, n_views=3)
    assert [p.split()[0].split("=")[0] for p in found] == [
        "loss.margin",
        "loss.name",  # takes exactly 2 views
        "loss.temperature",
        "loss.moco_queue_size",
    ]
    assert loss_config_problems(LossConfig(name="arcface")) == [
        f"loss.name must be one of {'|'.join(LOSS_NAMES)}, got 'arcface'"
    ]
    # margin losses have no temperature: loss.temperature is not theirs to check
    assert loss_config_problems(LossConfig(name="triplet", temperature=-1.0)) == []


def test_repr_names_the_hyperparameters() -> None:
    assert MoCoLoss(0.2, queue_size=16, dim=8, momentum=0.9).extra_repr() == (
        "temperature=0.2, queue_size=16, dim=8, momentum=0.9, gather_distributed=True, "
        "chunk_size=None"
    )
    assert repr(HardNegativeNTXentLoss(0.5, top_k=3, gather_distributed=False)) == (
        "HardNegativeNTXentLoss(temperature=0.5, top_k=3, gather_distributed=False)"
    )


# --- training-loop hooks -----------------------------------------------------------------------


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))


def _image_views(step: int, n_views: int = 2, b: int = 6) -> list[Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(b, 6, generator=g) for _ in range(n_views)]


def test_default_forward_views_is_one_forward_over_all_views() -> None:
    model, crit = _tiny_net(), NTXentLoss(0.5)
    views = _image_views(0, n_views=3)
    crit.attach(model)  # no-op
    expected = crit(*model(torch.cat(views)).chunk(3))
    torch.testing.assert_close(crit.forward_views(model, views), expected)
    crit.after_step(model)  # no-op
    assert list(crit.state_dict()) == []


def test_moco_hooks_equal_the_explicit_key_encoder_code() -> None:
    """attach / forward_views / after_step reproduce the loop's former MoCo branch exactly."""
    momentum, steps = 0.9, 3
    # Former loop code: a frozen deepcopy as key model, EMA after each optimizer step.
    old_model = _tiny_net()
    key_model = copy.deepcopy(old_model).requires_grad_(False)
    old_crit = MoCoLoss(0.2, queue_size=8, dim=5)
    old_opt = torch.optim.SGD(old_model.parameters(), lr=0.5)
    # Hooks.
    new_model = _tiny_net()
    crit = MoCoLoss(0.2, queue_size=8, dim=5, momentum=momentum)
    crit.attach(new_model)
    new_opt = torch.optim.SGD(
        [p for m in (new_model, crit) for p in m.parameters() if p.requires_grad], lr=0.5
    )
    assert len(new_opt.param_groups[0]["params"]) == len(list(old_model.parameters()))
    for step in range(steps):
        views = _image_views(step)
        queries = old_model(views[0])
        with torch.no_grad():
            keys = key_model(views[1])
        old_loss = old_crit(queries, keys)
        old_opt.zero_grad()
        old_loss.backward()
        old_opt.step()
        momentum_update(old_model, key_model, momentum)

        new_loss = crit.forward_views(new_model, views)
        new_opt.zero_grad()
        new_loss.backward()
        crit.reduce_gradients()  # not distributed: no-op
        new_opt.step()
        crit.after_step(new_model)

        assert torch.equal(new_loss, old_loss)
    for old, new in (
        (old_model.state_dict(), new_model.state_dict()),
        (key_model.state_dict(), crit.key_encoder.target.state_dict()),
        (old_crit.queue.state_dict(), crit.queue.state_dict()),
    ):
        assert old.keys() == new.keys()
        for name in old:
            assert torch.equal(old[name], new[name]), name


def test_moco_key_encoder_travels_with_the_criterion_state() -> None:
    model = _tiny_net()
    crit = MoCoLoss(0.2, queue_size=8, dim=5)
    with pytest.raises(RuntimeError, match="attach"):
        crit.forward_views(model, _image_views(0))
    crit.attach(model)
    assert not any(p.requires_grad for p in crit.parameters())  # optimizers skip the copy
    crit.forward_views(model, _image_views(0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    crit.after_step(model)
    state = crit.state_dict()
    assert {"queue.keys", "queue.ptr"} < set(state)
    assert {f"key_encoder.target.{k}" for k in model.state_dict()} < set(state)
    # Resume: attach to a fresh model first, then load (as the training loop does).
    resumed = MoCoLoss(0.2, queue_size=8, dim=5)
    resumed.attach(_tiny_net(seed=1))
    resumed.load_state_dict(state)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_moco_attach_copies_the_plain_model_out_of_ddp() -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tempfile.mkdtemp()}/rdzv", rank=0, world_size=1
    )
    try:
        model = nn.parallel.DistributedDataParallel(_tiny_net())
        assert unwrap(model) is model.module
        crit = MoCoLoss(0.2, queue_size=8, dim=5, momentum=0.5)
        crit.attach(model)
        assert crit.key_encoder is not None
        assert not isinstance(crit.key_encoder.target, nn.parallel.DistributedDataParallel)
        crit.forward_views(model, _image_views(0)).backward()
        crit.reduce_gradients()  # world of one: no-op
        before = [p.clone() for p in crit.key_encoder.target.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        crit.after_step(model)
        for old, new, online in zip(
            before, crit.key_encoder.target.parameters(), model.module.parameters(), strict=True
        ):
            torch.testing.assert_close(new, 0.5 * old + 0.5 * online)
    finally:
        dist.destroy_process_group()


def test_reduce_gradients_without_a_process_group_keeps_the_gradients() -> None:
    crit = SymmetricInfoNCELoss(0.2, learnable_temperature=True)
    crit(torch.randn(6, 4), torch.randn(6, 4)).backward()
    grad = crit.logit_scale.grad.clone()
    crit.reduce_gradients()
    assert torch.equal(crit.logit_scale.grad, grad)
    NTXentLoss().reduce_gradients()  # no parameters at all


def test_expected_initial_loss_formulas() -> None:
    views, batch = 2, 16
    expected = {
        "ntxent": math.log(views * batch - 1),
        "symmetric": math.log(batch),
        "moco": math.log(64 + 1),
        "hard_negative": math.log(min(5, views * batch - 2) + 1),
        "debiased": None,
        "supcon": math.log(views * batch - 1),
        "triplet": 0.2,  # the margin: hardest positive and negative alike
        "pairwise": None,
        "siglip": None,
    }
    cfg = {"temperature": 0.3, "top_k": 5, "moco_queue_size": 64}
    for name in LOSS_NAMES:
        crit = build_loss(LossConfig(name=name, **cfg), embed_dim=8)
        assert crit.expected_initial_loss(views, batch) == expected[name], name
    hard = HardNegativeNTXentLoss(top_k=1000)
    assert hard.expected_initial_loss(3, 4) == math.log(3 * 4 - 2 + 1)


@pytest.mark.parametrize("n_views", [2, 3])
def test_ntxent_first_loss_of_a_random_model_is_near_the_expected_one(n_views: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="small_cnn", proj_hidden_dim=64, proj_out_dim=32))
    crit = NTXentLoss(temperature=0.5)
    batch = 16
    views = [torch.rand(batch, 3, 32, 32) for _ in range(n_views)]
    with torch.no_grad():
        first = float(crit.forward_views(model, views))
    expected = crit.expected_initial_loss(n_views, batch)
    assert abs(first - expected) / expected < 0.25, (first, expected)


def test_docs_table_lists_every_registered_loss() -> None:
    from service.config import REPO_ROOT

    table = (REPO_ROOT / "docs" / "losses.md").read_text()
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    # the loss rows: a name and a class in backticks (not the header's "class")
    documented = {n.strip(" `"): c.strip(" `") for n, c in rows if c.strip().startswith("`")}
    assert documented == {name: cls.__name__ for name, cls in LOSS_CLASSES.items()}
