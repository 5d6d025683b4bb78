"""``train.max_steps``: training stops after that many optimizer steps, counted across epochs and
resumes, on every rank after the same step; the LR schedule runs over the steps the run takes;
with a time budget too, whichever limit comes first stops the run (issue 26 item 3).

The loop is driven without Ray (``run_epoch`` over in-memory batches, real DDP steps on gloo);
the e2e test (slow) runs the smoke job through ``ray job submit`` and reads MLflow.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from service.config import Config, ConfigError, LossConfig, ModelConfig, TrainConfig, load_config
from service.train import build_state, load_state, restore_training_state, training_state_dict
from service.train.checkpoint import save_state
from service.train.identity import plan_run, write_record
from service.train.optim import schedule_steps, train_config_problems
from tests._dist_utils import run_in_gloo_group

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
SMOKE = "jobs/configs/smoke-cpu.yaml"


def _config(**train) -> Config:
    settings = dict(epochs=100, global_batch_size=8, num_workers=1, lr=1e-2, lr_scaling="none")
    settings.update(train)
    return Config(
        model=ModelConfig(arch="small_cnn", width=8, proj_hidden_dim=16, proj_out_dim=8),
        loss=LossConfig(name="ntxent", temperature=0.5),
        train=TrainConfig(**settings),
    )


class Batches:
    """``steps`` batches of two random views per epoch (what ``TrainBatches.epoch`` yields)."""

    def __init__(self, steps: int, batch: int = 4) -> None:
        self.steps_per_epoch, self.batch = steps, batch

    def epoch(self, e: int):
        g = torch.Generator().manual_seed(e)
        for _ in range(self.steps_per_epoch):
            yield [torch.randn(self.batch, 3, 16, 16, generator=g) for _ in range(2)], None


@pytest.mark.parametrize(
    ("value", "needle"),
    [(0, "train.max_steps must be a positive number of optimizer steps"),
     (-3, "train.max_steps must be a positive number of optimizer steps")],
)  # fmt: skip
def test_bad_max_steps_are_named(value: int, needle: str) -> None:
    problems = train_config_problems(TrainConfig(max_steps=value))
    assert any(needle in p for p in problems), problems


def test_max_steps_types_and_good_values() -> None:
    with pytest.raises(ConfigError, match="train.max_steps must be an integer, got 2.5"):
        load_config(SMOKE, ["train.max_steps=2.5"])
    assert load_config(SMOKE, ["train.max_steps=20"]).train.max_steps == 20
    assert train_config_problems(TrainConfig(max_steps=1)) == []
    assert train_config_problems(TrainConfig(max_steps=50, time_budget_minutes=5)) == []


def _lrs(s, n: int) -> list[float]:
    lrs = []
    for _ in range(n):
        lrs.append(s.scheduler.get_last_lr()[0])
        s.scheduler.step()
    return lrs


def test_step_schedule_runs_over_max_steps() -> None:
    """epochs x steps = 400 but max_steps = 6: warmup 2 steps (0.5 epoch of 4), cosine over the
    other 4, LR 0 at step 6 (written out); past max_steps it stays 0."""
    s = build_state(
        _config(max_steps=6, warmup_epochs=0.5), torch.device("cpu"), steps_per_epoch=4,
        gather_distributed=False,
    )  # fmt: skip
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    expected = [0.5, 1.0, *cosine[:4], 0.0]
    assert _lrs(s, 7) == pytest.approx([1e-2 * f for f in expected], abs=1e-12)
    assert schedule_steps(s.config.train, 4) == 6
    # max_steps beyond the epochs: the epochs are what the run takes, the schedule too
    assert schedule_steps(_config(epochs=2, max_steps=100).train, 4) == 8


def test_with_a_budget_the_schedule_follows_whichever_limit_is_further_along() -> None:
    """Budget 1 min and max_steps 10: at step k after t seconds, progress = max(t/60, k/10)."""
    s = build_state(
        _config(max_steps=10, time_budget_minutes=1.0), torch.device("cpu"), steps_per_epoch=4,
        gather_distributed=False,
    )  # fmt: skip
    now = [0.0]
    s.clock.now = lambda: now[0]
    s.clock.resume()
    seen = []
    for k, t in enumerate([0.0, 3.0, 30.0, 33.0, 36.0, 54.0]):
        now[0] = t
        s.clock.sync()
        s.scheduler.follow_clock()
        seen.append((s.scheduler.progress, max(t / 60, k / 10)))
        s.scheduler.step()
    assert [p for p, _ in seen] == pytest.approx([e for _, e in seen])
    assert seen[1][0] == pytest.approx(0.1) and seen[2][0] == pytest.approx(0.5)  # steps; time


def test_run_stops_mid_epoch_at_max_steps_and_resumes_as_done(tmp_path: Path) -> None:
    from service.train.loop import run_epoch

    s = build_state(_config(max_steps=5), torch.device("cpu"), 3, gather_distributed=False)
    batches = Batches(steps=3)
    first = run_epoch(s, batches, None, None, tmp_path)
    assert first.steps == 3 and not s.finished
    s.epoch = 1
    second = run_epoch(s, batches, None, None, tmp_path)  # the partial epoch
    assert second.steps == 2 and s.global_step == 5 and s.finished and s.steps_done
    assert second.epoch_metrics(s)["global_step"] == 5
    save_state(tmp_path / "ckpt", training_state_dict(s))
    fresh = build_state(s.config, torch.device("cpu"), 3, gather_distributed=False)
    restore_training_state(fresh, load_state(tmp_path / "ckpt"))
    assert fresh.global_step == 5 and fresh.finished  # a resumed run at max_steps is done


def test_a_resumed_run_continues_to_max_steps(tmp_path: Path) -> None:
    from service.train.loop import run_epoch

    config = _config(max_steps=7)
    s = build_state(config, torch.device("cpu"), 3, gather_distributed=False)
    run_epoch(s, Batches(steps=3), None, None, tmp_path)
    save_state(tmp_path / "ckpt", training_state_dict(s))
    fresh = build_state(config, torch.device("cpu"), 3, gather_distributed=False)
    restore_training_state(fresh, load_state(tmp_path / "ckpt"))  # next epoch: 1
    steps = [run_epoch(fresh, Batches(steps=3), None, None, tmp_path).steps]
    fresh.epoch += 1
    steps.append(run_epoch(fresh, Batches(steps=3), None, None, tmp_path).steps)
    assert steps == [3, 1] and fresh.global_step == 7 and fresh.finished


def _ranks_stop(rank: int, world: int) -> dict:
    """Real DDP steps on gloo under a 60 s budget, rank 0's clock 10 s per step (rank 1's 25 s):
    max_steps 4 stops every rank after step 4; max_steps 9 leaves the budget first (step 6)."""
    from service.train.loop import run_epoch
    from tests.test_time_budget import FakeClock

    stops = {}
    for max_steps in (4, 9):
        torch.manual_seed(rank)
        config = _config(max_steps=max_steps, time_budget_minutes=1.0, num_workers=world)
        s = build_state(
            config, torch.device("cpu"), 50, rank=rank, world=world, wrap=DistributedDataParallel
        )
        s.clock.now = FakeClock(5.0 if rank == 0 else 12.5)  # two reads per step
        meter = run_epoch(s, Batches(steps=50, batch=4), None, None, Path("."))
        weights = torch.cat([p.detach().flatten() for p in s.model.parameters()])
        stops[max_steps] = (meter.steps, s.global_step, s.clock.exhausted, weights)
    return stops


def test_every_rank_stops_after_the_same_step_whichever_limit_first() -> None:
    r0, r1 = run_in_gloo_group(_ranks_stop, 2)
    for rank in (r0, r1):
        assert rank[4][:3] == (4, 4, False)  # max_steps first
        assert rank[9][:3] == (6, 6, True)  # the budget first (60 s / 10 s on rank 0's clock)
    assert torch.equal(r0[4][3], r1[4][3]) and torch.equal(r0[9][3], r1[9][3])


def test_a_finished_run_says_its_max_steps_are_spent(tmp_path: Path) -> None:
    from service.train.driver import _already_done
    from service.train.identity import RunPlan

    config = load_config(SMOKE, ["train.epochs=100", "train.max_steps=20"])
    done = _already_done(config, RunPlan("done", str(tmp_path), last_epoch=1))
    assert done["status"] == "already_finished" and done["epochs"] == 2
    assert "already spent its train.max_steps=20 optimizer steps" in done["message"]


def test_resume_of_a_run_at_max_steps_is_done(tmp_path: Path) -> None:
    overrides = [f"train.storage_path={tmp_path}", "train.run_name=r", "train.epochs=100"]
    steps = [*overrides, "train.max_steps=20"]
    config = load_config(SMOKE, steps)
    write_record(str(tmp_path / "r"), {"mlflow_run_id": "abc", "config": config.to_dict()})
    checkpoint = tmp_path / "r" / "checkpoint_2026-01-01_00-00-00.000001"
    state = {"epoch": 1, "config": config.to_dict(), "global_step": 19}
    save_state(checkpoint, state)
    resumed = load_config(SMOKE, [*steps, "train.resume=true"])
    assert plan_run(resumed).kind == "resume"  # one step left
    save_state(checkpoint, {**state, "global_step": 20})
    assert plan_run(resumed).kind == "done"
    more = load_config(SMOKE, [*overrides, "train.max_steps=40", "train.resume=true"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        plan_run(more)  # it shapes the LR schedule: a training key


@pytest.mark.slow
def test_max_steps_mid_epoch_through_ray(ray_cluster, mlflow_server, tmp_path) -> None:
    """The smoke job at 4 steps an epoch with max_steps 6: it stops after step 2 of epoch 2,
    that partial epoch is monitored, checkpointed and logged once; MLflow has global_step 6."""
    from mlflow import MlflowClient

    from tests.cluster import last_json_line

    overrides = [
        "data.limit=512", "train.global_batch_size=128", "eval.knn_max_train=500",
        "train.epochs=100", "train.max_steps=6", "eval.knn_every_epochs=100",
        "train.run_name=max-steps", f"train.storage_path={tmp_path}",
        f"mlflow.tracking_uri={mlflow_server.url}", "mlflow.experiment=max-steps",
        "mlflow.registered_model_name=null", "data.test=null",  # tested elsewhere: time
    ]  # fmt: skip
    sets = [arg for o in overrides for arg in ("--set", o)]
    ray_cluster.submit(["python", "jobs/pretrain.py", "--config", SMOKE, *sets], "max-steps")
    status, logs = ray_cluster.wait("max-steps")
    assert status == "SUCCEEDED", logs[-4000:]
    summary = last_json_line(logs)
    assert summary["global_step"] == 6 and summary["epochs"] == 2, summary
    history = load_state(summary["checkpoint"])["history"]
    assert [(h["epoch"], h["global_step"]) for h in history] == [(0, 0), (1, 4), (2, 6)]
    assert "knn_top1" in history[-1]  # the partial epoch is monitored like a last epoch
    client = MlflowClient(mlflow_server.url)
    tags = client.get_run(summary["run_id"]).data.tags
    assert (tags["global_step"], tags["epoch"]) == ("6", "2")
    assert [m.step for m in client.get_metric_history(summary["run_id"], "train_loss")] == [4, 6]


def test_a_sweep_trial_that_reaches_max_steps_has_completed() -> None:
    from service.tune.progress import TrialLines
    from service.tune.summary import classify

    assert classify(None, 2, 100, global_step=20, max_steps=20) == "completed"
    assert classify(None, 1, 100, global_step=17, max_steps=20) == "stopped_early"
    lines = TrialLines("knn_top1", 100, max_steps=20)
    end = lines.end_line("t1", {"epochs_completed": 2, "global_step": 20, "knn_top1": 0.3}, False)
    assert end.startswith("trial t1 completed after 2 epoch(s)")


def test_the_progress_line_counts_no_more_steps_than_max_steps_left() -> None:
    from service.train.epoch import StepProgress

    ticks = iter([0.0, 12.0, 12.0, 24.0])
    p = StepProgress(epochs=1000, steps_per_epoch=40, clock=lambda: next(ticks))
    p.start_epoch(0)
    line = p.update(epoch_step=20, loss=5.0, images=2560, steps_left=30)
    assert line.endswith("ETA epoch 0:12 run 0:18")  # 30 steps at 0.6 s, not 999 epochs
