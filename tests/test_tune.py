"""Ray Tune sweeps: search-space / settings validation (no Ray), summary helpers, and one real
sweep on local Ray + MLflow (slow)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from service.config import REPO_ROOT, ConfigError, load_config
from service.tune.settings import SweepConfigError, resolve_settings, trial_base_config
from service.tune.space import SearchSpaceError, parse_space
from service.tune.summary import (
    TrialRecord,
    classify,
    curve_points,
    pick_best,
    plot_curves,
    plot_sweep,
    record_from_result,
    short_reason,
    to_markdown,
    training_minutes,
    write_csv,
)

CPU_SWEEP_25 = REPO_ROOT / "jobs/configs/cifar10-cpu-sweep-25min.yaml"
SMOKE = REPO_ROOT / "jobs" / "configs" / "tune-smoke.yaml"
CLIP_SMOKE = REPO_ROOT / "jobs" / "configs" / "clip-smoke-cpu.yaml"
# A diverged trial stops either at the loss's input check or at the loop's NaN-loss check.
NAN_REASON = re.compile(r"NonFiniteLossError|non-finite|NaN", re.IGNORECASE)


def _space(**entries):
    return {"tune.space": entries}


# --- search space ------------------------------------------------------------------------------


def test_default_space_is_temperature_and_strength() -> None:
    specs = parse_space(load_config(SMOKE))
    assert list(specs) == ["loss.temperature", "augment.strength"]
    temperature = specs["loss.temperature"]
    assert (temperature.kind, temperature.low, temperature.high) == ("loguniform", 0.05, 1.0)
    assert specs["augment.strength"].probe_values() == [0.25, 1.5]


def test_optional_keys_and_choice_parse() -> None:
    config = load_config(
        overrides=_space(
            **{
                "augment.min_scale": {"type": "uniform", "low": 0.08, "high": 0.5},
                "train.lr": {"type": "loguniform", "low": "1e-4", "high": 1.0e-2},  # YAML str
                "model.proj_out_dim": {"type": "choice", "values": [64, 128]},
            }
        )
    )
    specs = parse_space(config)
    assert specs["train.lr"].low == pytest.approx(1e-4)
    assert specs["model.proj_out_dim"].values == (64, 128)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"loss.temperature": {"type": "uniform", "low": 0.5, "high": 0.5}}, "range is empty"),
        ({"loss.temperature": {"type": "uniform", "low": 0.9, "high": 0.1}}, "inverted"),
        ({"loss.temperature": {"type": "loguniform", "low": 0.0, "high": 1.0}}, "must be > 0"),
        ({"loss.temprature": {"type": "uniform", "low": 0.1, "high": 1.0}}, "not a Config key"),
        ({"temperature": {"type": "uniform", "low": 0.1, "high": 1.0}}, "loss.temperature"),
        ({"loss.temperature": {"type": "normal", "low": 0.1, "high": 1.0}}, "type must be"),
        ({"loss.temperature": {"type": "uniform", "low": 0.1}}, "needs 'high'"),
        ({"loss.temperature": {"type": "uniform", "low": "a", "high": 1}}, "must be a number"),
        ({"loss.temperature": {"type": "uniform", "low": 0.1, "hi": 1}}, "unknown field"),
        ({"model.proj_out_dim": {"type": "uniform", "low": 64, "high": 256}}, "choice"),
        ({"train.lr": {"type": "choice", "values": []}}, "non-empty list"),
        ({"train.num_workers": {"type": "choice", "values": [1, 2]}}, "cannot be searched"),
        ({"tune.metric": {"type": "choice", "values": ["train_loss"]}}, "cannot be searched"),
        (
            {"train.time_budget_minutes": {"type": "choice", "values": [1, 2]}},
            "cannot be searched",
        ),
        # the endpoint itself is rejected by Config.validate: the sampler must never draw it
        ({"augment.min_scale": {"type": "uniform", "low": 0.1, "high": 1.5}}, "min_scale"),
        ({"loss.name": {"type": "choice", "values": ["ntxent", "infonce"]}}, "loss.name"),
        (  # a choice field (Literal) through Config.with_values' type check
            {"train.optimizer": {"type": "choice", "values": ["sgd", "adam"]}},
            "can draw 'adam': train.optimizer must be one of adamw\\|sgd\\|lars, got 'adam'",
        ),
        (  # the run's shape: a batch the workers cannot split
            {"train.global_batch_size": {"type": "choice", "values": [64, 63]}},
            "can draw 63: train.global_batch_size=63 does not divide",
        ),
    ],
)
def test_bad_space_is_rejected_with_the_key(entries: dict, message: str) -> None:
    config = load_config(overrides=_space(**entries))
    with pytest.raises(SearchSpaceError, match=message) as info:
        parse_space(config)
    assert isinstance(info.value, ConfigError)  # the CLI prints these as config errors (exit 2)
    assert next(iter(entries)) in str(info.value)


def test_empty_space_is_rejected() -> None:
    with pytest.raises(SearchSpaceError, match="at least one"):
        parse_space(load_config(overrides={"tune.space": {}}))


# --- sweep settings ----------------------------------------------------------------------------


def test_settings_resource_math() -> None:
    config = load_config(
        SMOKE, {"tune.max_concurrent_trials": 3, "train.num_workers": 2, "train.cpus_per_worker": 2}
    )
    settings = resolve_settings(config, num_samples=8)
    res = settings.resources
    assert (res.concurrent_trials, res.workers_per_trial, res.cpus_per_worker) == (3, 2, 2.0)
    assert res.cpus_needed == 3 * 2 * 2 and res.gpus_needed == 0
    # never more concurrent trials than there are trials
    assert resolve_settings(config, num_samples=2).resources.concurrent_trials == 2
    gpu = resolve_settings(load_config(SMOKE, {"train.use_gpu": True, "train.num_workers": 4}))
    assert gpu.resources.gpus_needed == 4


def test_settings_defaults_and_paths(tmp_path: Path) -> None:
    config = load_config(SMOKE, {"train.storage_path": str(tmp_path), "train.run_name": "abc"})
    settings = resolve_settings(config)
    assert settings.name == "abc-sweep"
    assert settings.experiment_path == tmp_path / "abc-sweep"
    assert (settings.metric, settings.mode, settings.num_samples) == ("knn_top1", "max", 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tune.metric": "accuracy"}, "never reported"),
        # mode max would pick the worst
        ({"tune.metric": "train_loss", "tune.mode": "max"}, "use tune.mode=min"),
        ({"tune.grace_period_epochs": 4}, "grace_period_epochs"),
        ({"tune.grace_period_epochs": 0}, "grace_period_epochs"),
        ({"tune.reduction_factor": 1}, "reduction_factor"),
        ({"tune.max_concurrent_trials": 0}, "max_concurrent_trials"),
        ({"tune.num_samples": 0}, "num_samples"),
        ({"tune.time_budget_minutes": 0}, "time_budget_minutes must be > 0"),
    ],
)
def test_bad_settings_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(SweepConfigError, match=message):
        resolve_settings(load_config(SMOKE, overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tune.mode": "maximize"}, "tune.mode must be one of min|max, got 'maximize'"),
        ({"tune.search": "bayes"}, "tune.search must be one of random|optuna, got 'bayes'"),
    ],
)
def test_bad_choices_are_rejected_when_the_config_loads(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:  # choice fields are the config's (Literal) types
        load_config(SMOKE, overrides)
    assert str(info.value) == message


def test_without_labels_the_sweep_optimises_the_loss() -> None:
    # without labels the registry's champion metric cannot be kNN either
    config = load_config(
        SMOKE, {"data.val": None, "data.val_fraction": 0, "mlflow.champion_metric": "train_loss"}
    )
    settings = resolve_settings(config)
    assert (settings.metric, settings.mode) == ("train_loss", "min")


def test_trial_config_reports_knn_every_epoch() -> None:
    config = load_config(SMOKE, {"eval.knn_every_epochs": 2})
    assert trial_base_config(config, resolve_settings(config)).eval.knn_every_epochs == 1


def test_the_sweep_metric_follows_the_runs_monitor() -> None:
    """Issue 27 item 6: an image–text run reports val_* metrics, never knn_top1; by default the
    sweep optimises what the run's monitor reports (its headline metric)."""
    settings = resolve_settings(load_config(CLIP_SMOKE))
    assert (settings.metric, settings.mode) == ("val_zeroshot_top1", "max")
    recall = resolve_settings(load_config(CLIP_SMOKE, {"tune.metric": "val_t2i_recall_at_5"}))
    assert (recall.metric, recall.mode) == ("val_t2i_recall_at_5", "max")
    image_only = resolve_settings(load_config(SMOKE, {"tune.metric": None, "tune.mode": None}))
    assert (image_only.metric, image_only.mode) == ("knn_top1", "max")


