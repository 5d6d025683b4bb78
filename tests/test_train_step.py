"""``service.train.train_step`` on CPU, without Ray: the real step against a hand-written one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from service.config import Config, LossConfig, ModelConfig, TrainConfig
from service.models import unwrap
from service.train import (
    NonFiniteLossError,
    build_state,
    restore_training_state,
    train_step,
    training_state_dict,
)


def _config(loss: str = "ntxent", **train) -> Config:
    return Config(
        model=ModelConfig(arch="small_cnn", proj_hidden_dim=32, proj_out_dim=16),
        loss=LossConfig(name=loss, temperature=0.5, moco_queue_size=32),
        train=TrainConfig(
            global_batch_size=8, num_workers=1, lr=1e-2, lr_scaling="none", epochs=1, **train
        ),
    )


def _views(seed: int = 0, b: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)]


def _reference_ntxent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent written out: 2B anchors, the other view is the positive."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(sim, target)


def test_step_equals_hand_written_simclr_step() -> None:
    torch.manual_seed(0)
    config = _config(grad_clip_norm=None, optimizer="sgd")  # SGD: the update is linear in grads
    state = build_state(config, torch.device("cpu"), steps_per_epoch=4, gather_distributed=False)
    model = copy.deepcopy(unwrap(state.model))
    optimizer = torch.optim.SGD(
        [
            {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 1e-6},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=1e-2,
        momentum=0.9,
        nesterov=True,
    )
    views = _views()
    loss = train_step(state, views)

    z1, z2 = model(torch.cat(views)).chunk(2)
    expected = _reference_ntxent(z1, z2, 0.5)
    optimizer.zero_grad()
    expected.backward()
    # warmup 0 → the first step runs at the peak LR (factor 1), like the scheduler's step 0
    optimizer.step()

    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert state.global_step == 1 and state.epoch_step == 1
    for (name, got), want in zip(
        unwrap(state.model).state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_first_loss_is_near_log_candidates() -> None:
    """Seeds §7.4: a fresh encoder's first loss is ~log(2B-1); the loss owns the formula."""
    torch.manual_seed(0)
    state = build_state(_config(), torch.device("cpu"), 4, gather_distributed=False)
    expected = state.criterion.expected_initial_loss(2, 8)
    assert expected == pytest.approx(math.log(15))
    assert abs(train_step(state, _views()) - expected) / expected < 0.25


def test_nan_drill_stops_naming_the_step() -> None:
    config = _config()
    config.fault.nan_at_step = 1
    state = build_state(config, torch.device("cpu"), 4, gather_distributed=False)
    train_step(state, _views(0))
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1 \(global step 1\)"):
        train_step(state, _views(1))


def test_moco_step_updates_key_encoder_and_queue_and_resumes_exactly() -> None:
    """MoCo's parts (key encoder EMA, queue) live in the loss: a checkpoint taken after one step
    and restored into a fresh state continues exactly like the uninterrupted state."""
    torch.manual_seed(0)
    config = _config("moco")
    state = build_state(config, torch.device("cpu"), 4, gather_distributed=False)
    key_before = copy.deepcopy(state.criterion.state_dict())
    train_step(state, _views(0))
    after = state.criterion.state_dict()
    changed = [k for k in after if not torch.equal(after[k], key_before[k])]
    assert any("key" in k for k in changed), changed  # EMA moved the key encoder
    assert any("queue" in k for k in changed), changed  # the keys were enqueued

    saved = copy.deepcopy(training_state_dict(state))
    torch.manual_seed(1)
    fresh = build_state(config, torch.device("cpu"), 4, gather_distributed=False)
    restore_training_state(fresh, saved)
    assert fresh.epoch == 1 and fresh.global_step == 1
    fresh.epoch, fresh.epoch_step = state.epoch, state.epoch_step  # same position in the epoch
    assert train_step(fresh, _views(1)) == pytest.approx(train_step(state, _views(1)), rel=1e-6)
