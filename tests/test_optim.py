"""``service.train.optim``: parameter groups (a learnable temperature's own group) and the rules.

Issue 12: a learnable log-temperature sat in the no-decay group at the batch-scaled LR (LARS at
batch 4096 moved it from 2.66 to -12.7 in four steps), and the clamp inside the forward froze it
once it passed the bound. Now it has a group of its own (no weight decay, no LARS adaptation, the
unscaled base LR) and is clamped in place after each step (``SymmetricInfoNCELoss.after_step``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from service.config import (
    Config,
    ConfigError,
    LossConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from service.losses import SymmetricInfoNCELoss
from service.train import TrainClock, build_state, train_step
from service.train.optim import (
    LR_SCALINGS,
    OPTIMIZERS,
    SCHEDULES,
    build_optimizer,
    lr_schedule,
    scaled_lr,
    train_config_problems,
)

# A typical base LR per optimizer; with lr_scaling=linear at batch 4096 the model's LR is 16x.
BASE_LR = {"adamw": 1e-3, "sgd": 0.3, "lars": 0.3}
BIG_BATCH = 4096


def _train_config(optimizer: str, **kwargs) -> TrainConfig:
    return TrainConfig(
        global_batch_size=BIG_BATCH,
        num_workers=1,
        epochs=1,
        optimizer=optimizer,
        lr=BASE_LR[optimizer],
        lr_scaling="linear",
        **kwargs,
    )


def _temperature_group(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    (group,) = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    return group


# --- the temperature's own group ---------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_temperature_has_its_own_group_without_decay_at_the_base_lr(name: str) -> None:
    cfg = _train_config(name)
    model = torch.nn.Linear(4, 3)
    crit = SymmetricInfoNCELoss(0.07, learnable_temperature=True)
    optimizer = build_optimizer([model, crit], cfg)
    group = _temperature_group(optimizer, crit.logit_scale)
    assert len(group["params"]) == 1  # alone in its group
    assert group["weight_decay"] == 0.0 and group["lr"] == cfg.lr != scaled_lr(cfg)
    everything = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(everything) == len({id(p) for p in everything}) == 3  # weight, bias, τ once each
    assert _temperature_group(optimizer, model.weight)["lr"] == scaled_lr(cfg)


def test_lars_does_not_adapt_the_temperature() -> None:
    """timm's Lars adapts a group only if weight_decay != 0 or always_adapt: the first step of the
    temperature is then the plain SGD step ``-lr * grad`` (no trust ratio)."""
    cfg = _train_config("lars")
    crit = SymmetricInfoNCELoss(0.07, learnable_temperature=True)
    optimizer = build_optimizer([torch.nn.Linear(4, 3), crit], cfg)
    assert _temperature_group(optimizer, crit.logit_scale)["always_adapt"] is False
    before = crit.logit_scale.item()
    crit.logit_scale.grad = torch.tensor(0.5)
    optimizer.step()
    assert crit.logit_scale.item() == pytest.approx(before - cfg.lr * 0.5, rel=1e-6)


def test_no_temperature_group_without_a_learnable_temperature() -> None:
    optimizer = build_optimizer([torch.nn.Linear(4, 3), SymmetricInfoNCELoss(0.07)], TrainConfig())
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 1]  # weight; bias


def test_unknown_optimizer_is_refused_not_replaced_by_lars() -> None:
    with pytest.raises(ValueError, match="train.optimizer must be one of adamw|sgd|lars"):
        build_optimizer([torch.nn.Linear(4, 3)], TrainConfig(optimizer="adam"))


# --- the temperature through real training steps ----------------------------------------------


def _clip_state(optimizer: str):
    config = Config(
        model=ModelConfig(arch="small_cnn", proj_hidden_dim=32, proj_out_dim=16),
        loss=LossConfig(name="symmetric", temperature=0.07, learnable_temperature=True),
        train=_train_config(optimizer),
    )
    torch.manual_seed(0)
    return build_state(config, torch.device("cpu"), steps_per_epoch=20, gather_distributed=False)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_log_temperature_moves_smoothly_under_every_optimizer(name: str) -> None:
    """20 real steps at the LR of a 4096 batch: log-τ moves, by at most 0.1 per step, within the
    bound. Before: SGD jumped by 0.55 per step (and past the clamp), LARS by 0.13."""
    state = _clip_state(name)
    crit = state.criterion
    bound = math.log(crit.max_logit_scale)
    g = torch.Generator().manual_seed(1)
    trajectory = [crit.logit_scale.item()]
    for _ in range(20):
        x = torch.randn(8, 3, 32, 32, generator=g)
        train_step(state, [x, x + 0.1 * torch.randn(8, 3, 32, 32, generator=g)])
        trajectory.append(crit.logit_scale.item())
    steps = [abs(b - a) for a, b in zip(trajectory, trajectory[1:], strict=False)]
    assert max(steps) <= 0.1, (name, trajectory)
    assert abs(trajectory[-1] - trajectory[0]) > 1e-3, (name, trajectory)  # it learns
    assert max(trajectory) <= bound + 1e-6, (name, trajectory)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_temperature_comes_back_from_the_clamp_bound(name: str) -> None:
    """Pushed up against ``max_logit_scale``, then a gradient pointing back inside: the
    temperature leaves the bound. Before: the parameter overshot the bound, the clamp in the
    forward zeroed its gradient, and the temperature stayed frozen at 1/max_logit_scale."""
    crit = SymmetricInfoNCELoss(1 / 99.5, learnable_temperature=True, gather_distributed=False)
    optimizer = build_optimizer([crit], _train_config(name))
    bound = math.log(crit.max_logit_scale)
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.ones(8, 16) + 0.1 * torch.randn(8, 16, generator=g), dim=1)
    aligned, shifted = a, a.roll(1, dims=0)  # positives the closest pair / not the closest
    trajectory = []
    for b in [aligned] * 10 + [shifted] * 30:
        optimizer.zero_grad()
        crit(a, b).backward()
        crit.reduce_gradients()
        optimizer.step()
        crit.after_step(torch.nn.Identity())
        trajectory.append(crit.logit_scale.item())
    assert max(trajectory[:10]) == pytest.approx(bound)  # it did reach the bound
    assert max(trajectory) <= bound + 1e-6
    assert trajectory[-1] < bound - 1e-3, (name, trajectory)
    assert crit.temperature > 1.0 / crit.max_logit_scale


# --- train_config_problems ---------------------------------------------------------------------


def test_default_train_config_has_no_problems() -> None:
    assert train_config_problems(TrainConfig()) == []
    for name in OPTIMIZERS:
        for scaling in LR_SCALINGS:
            assert train_config_problems(TrainConfig(optimizer=name, lr_scaling=scaling)) == []


def test_lars_without_weight_decay_is_a_problem() -> None:
    assert train_config_problems(TrainConfig(optimizer="lars", weight_decay=0.0)) == [
        "train.optimizer=lars with train.weight_decay=0 does no layer adaptation (timm's Lars "
        "adapts only decayed groups); set weight_decay > 0, e.g. 1e-6, or use sgd"
    ]
    assert train_config_problems(TrainConfig(optimizer="sgd", weight_decay=0.0)) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"lr": 0.0}, "train.lr must be a finite number > 0, got 0.0"),
        ({"lr": -1e-3}, "train.lr must be a finite number > 0, got -0.001"),
        ({"lr": math.nan}, "train.lr must be a finite number > 0, got nan"),
        ({"lr": math.inf}, "train.lr must be a finite number > 0, got inf"),
    ],
)
def test_train_config_problems(changes: dict, expected: str) -> None:
    assert train_config_problems(TrainConfig(**changes)) == [expected]


def test_all_train_config_problems_are_reported_at_once() -> None:
    cfg = TrainConfig(optimizer="lars", weight_decay=0.0, lr=-1.0, warmup_fraction=0.5)
    assert len(train_config_problems(cfg)) == 3


def test_optimizer_and_lr_scaling_names_are_checked_with_the_config_types() -> None:
    # choice fields (Literal) are the config's types: named when the config is loaded
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.optimizer=adam", "train.lr_scaling=log"])
    assert str(info.value).splitlines()[1:] == [
        "  - train.optimizer must be one of adamw|sgd|lars, got 'adam'",
        "  - train.lr_scaling must be one of linear|sqrt|none, got 'log'",
    ]
    assert OPTIMIZERS == ("adamw", "sgd", "lars") and LR_SCALINGS == ("linear", "sqrt", "none")


# --- the LR schedule ---------------------------------------------------------------------------


def _reference_step_lr(step: int, total: int, warmup: int) -> float:
    """Warmup + cosine per step, written out: linear to the peak over ``warmup`` steps (step k
    trains at (k + 1) / warmup), then a half cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