def test_without_class_names_the_image_text_sweep_optimises_recall(tmp_path: Path) -> None:
    """Zero-shot needs labelled validation rows with class names; recall needs captions only."""
    import pyarrow.parquet as pq

    table = pq.read_table(load_config(CLIP_SMOKE).data.train).slice(0, 300)
    pq.write_table(table.drop_columns(["label", "label_name"]), tmp_path / "captions.parquet")
    config = load_config(CLIP_SMOKE, {"data.train": str(tmp_path / "captions.parquet")})
    assert resolve_settings(config).metric == "val_i2t_recall_at_5"


@pytest.mark.parametrize(
    ("path", "overrides", "reported"),
    [
        (CLIP_SMOKE, {"tune.metric": "knn_top1"}, "val_zeroshot_top1"),
        (
            SMOKE,
            {"data.val_fraction": 0, "mlflow.champion_metric": "train_loss"},
            "['images_per_s', 'train_loss']",
        ),
    ],
)
def test_a_metric_the_monitor_does_not_report_is_refused(path, overrides, reported) -> None:
    with pytest.raises(SweepConfigError) as info:
        resolve_settings(load_config(path, {"tune.metric": "knn_top1", **overrides}))
    message = str(info.value)
    assert "tune.metric='knn_top1' is never reported by this run" in message, message
    assert reported in message, message


