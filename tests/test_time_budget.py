"""Time-budgeted training (``train.time_budget_minutes``): the LR schedule follows training time,
every rank stops after the same step on rank 0's clock, and resume continues the budget.

Clocks are fake (injected ``TrainClock.now``), so nothing here sleeps or depends on timing.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from service.config import Config, LossConfig, ModelConfig, TrainConfig, load_config
from service.train import (
    TrainClock,
    build_state,
    load_state,
    restore_training_state,
    train_step,
    training_state_dict,
)
from service.train.checkpoint import save_state
from service.train.identity import plan_run, write_record
from service.train.optim import scaled_lr, train_config_problems
from tests._dist_utils import run_in_gloo_group

BUDGET_MIN, WARMUP = 1.0, 0.25
# The schedule tests step the scheduler alone (no optimizer step): torch warns about the order.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")


def _config(**train) -> Config:
    settings = dict(
        time_budget_minutes=BUDGET_MIN, warmup_fraction=WARMUP, epochs=1000,
        global_batch_size=8, num_workers=1, lr=1e-2, lr_scaling="none",
    )  # fmt: skip
    settings.update(train)
    return Config(
        model=ModelConfig(arch="small_cnn", proj_hidden_dim=32, proj_out_dim=16),
        loss=LossConfig(name="ntxent", temperature=0.5),
        train=TrainConfig(**settings),
    )


def _reference_lr(peak: float, elapsed_s: float) -> float:
    """Warmup over the first 25% of the budget, from 1% of the peak (its ramp read 1% of the
    warmup ahead), then cosine to 0 at the budget (written out)."""
    p = min(1.0, elapsed_s / (60 * BUDGET_MIN))
    if p < WARMUP:
        return peak * min(1.0, p / WARMUP + 0.01)
    return peak * 0.5 * (1 + math.cos(math.pi * (p - WARMUP) / (1 - WARMUP)))


class FakeClock:
    """Advances by the next of ``steps`` (cycled) on every read."""

    def __init__(self, *steps: float) -> None:
        self.t, self.steps, self.reads = 0.0, steps, 0

    def __call__(self) -> float:
        self.t += self.steps[self.reads % len(self.steps)]
        self.reads += 1
        return self.t


def test_lr_follows_training_time_not_steps() -> None:
    """Irregular step durations: the LR after each step is the schedule at the time fraction."""
    s = build_state(_config(), torch.device("cpu"), steps_per_epoch=4, gather_distributed=False)
    peak = scaled_lr(s.config.train)
    s.clock.now = FakeClock(0.0, 2.0, 9.0, 4.0, 13.0)
    s.clock.resume()
    seen = []
    for _ in range(12):
        s.scheduler.step()  # what train_step does after the optimizer step
        seen.append((s.scheduler.get_last_lr()[0], _reference_lr(peak, s.clock.elapsed_s)))
        s.clock.sync()
    assert [lr for lr, _ in seen] == pytest.approx([ref for _, ref in seen], abs=1e-12)
    assert s.clock.exhausted and s.clock.progress == 1.0
    s.scheduler.step()
    assert s.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # cosine reached 0


def test_each_step_trains_at_the_lr_of_the_clock_at_its_start() -> None:
    """Issue 27 (minor): with warmup, the first two steps trained at LR 0 and every step at the
    LR of the step before's clock. Now the LR a step's optimizer uses is the schedule at the
    clock's value when that step starts (irregular steps, a controlled clock), the first one
    above 0."""
    s = build_state(_config(), torch.device("cpu"), steps_per_epoch=100, gather_distributed=False)
    peak = scaled_lr(s.config.train)
    now = [0.0]
    s.clock.now = lambda: now[0]
    used: list[float] = []  # the LR in the optimizer when it steps
    s.optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    starts = [0.0, 3.0, 11.0, 14.0, 19.0, 40.0]  # step k runs from starts[k] for 2 s
    s.clock.resume()
    for k, start in enumerate(starts):
        now[0] = start  # its batch has arrived: step k starts
        g = torch.Generator().manual_seed(k)
        train_step(s, [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)])
        now[0] = start + 2.0
        s.clock.sync()  # the loop's stop check after the step
    assert used[0] > 0.0
    assert used == pytest.approx([_reference_lr(peak, t) for t in starts], abs=1e-12)


def test_without_a_budget_the_schedule_counts_steps() -> None:
    s = build_state(
        _config(time_budget_minutes=None, warmup_fraction=0.0, epochs=1, warmup_epochs=0.5),
        torch.device("cpu"),
        steps_per_epoch=4,
        gather_distributed=False,
    )
    s.clock.now = FakeClock(1000.0)  # time passing changes nothing
    lrs = []
    for _ in range(4):
        s.clock.sync()
        lrs.append(s.scheduler.get_last_lr()[0])
        s.scheduler.step()
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])  # 2 warmup steps, cosine over 2
    assert not s.clock.exhausted


def _budgeted_ranks(rank: int, world: int) -> dict:
    """Real DDP steps on gloo; rank 0's clock says 10 s per step, rank 1's 25 s (alone it would
    stop after 3 steps). A budgeted step reads the clock twice: at its start (its LR) and after
    it (the stop), so each read advances half a step."""
    torch.manual_seed(rank)
    s = build_state(
        _config(global_batch_size=8, num_workers=world),
        torch.device("cpu"),
        steps_per_epoch=100,
        rank=rank,
        world=world,
        wrap=DistributedDataParallel,
    )
    s.clock.now = FakeClock(5.0 if rank == 0 else 12.5)
    s.clock.resume()
    lrs, elapsed = [], []
    for step in range(50):
        g = torch.Generator().manual_seed(100 * rank + step)
        train_step(s, [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)])
        s.clock.sync()
        lrs.append(s.scheduler.get_last_lr()[0])
        elapsed.append(s.clock.elapsed_s)
        if s.clock.exhausted:
            break
    weights = torch.cat([p.detach().flatten() for p in s.model.parameters()])
    return {"steps": s.global_step, "lrs": lrs, "elapsed": elapsed, "weights": weights}


def test_all_ranks_stop_at_the_same_step_on_rank0s_clock() -> None:
    r0, r1 = run_in_gloo_group(_budgeted_ranks, 2)
    assert r0["steps"] == r1["steps"] == 6  # 60 s budget / 10 s per step on rank 0's clock
    assert r0["elapsed"] == r1["elapsed"] == [10.0 * (i + 1) for i in range(6)]
    assert r0["lrs"] == r1["lrs"]  # the same schedule on every rank...
    assert torch.equal(r0["weights"], r1["weights"])  # ...so DDP replicas stay identical


def test_resume_restores_training_time_and_continues_the_schedule(tmp_path: Path) -> None:
    config = _config()
    s = build_state(config, torch.device("cpu"), steps_per_epoch=4, gather_distributed=False)
    s.clock.now = FakeClock(20.0)
    s.clock.resume()
    for _ in range(2):
        s.scheduler.step()
        s.clock.sync()  # 20 s, 40 s
    s.clock.pause()
    save_state(tmp_path, training_state_dict(s))

    fresh = build_state(config, torch.device("cpu"), steps_per_epoch=4, gather_distributed=False)
    restore_training_state(fresh, load_state(tmp_path))
    assert fresh.clock.elapsed_s == 40.0 and not fresh.clock.exhausted
    assert fresh.clock.remaining_s == 20.0
    fresh.clock.now = FakeClock(5.0)
    fresh.clock.resume()
    fresh.clock.sync()  # 40 s before + 5 s of this attempt
    assert fresh.clock.elapsed_s == 45.0
    fresh.scheduler.step()
    assert fresh.scheduler.get_last_lr()[0] == pytest.approx(
        _reference_lr(scaled_lr(config.train), 45.0)
    )


def test_resume_of_a_spent_budget_is_done(tmp_path: Path) -> None:
    overrides = [f"train.storage_path={tmp_path}", "train.run_name=r", "train.epochs=100"]
    budget = [*overrides, "train.time_budget_minutes=1"]
    config = load_config("jobs/configs/smoke-cpu.yaml", budget)
    write_record(str(tmp_path / "r"), {"mlflow_run_id": "abc", "config": config.to_dict()})
    checkpoint = tmp_path / "r" / "checkpoint_2026-01-01_00-00-00.000001"
    state = {"epoch": 2, "config": config.to_dict(), "train_seconds": 59.0}
    save_state(checkpoint, state)
    resumed = load_config("jobs/configs/smoke-cpu.yaml", [*budget, "train.resume=true"])
    assert plan_run(resumed).kind == "resume"  # 1 s of the budget left
    save_state(checkpoint, {**state, "train_seconds": 60.5})
    assert plan_run(resumed).kind == "done"
    longer = load_config(
        "jobs/configs/smoke-cpu.yaml",
        [*overrides, "train.time_budget_minutes=2", "train.resume=true"],
    )
    with pytest.raises(Exception, match="train.time_budget_minutes"):
        plan_run(longer)  # the budget shapes the LR schedule: a training key


@pytest.mark.parametrize(
    ("train", "needle"),
    [
        ({"time_budget_minutes": 0.0}, "train.time_budget_minutes must be a positive number"),
        ({"time_budget_minutes": -5}, "train.time_budget_minutes must be a positive number"),
        ({"time_budget_minutes": 10, "warmup_fraction": 1.0}, "train.warmup_fraction must be in"),
        ({"warmup_fraction": 0.1}, "applies to time-budgeted runs only"),
    ],
)
def test_bad_budget_settings_are_named(train: dict, needle: str) -> None:
    problems = train_config_problems(TrainConfig(**train))
    assert any(needle in p for p in problems), problems


def test_good_budget_settings_pass() -> None:
    assert train_config_problems(TrainConfig(time_budget_minutes=25, warmup_fraction=0.05)) == []


def test_clock_without_budget_counts_but_never_stops() -> None:
    clock = TrainClock(None, now=FakeClock(7.0))
    clock.resume()
    clock.sync()
    clock.pause()
    clock.sync()  # paused: evaluation time does not count
    assert clock.elapsed_s == 7.0 and not clock.exhausted and clock.remaining_s is None
    assert not clock.budgeted and TrainClock(25).budgeted  # what the loop and schedule ask