@pytest.mark.parametrize(
    ("epochs", "steps_per_epoch", "warmup_epochs"),
    [(1, 4, 0.5), (3, 7, 0.0), (2, 10, 1.0), (1, 3, 5.0), (4, 1, 0.0)],
)
def test_step_schedule_is_warmup_then_cosine(
    epochs: int, steps_per_epoch: int, warmup_epochs: float
) -> None:
    cfg = TrainConfig(epochs=epochs, warmup_epochs=warmup_epochs, lr=1.0, lr_scaling="none")
    optimizer = build_optimizer([torch.nn.Linear(2, 2)], cfg)
    scheduler = lr_schedule(optimizer, cfg, steps_per_epoch, TrainClock())
    total = epochs * steps_per_epoch
    warmup = min(round(warmup_epochs * steps_per_epoch), total - 1)  # at least one decay step
    lrs = []
    for _ in range(total + 2):  # two past the end: stays at 0
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
    expected = [_reference_step_lr(step, total, warmup) for step in range(total + 2)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_the_schedules_are_one_registry_of_progress_functions() -> None:
    assert set(SCHEDULES) == {"warmup_cosine"}
    factor = SCHEDULES["warmup_cosine"]
    assert [factor(p, 0.2, 0.0) for p in (0.0, 0.1, 0.2, 0.6, 1.0, 1.5)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    )