def test_the_image_text_sweep_refuses_knn_top1_with_exit_2_before_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from service import cli

    before = ray.is_initialized()
    args = ["tune", "--config", str(CLIP_SMOKE), "--num-samples", "2"]
    sets = [f"train.storage_path={tmp_path}", "train.epochs=1", "tune.metric=knn_top1"]
    assert cli.main([*args, *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert "tune.metric='knn_top1' is never reported by this run" in err
    assert "val_zeroshot_top1" in err and "Traceback" not in err
    assert ray.is_initialized() == before


def test_trial_config_reports_the_image_text_monitor_every_epoch() -> None:
    config = load_config(CLIP_SMOKE, {"eval.knn_every_epochs": 3})
    assert trial_base_config(config, resolve_settings(config)).eval.knn_every_epochs == 1


def test_bad_input_fails_before_ray_starts(tmp_path: Path) -> None:
    import ray

    from service.commands import tune_command

    before = ray.is_initialized()
    bad = [f"train.storage_path={tmp_path}", "tune.metric=accuracy"]
    with pytest.raises(SweepConfigError, match="never reported"):
        tune_command(SMOKE, bad, num_samples=2)
    with pytest.raises(SweepConfigError, match="nothing to resume"):
        tune_command(SMOKE, [f"train.storage_path={tmp_path}"], resume=True)
    assert ray.is_initialized() == before  # no Ray was started for a sweep that cannot run


# --- summary -----------------------------------------------------------------------------------


def test_classify_outcomes() -> None:
    assert classify(None, 3, 3) == "completed"
    assert classify(None, 1, 3) == "stopped_early"
    assert classify(RuntimeError("nan"), 2, 3) == "failed"
    assert classify(None, 0, 3) == "failed"  # returned without ever reporting
    # Under a time budget a trial that spent its budget is complete whatever its epoch count.
    assert classify(None, 7, 100, train_minutes=4.01, budget_minutes=4.0) == "completed"
    assert classify(None, 2, 100, train_minutes=1.5, budget_minutes=4.0) == "stopped_early"


def test_time_budgeted_sweeps_rung_on_training_minutes() -> None:
    # Epoch milestones are unequal training under a budget (small crops run more epochs per
    # minute), so ASHA's axis becomes train_minutes, which every epoch reports.
    budget = {"train.time_budget_minutes": 4.0, "train.epochs": 100}
    settings = resolve_settings(load_config(SMOKE, budget))
    assert (settings.time_attr, settings.grace_period) == ("train_minutes", 1.0)  # 4 / 2**2
    assert settings.max_t > 4.0 and settings.budget_minutes == 4.0
    explicit = resolve_settings(load_config(SMOKE, {**budget, "tune.grace_period_minutes": 2}))
    assert explicit.grace_period == 2.0
    with pytest.raises(SweepConfigError, match="grace_period_minutes must be in"):
        resolve_settings(load_config(SMOKE, {**budget, "tune.grace_period_minutes": 5}))
    plain = resolve_settings(load_config(SMOKE))
    assert (plain.time_attr, plain.grace_period, plain.max_t) == ("epochs_completed", 1, 4)


def test_short_reason_finds_the_error_line() -> None:
    text = (
        "Training failed due to worker errors:\nTraceback (most recent call last):\n"
        '  File "loop.py", line 1\nservice.train.loop.NonFiniteLossError: loss became nan at '
        "epoch 0, step 3\n"
    )
    assert short_reason(RuntimeError(text)).startswith("service.train.loop.NonFiniteLossError")


def _rec(tid, outcome, temperature, metric, epochs=3, error=""):
    params = {"loss.temperature": temperature, "augment.strength": 0.5}
    return TrialRecord(tid, outcome, params, epochs, metric, 5.0, error=error)


def test_pick_best_prefers_fully_trained_trials() -> None:
    records = [
        _rec("a", "completed", 0.1, 0.40),
        _rec("b", "completed", 0.2, 0.45),
        _rec("c", "stopped_early", 0.9, 0.60, epochs=1),  # higher, but after one epoch only
        _rec("d", "failed", 0.01, None, epochs=0, error="NonFiniteLossError"),
    ]
    assert pick_best(records, "max").trial_id == "b"
    assert pick_best(records, "min").trial_id == "a"
    assert pick_best(records[2:], "max").trial_id == "c"
    assert pick_best(records[3:], "max") is None


def test_record_from_tune_result() -> None:
    result = SimpleNamespace(
        metrics={
            "trial_id": "t7",
            "epochs_completed": 2,
            "knn_top1": 0.31,
            "train_loss": 5.2,
            "checkpoint_path": "/x/ckpt",
        },
        config={"loss.temperature": 0.3, "augment.strength": 1.1},
        error=None,
        metrics_dataframe=pd.DataFrame(
            {
                "epoch": [0, 1],
                "train_loss": [5.4, 5.2],
                "knn_top1": [0.25, 0.31],
                "time_this_iter_s": [3.0, 3.1],  # Tune's own columns are not epoch metrics
            }
        ),
    )
    specs = parse_space(load_config(SMOKE))
    rec = record_from_result(result, specs, "knn_top1", max_epochs=3)
    assert rec.history == [0.25, 0.31]
    assert rec.epochs[1] == {"epoch": 1.0, "train_loss": 5.2, "knn_top1": 0.31}
    assert (rec.trial_id, rec.outcome, rec.metric, rec.checkpoint) == (
        "t7",
        "stopped_early",
        0.31,
        "/x/ckpt",
    )
    nan = SimpleNamespace(metrics={"trial_id": "t8", "knn_top1": math.nan}, config={}, error=None)
    assert record_from_result(nan, specs, "knn_top1", 3).metric is None


def test_table_and_figure(tmp_path: Path) -> None:
    records = [
        _rec("a", "completed", 0.1, 0.40),
        _rec("b", "stopped_early", 0.5, 0.30, epochs=1),
        _rec("c", "failed", 0.05, None, epochs=0, error="boom | bad"),
    ]
    md = to_markdown(records, "knn_top1").splitlines()
    assert md[0].startswith("| trial_id | outcome | loss.temperature | augment.strength |")
    assert [line.split("|")[1].strip() for line in md[2:]] == ["a", "b", "c"]
    assert "boom \\| bad" in md[-1]
    csv_text = write_csv(records, "knn_top1", tmp_path / "s.csv").read_text().splitlines()
    assert csv_text[1].startswith("a,completed,0.1,0.5,3,0.4,5,")
    specs = parse_space(load_config(SMOKE))
    png = plot_sweep(records, specs, "knn_top1", tmp_path / "s.png", best=records[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- placement-group janitor ------------------------------------------------------------------


def _pg(state: str, creator: bytes, dead: bool, job: str = "01000000", detached: bool = False):
    from ray.core.generated import gcs_pb2

    data = gcs_pb2.PlacementGroupTableData
    return data(
        state=data.PlacementGroupState.Value(state),
        creator_actor_id=creator,
        creator_actor_dead=dead,
        creator_job_id=bytes.fromhex(job),
        is_detached=detached,
    )


def test_janitor_only_takes_groups_of_dead_actors_of_this_job() -> None:
    from service.tune.cleanup import is_orphaned

    controller = bytes.fromhex("757d10a022fa1c5561dbea1401000000")
    assert is_orphaned(_pg("CREATED", controller, dead=True), "01000000")
    assert is_orphaned(_pg("PENDING", controller, dead=True), "01000000")
    assert not is_orphaned(_pg("CREATED", controller, dead=False), "01000000")  # still running
    assert not is_orphaned(_pg("REMOVED", controller, dead=True), "01000000")
    assert not is_orphaned(_pg("CREATED", controller, dead=True, job="02000000"), "01000000")
    assert not is_orphaned(_pg("CREATED", controller, dead=True, detached=True), "01000000")
    # Tune's own per-trial groups are created by the driver: nil creator, reported "dead"
    assert not is_orphaned(_pg("CREATED", b"\xff" * 16, dead=True), "01000000")


def _actor(state: str, job: str = "01000000", detached: bool = False):
    from ray.core.generated import gcs_pb2

    data = gcs_pb2.ActorTableData
    return data(state=data.ActorState.Value(state), job_id=bytes.fromhex(job), is_detached=detached)


def test_exit_barrier_waits_for_non_detached_actors_of_this_job() -> None:
    from service.tune.cleanup import is_lingering

    for state in ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "ALIVE", "RESTARTING"):
        assert is_lingering(_actor(state), "01000000"), state
    assert not is_lingering(_actor("DEAD"), "01000000")
    assert not is_lingering(_actor("ALIVE", job="02000000"), "01000000")  # someone else's job
    # Ray Train's placement-group cleaner / state actor are detached and outlive every trial
    assert not is_lingering(_actor("ALIVE", detached=True), "01000000")


def test_exit_barrier_returns_once_the_trials_actors_are_gone(monkeypatch) -> None:
    import ray

    from service.tune import cleanup

    polls = iter([{"old": "Keep"}, {"old": "Keep", "w": "RayTrainWorker"}, {"old": "Keep"}])
    seen = []
    monkeypatch.setattr(cleanup, "lingering_actors", lambda job: seen.append(job) or next(polls))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_job_id=lambda: "j"))
    barrier = cleanup.TrialExitBarrier(timeout_s=60, poll_s=0.0)
    barrier.setup()  # "old" was alive before the experiment: not waited for
    barrier.on_experiment_end([])
    assert seen == ["j"] * 3  # polled until only the pre-existing actor was left


# --- a real sweep (local Ray + MLflow) ---------------------------------------------------------

# Each trial's role is fixed by what it samples, not by how well it trains, so ASHA's cut does not
# hinge on a near tie: lr 1e30 overflows the weights (NaN: that trial fails alone, the sweep goes
# on); a kNN memory bank of one image predicts that image's class for every query, which scores
# that class's share of the validation split (~0.1 of 10 classes) whatever the encoder, far below
# a 512-image bank (>= 0.25 even at random init). ASHA (grace 1 epoch, reduction factor 2) stops
# a trial whose epoch-1 kNN is below the median recorded there before it. The random searcher is
# seeded by train.seed; seed 2 draws (lr, bank) in this order -> the outcome each must have.
# Two trials run at a time: the first two start together; the third starts only once the first
# has failed (its second step is NaN), after which it needs a whole trial start-up plus the epoch
# the second trial is already in, so the completed trial's epoch-1 kNN is recorded before the
# third trial's and ASHA cuts the third.
SWEEP_SEED = 2
SWEEP_DRAWS = [
    ((1.0e30, 512), "failed"),
    ((0.002, 512), "completed"),  # nothing recorded before it: never cut
    ((0.002, 1), "stopped_early"),  # 0.1 < the completed trial's epoch-1 kNN
]


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path: Path, ray_cluster, mlflow_server) -> None:
    """`ray job submit ... python jobs/tune.py` on the session's real Ray cluster (two nodes): 3
    trials of one worker each, two at a time, 2 epochs, ASHA from epoch 1 (see SWEEP_DRAWS);
    the first two trials run at the same time, every trial trains on the driver's one decoded
    copy of the training rows (object store); MLflow holds the parent + nested runs with the
    searched params and final statuses, and the best trial's encoder is registered.

    Timing cannot change an outcome: outcomes and epoch counts are Tune's records (the reports it
    acted on, the trial's error), and the driver writes every run's final status only after the
    trials' processes have exited (TrialExitBarrier). What timing can change is how far a stopped
    trial got before it was killed: its run may hold one more epoch than Tune acted on."""
    from mlflow import MlflowClient

    from service.commands import tune_command
    from tests.cluster import last_json_line

    uri = mlflow_server.url
    overrides = [
        f"mlflow.tracking_uri={uri}",
        "mlflow.experiment=tune-test",
        "mlflow.registered_model_name=tune-test-encoder",
        f"train.storage_path={tmp_path / 'ray'}",
        "train.run_name=t",
        f"train.seed={SWEEP_SEED}",
        "data.limit=512",
        "train.global_batch_size=128",
        "train.epochs=2",
        "train.warmup_epochs=0",
        "eval.knn_k=20",
        "tune.grace_period_epochs=1",
        "tune.reduction_factor=2",
        "train.num_workers=1",
        "tune.max_concurrent_trials=2",
        "tune.space={train.lr: {type: choice, values: [0.002, 1.0e+30]}, "
        "eval.knn_max_train: {type: choice, values: [512, 1]}}",
    ]
    sets = [arg for o in overrides for arg in ("--set", o)]
    args = ["--config", str(SMOKE.relative_to(REPO_ROOT)), "--num-samples", "3", *sets]
    ray_cluster.submit(["python", "jobs/tune.py", *args], "tune-sweep")
    status, logs = ray_cluster.wait("tune-sweep", timeout=2400)
    assert status == "SUCCEEDED", logs[-6000:]
    summary = last_json_line(logs)
    print(logs[-20000:])

    trials = sorted(summary["trials"], key=lambda t: t["trial_id"])  # ids count up in start order
    drawn = [(t["params"]["train.lr"], t["params"]["eval.knn_max_train"]) for t in trials]
    assert drawn == [d for d, _ in SWEEP_DRAWS], "the seeded searcher drew other values"
    assert [t["outcome"] for t in trials] == [o for _, o in SWEEP_DRAWS], trials
    failed, completed, stopped = trials
    assert NAN_REASON.search(failed["error"]), failed["error"]
    assert (completed["epochs"], stopped["epochs"]) == (2, 1)  # ASHA acted on epoch 1's report
    # one class for every query vs a real bank: chance level, far below the completed trial
    assert stopped["knn_top1"] < 0.15 < 0.2 < completed["knn_top1"], (stopped, completed)
    assert summary["best_trial_id"] == completed["trial_id"]
    assert summary["best_config"] == completed["params"]
    counts = [summary[f"num_{o}"] for o in ("completed", "stopped_early", "failed")]
    assert counts == [1, 1, 1]
    assert summary["resources"]["concurrent_trials"] == 2
    # One decoded copy for every trial: the driver put it in the object store, and each trial's
    # worker mapped it instead of decoding (service.data.decoded.load_shared checked its rows).
    assert "[tune] data: one decoded copy for every trial: 512 rows" in logs, logs[-6000:]
    assert "[data] shared decoded copy from the driver: 512 rows" in logs, logs[-6000:]

    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/sweep_summary.csv", "sweep/sweep_summary.md", "sweep/sweep.png",
            "sweep/sweep_curves.png"} <= artifacts  # fmt: skip
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert len(children) == 3
    # The first two trials (started together; the NaN one ends after its second step) ran at the
    # same time: each run's MLflow span [start, end] overlaps the other's.
    spans = {c.data.tags["tune_trial_id"]: (c.info.start_time, c.info.end_time) for c in children}
    (start_a, end_a), (start_b, end_b) = spans[failed["trial_id"]], spans[completed["trial_id"]]
    assert start_a < end_b and start_b < end_a, spans
    by_trial = {t["trial_id"]: t for t in trials}
    for child in children:
        trial = by_trial[child.data.tags["tune_trial_id"]]
        assert float(child.data.params["train.lr"]) == trial["params"]["train.lr"]
        assert int(child.data.params["eval.knn_max_train"]) == trial["params"]["eval.knn_max_train"]
        expected = "FAILED" if trial["outcome"] == "failed" else "FINISHED"
        assert (child.info.status, child.data.tags["tune_outcome"]) == (expected, trial["outcome"])
        if trial["outcome"] == "failed":
            assert NAN_REASON.search(child.data.tags["tune_error"])
            continue
        assert "tune_error" not in child.data.tags
        # Every epoch Tune acted on is in the run exactly once (logged by rank 0, or by the
        # driver's backfill when ASHA stopped the trial on that very report); a stopped trial
        # may also hold the epoch it was in when it was stopped.
        # Steps are global steps: 0 is the random-init kNN (epoch 0), then one per trained epoch.
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "knn_top1"))
        assert steps[0] == 0 and len(set(steps)) == len(steps), (trial, steps)
        assert trial["epochs"] <= len(steps) - 1 <= 2, (trial, steps)
        if trial["outcome"] == "completed":
            assert len(steps) == 3, (trial, steps)

    version = client.get_model_version_by_alias("tune-test-encoder", "latest-trained")
    assert version.run_id == summary["best_run_id"]
    assert summary["model_uri"]

    # --resume on the finished sweep re-reads it: same parent run, same best, nothing registered
    # twice (a resume after a driver crash goes through the same path; see docs/benchmarks.md).
    ray_cluster.submit(["python", "jobs/tune.py", *args, "--resume"], "tune-sweep-resume")
    status, logs = ray_cluster.wait("tune-sweep-resume", timeout=1200)
    assert status == "SUCCEEDED", logs[-6000:]
    again = last_json_line(logs)
    assert again["parent_run_id"] == summary["parent_run_id"]
    assert again["best_trial_id"] == summary["best_trial_id"]
    assert again["model_uri"] == summary["model_uri"]
    assert sorted((t["trial_id"], t["outcome"]) for t in again["trials"]) == sorted(
        (t["trial_id"], t["outcome"]) for t in trials
    )
    assert len(client.search_model_versions("name='tune-test-encoder'")) == 1

    # Starting the same sweep again without --resume is refused before Ray is touched.
    with pytest.raises(ConfigError, match="already exists"):
        tune_command(SMOKE, overrides, num_samples=3)


