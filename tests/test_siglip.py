"""SigLIP: a loop reference, exactness on 2 gloo ranks vs 1 process (loss; gradients of the
encoders, of t' and of the bias), and the paired (image–text) path through ``forward_views`` and
the cached-gradient step."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from service.config import Config, LossConfig, TrainConfig, load_config
from service.losses import (
    LossInputError,
    SigLIPLoss,
    SymmetricInfoNCELoss,
    build_loss,
    check_loss_config,
    loss_config_problems,
)
from service.train.amp import amp_policy
from service.train.gradcache import cached_forward_backward
from service.train.state import TrainState
from tests._dist_utils import run_in_gloo_group

IN_DIM, TOKENS, EMB_DIM, LOCAL_BATCH, WORLD = 6, 7, 5, 4, 2
DTYPE = torch.float64


def ref_siglip(a: Tensor, b: Tensor, log_scale: Tensor, bias: Tensor) -> Tensor:
    """Zhai et al. eq. 1, pair by pair: -1/B sum_i sum_j log sigmoid(z_ij (t a_i.b_j + bias))."""
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    n, rows = a.shape[0], []
    for i in range(n):
        row = []
        for j in range(n):
            sign = 1.0 if i == j else -1.0
            row.append(
                -torch.nn.functional.logsigmoid(sign * (log_scale.exp() * a[i] @ b[j] + bias))
            )
        rows.append(torch.stack(row).sum())
    return torch.stack(rows).mean()


class PairedToy(nn.Module):
    """An image–text model in miniature: two towers, ``paired_views``, (z_image, z_text) out."""

    paired_views = True

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4321)
        self.image = nn.Sequential(nn.Linear(IN_DIM, 8), nn.Tanh(), nn.Linear(8, EMB_DIM))
        self.text = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * TOKENS, EMB_DIM))
        self.to(DTYPE)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.image(images), self.text(tokens)


def _global_batch(world: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + world)
    n = LOCAL_BATCH * world
    return (
        torch.randn(n, IN_DIM, generator=g, dtype=DTYPE),
        torch.randint(0, 20, (n, TOKENS), generator=g),
    )


def _criterion() -> SigLIPLoss:
    # t = 1/0.5 = 2 and bias -1: every pair contributes to the gradient (not saturated)
    return SigLIPLoss(temperature=0.5, bias_init=-1.0, learnable_temperature=True).to(DTYPE)


def _grads(model: nn.Module, crit: nn.Module) -> dict[str, Tensor]:
    named = [*model.named_parameters(), *(("loss." + n, p) for n, p in crit.named_parameters())]
    return {n: p.grad.clone() for n, p in named}


def run_rank(rank: int, world: int) -> dict[str, Any]:
    """This rank's local loss; encoder gradients as DDP would average them (all-reduce / W by
    hand here) and the loss's own gradients through ``reduce_gradients``."""
    model, crit = PairedToy(), _criterion()
    images, tokens = _global_batch(world)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    loss = crit.forward_views(model, [images[rows], tokens[rows]])
    loss.backward()
    crit.reduce_gradients()  # t' and bias: the mean over ranks
    for p in model.parameters():  # what DDP does to the model's gradients
        torch.distributed.all_reduce(p.grad)
        p.grad /= world
    return {"loss": loss.detach(), "grads": _grads(model, crit)}


def reference(world: int) -> dict[str, Any]:
    model, crit = PairedToy(), _criterion()
    log_scale = crit.logit_scale.detach().clone().requires_grad_()
    bias = crit.bias.detach().clone().requires_grad_()
    images, tokens = _global_batch(world)
    loss = ref_siglip(*model(images, tokens), log_scale, bias)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": {**grads, "loss.logit_scale": log_scale.grad,
                                              "loss.bias": bias.grad}}  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return run_in_gloo_group(run_rank, WORLD)


@pytest.mark.distributed
def test_two_ranks_equal_one_process_on_the_whole_batch(two_ranks) -> None:
    expected = reference(WORLD)
    local = torch.stack([r["loss"] for r in two_ranks])
    assert local[0] != local[1]  # the ranks' local losses differ: the mean is a real check
    torch.testing.assert_close(local.mean(), expected["loss"], rtol=1e-6, atol=1e-12)
    for name, want in expected["grads"].items():
        for r in two_ranks:  # after averaging every rank holds the single-process gradient
            torch.testing.assert_close(r["grads"][name], want, rtol=1e-6, atol=1e-12, msg=name)