@pytest.mark.slow
def test_image_text_sweep_end_to_end(tmp_path: Path, ray_cluster, mlflow_server) -> None:
    """Issue 27 item 6, the user's command: `contrastive tune --config clip-smoke-cpu.yaml
    --num-samples 2 --set train.epochs=1` (here through `ray job submit`, scaled down: 256 rows,
    one worker per trial, both trials at once, 100 validation rows, nothing registered) completes
    and optimises the image–text monitor's val_zeroshot_top1, which every trial reports."""
    from mlflow import MlflowClient

    from tests.cluster import last_json_line

    overrides = [
        f"mlflow.tracking_uri={mlflow_server.url}",
        "mlflow.experiment=tune-clip-test",
        "mlflow.registered_model_name=null",
        f"train.storage_path={tmp_path / 'ray'}",
        "train.run_name=clip",
        "train.epochs=1",
        "data.limit=256",
        "train.global_batch_size=64",
        "train.num_workers=1",
        "eval.knn_max_train=100",
        "tune.max_concurrent_trials=2",
    ]
    sets = [arg for o in overrides for arg in ("--set", o)]
    args = ["--config", str(CLIP_SMOKE.relative_to(REPO_ROOT)), "--num-samples", "2", *sets]
    ray_cluster.submit(["python", "jobs/tune.py", *args], "tune-clip-sweep")
    status, logs = ray_cluster.wait("tune-clip-sweep", timeout=900)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "TuneError" not in logs and "did not include the specified metric" not in logs
    summary = last_json_line(logs)
    assert (summary["metric"], summary["mode"]) == ("val_zeroshot_top1", "max")
    assert (summary["num_trials"], summary["num_completed"]) == (2, 2), summary["trials"]
    scores = [t["val_zeroshot_top1"] for t in summary["trials"]]
    assert all(0.0 <= x <= 1.0 for x in scores) and summary["best_metric"] == max(scores)

    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.params["sweep.metric"] == "val_zeroshot_top1"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    assert all("val_zeroshot_top1" in c.data.metrics for c in children)


def test_the_sweeps_wall_clock_cap_reaches_tune(tmp_path: Path) -> None:
    """``tune.time_budget_minutes`` becomes Tune's ``time_budget_s``; unset, no cap."""
    from service.tune.sweep import _build_tuner

    overrides = {"train.storage_path": str(tmp_path), "tune.time_budget_minutes": 90}
    capped = _build_tuner(resolve_settings(load_config(SMOKE, overrides)), lambda c: None)
    assert capped._local_tuner._tune_config.time_budget_s == 90 * 60
    del overrides["tune.time_budget_minutes"]
    free = _build_tuner(resolve_settings(load_config(SMOKE, overrides)), lambda c: None)
    assert free._local_tuner._tune_config.time_budget_s is None


def test_curves_follow_each_trial_on_ashas_axis(tmp_path: Path) -> None:
    """The curve figure's points: the metric at each reported epoch against training minutes
    (time-budgeted sweep) or epochs; epochs without the metric are left out."""
    rows = [
        {"epoch": 0.0, "train_minutes": 0.0, "knn_top1": 0.35},
        {"epoch": 1.0, "train_minutes": 2.5, "train_loss": 5.1},  # no monitor this epoch
        {"epoch": 2.0, "train_minutes": 6.1, "knn_top1": 0.48},
    ]
    stopped = TrialRecord("s", "stopped_early", {}, 2, 0.48, 5.0, epochs=rows)
    assert curve_points(stopped, "knn_top1", "train_minutes") == [(0.0, 0.35), (6.1, 0.48)]
    assert curve_points(stopped, "knn_top1", "epochs_completed") == [(0.0, 0.35), (2.0, 0.48)]
    done = TrialRecord("d", "completed", {}, 5, 0.55, 4.0, epochs=[{**rows[0]}, {
        "epoch": 5.0, "train_minutes": 25.0, "knn_top1": 0.55}])  # fmt: skip
    failed = TrialRecord("f", "failed", {}, 0, None, None, error="boom")
    png = plot_curves([stopped, done, failed], "knn_top1", "train_minutes", [6.0, 12.0],
                      tmp_path / "c.png", best=done)  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rungs_are_grace_times_factor_powers_before_the_end() -> None:
    minutes = load_config(CPU_SWEEP_25)
    assert resolve_settings(minutes).rungs == [6.0, 12.0, 24.0]  # 25-minute budget, grace 6
    epochs = resolve_settings(load_config(SMOKE, {"tune.grace_period_epochs": 1}))
    assert epochs.rungs == [1, 2] and epochs.max_epochs == 3