def test_one_process_equals_the_loop_reference_for_two_image_views() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(6, EMB_DIM, generator=g, dtype=DTYPE).requires_grad_() for _ in range(2))
    crit = _criterion()
    loss = crit(a, b)
    loss.backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    log_scale = crit.logit_scale.detach().clone().requires_grad_()
    bias = crit.bias.detach().clone().requires_grad_()
    expected = ref_siglip(a2, b2, log_scale, bias)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in [(a, a2), (b, b2), (crit.logit_scale, log_scale), (crit.bias, bias)]:
        torch.testing.assert_close(got.grad, want.grad)


def test_parameters_init_clamp_and_config() -> None:
    crit = build_loss(
        LossConfig(name="siglip", temperature=0.1, learnable_temperature=True), embed_dim=8
    )
    assert crit.logit_scale.item() == pytest.approx(math.log(10.0))
    assert crit.bias.item() == -10.0
    assert crit.temperature_parameters() == [crit.logit_scale, crit.bias]
    with torch.no_grad():
        crit.logit_scale.fill_(10.0)
    crit.after_step(nn.Identity())
    assert crit.logit_scale.item() == pytest.approx(math.log(100.0))
    fixed = build_loss(  # a fixed t is asked for explicitly (SigLIP's own default learns it)
        LossConfig(
            name="siglip", temperature=0.2, learnable_temperature=False, siglip_bias_init=-3.0
        ),
        8,
    )
    assert fixed.temperature_parameters() == [fixed.bias] and fixed.temperature == 0.2
    with pytest.raises(LossInputError, match="takes exactly 2 views"):
        check_loss_config(LossConfig(name="siglip"), n_views=3)
    with pytest.raises(LossInputError, match="bias_init must be finite"):
        SigLIPLoss(bias_init=float("inf"))


def test_paired_cached_step_equals_the_plain_step() -> None:
    images, tokens = _global_batch(1)
    plain_model, plain_crit = PairedToy(), _criterion()
    plain_crit.forward_views(plain_model, [images, tokens]).backward()
    model, crit = PairedToy(), _criterion()
    config = Config(train=TrainConfig(micro_batch_size=3))  # 4 rows: micro-batches of 3 and 1
    cpu = torch.device("cpu")
    state = TrainState(config, cpu, model, crit, None, None, amp_policy("off", cpu))
    loss = cached_forward_backward(state, [images, tokens])
    torch.testing.assert_close(loss, plain_crit.forward_views(plain_model, [images, tokens]))
    want = _grads(plain_model, plain_crit)
    for name, got in _grads(model, crit).items():
        torch.testing.assert_close(got, want[name], msg=name)


def test_siglip_gets_the_papers_defaults_when_its_keys_are_not_set() -> None:
    """Issue 27 item 4: ``--set loss.name=siglip`` on the default loss section is SigLIP as the
    paper starts it: t = 10 (log t = log 10) and b = -10, both learned."""
    for cfg in (LossConfig(name="siglip"), load_config(None, ["loss.name=siglip"]).loss):
        assert loss_config_problems(cfg) == []
        crit = build_loss(cfg, embed_dim=8)
        assert crit.logit_scale is not None, "t must be learnable by default"
        assert crit.logit_scale.item() == pytest.approx(math.log(10.0))
        assert crit.bias.item() == -10.0
        assert crit.temperature_parameters() == [crit.logit_scale, crit.bias]
    # what the user sets is kept
    own = build_loss(LossConfig(name="siglip", temperature=0.2, learnable_temperature=False), 8)
    assert own.logit_scale is None and own.temperature == pytest.approx(0.2)
    # SigLIP's learnable default also brings its start check: t must start within the clamp
    assert (
        "loss.temperature=0.001 is below"
        in loss_config_problems(LossConfig(name="siglip", temperature=0.001))[0]
    )
    # the other losses keep theirs: temperature 0.5, fixed
    ntxent = build_loss(LossConfig(), 8)
    assert ntxent.temperature == 0.5
    clip = build_loss(LossConfig(name="symmetric"), 8)
    assert clip.temperature == 0.5 and clip.temperature_parameters() == []
    from service.losses import resolved_loss_config

    assert resolved_loss_config(LossConfig(name="siglip")).temperature == 0.1


def test_learnable_logit_scale_is_clamped_to_zero_from_below() -> None:
    """open_clip clamps log(1/T) to [0, log 100]: T never rises above 1."""
    for crit in (SymmetricInfoNCELoss(0.5, learnable_temperature=True), SigLIPLoss()):
        with torch.no_grad():
            crit.logit_scale.fill_(-2.0)  # an optimizer step pushed T to e^2
        crit.after_step(nn.Identity())
        assert crit.logit_scale.item() == 0.0 and crit.temperature == 1.0
    with pytest.raises(LossInputError, match="above 1"):
        SymmetricInfoNCELoss(2.0, learnable_temperature=True)  # would start clamped