def test_training_minutes_counts_what_asha_saved() -> None:
    """Stopped trials save the rest of their budget; completed and failed ones save nothing."""

    def rec(tid: str, outcome: str, minutes: list[float]) -> TrialRecord:
        rows = [{"epoch": float(i), "train_minutes": m} for i, m in enumerate(minutes)]
        return TrialRecord(tid, outcome, {}, len(rows), 0.5, 1.0, epochs=rows)

    records = [
        rec("a", "completed", [0.0, 12.0, 25.3]),
        rec("b", "stopped_early", [0.0, 6.4]),
        rec("c", "stopped_early", [0.0, 6.2, 12.5]),
        rec("d", "failed", []),
    ]
    spent = training_minutes(records, 25.0)
    assert spent["trial_minutes"] == pytest.approx(25.3 + 6.4 + 12.5)
    assert spent["asha_saved_minutes"] == pytest.approx(18.6 + 12.5)
    assert spent["trial_minutes_full"] == pytest.approx(25.3 + 25 + 25)


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ({"model.width": 40}, "model.width=40 is not one of [32, 48]"),
        ({"train.lr": 0.01}, "train.lr=0.01 is not a number in [0.0007, 0.003]"),
        ({"train.lr": "fast"}, "train.lr='fast' is not a number in"),
        ({"train.epochs": 3}, "'train.epochs' is not searched"),
    ],
)
def test_bad_points_to_evaluate_are_refused_before_ray(point: dict, message: str) -> None:
    config = load_config(CPU_SWEEP_25, {"tune.points_to_evaluate": [point]})
    with pytest.raises(SearchSpaceError, match=re.escape(message)):
        resolve_settings(config)


def test_points_to_evaluate_reach_the_searcher_first(tmp_path: Path) -> None:
    """The configured points are Tune's first trials (the 25-minute sweep starts with the
    shipped recipe at width 48); partial points leave the other keys to the sampler."""
    from service.tune.sweep import _build_tuner

    config = load_config(CPU_SWEEP_25, {"train.storage_path": str(tmp_path)})
    settings = resolve_settings(config)
    assert settings.points[0]["model.width"] == 48 and len(settings.points[0]) == 8
    searcher = _build_tuner(settings, lambda c: None)._local_tuner._tune_config.search_alg
    assert searcher._points_to_evaluate == [dict(settings.points[0])]
