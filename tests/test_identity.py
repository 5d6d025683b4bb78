"""Run identity: new runs never reuse a finished run; resume only with the same training recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import BUNDLED_DATA_DIR, ConfigError, load_config
from service.train.checkpoint import load_state, save_state
from service.train.identity import latest_checkpoint, plan_run, read_record, write_record


def _config(tmp_path: Path, *overrides: str):
    return load_config(
        "jobs/configs/smoke-cpu.yaml",
        [f"train.storage_path={tmp_path}", "train.run_name=r", "train.epochs=3", *overrides],
    )


def _finished_epoch(
    tmp_path: Path, config, epoch: int, name: str = "checkpoint_2026-01-01_00-00-00.000001"
) -> None:
    save_state(tmp_path / "r" / name, {"epoch": epoch, "config": config.to_dict()})


def test_new_run_then_same_name_is_refused_without_resume(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert plan_run(config).kind == "new"
    write_record(str(tmp_path / "r"), {"mlflow_run_id": "abc", "config": config.to_dict()})
    _finished_epoch(tmp_path, config, epoch=0)  # it trained: its name is taken
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        plan_run(config)


def test_a_run_that_never_reached_a_checkpoint_does_not_block_its_name(tmp_path: Path) -> None:
    """run.json is written before Ray starts: an attempt that failed before its first checkpoint
    (no GPU on the cluster, a worker that crashed in epoch 1) trained nothing to continue."""
    config = _config(tmp_path, "train.use_gpu=true")
    write_record(str(tmp_path / "r"), {"mlflow_run_id": "abc", "config": config.to_dict()})
    (tmp_path / "r" / "checkpoint_2026-01-01_00-00-00.000001").mkdir()  # cut off mid-write
    again = plan_run(_config(tmp_path))  # another recipe is fine: nothing was trained
    assert again.kind == "new" and again.mlflow_run_id is None
    assert "never reached its first checkpoint" in again.note and "abc" in again.note
    assert plan_run(_config(tmp_path, "train.resume=true")).kind == "resume"  # as before


def test_resume_needs_an_existing_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to resume"):
        plan_run(_config(tmp_path, "train.resume=true"))


def test_resume_finished_run_is_done_and_more_epochs_resume(tmp_path: Path) -> None:
    config = _config(tmp_path)
    write_record(str(tmp_path / "r"), {"mlflow_run_id": "abc", "tracking_uri": "u",
                                       "config": config.to_dict()})  # fmt: skip
    _finished_epoch(tmp_path, config, epoch=0, name="checkpoint_2026-01-01_00-00-00.000001")
    _finished_epoch(tmp_path, config, epoch=2, name="checkpoint_2026-01-01_00-00-09.000001")
    assert load_state(latest_checkpoint(str(tmp_path / "r")))["epoch"] == 2
    done = plan_run(_config(tmp_path, "train.resume=true"))
    assert done.kind == "done" and done.last_epoch == 2 and done.mlflow_run_id == "abc"
    more = plan_run(_config(tmp_path, "train.resume=true", "train.epochs=5"))
    assert more.kind == "resume" and more.tracking_uri == "u"
    with pytest.raises(ConfigError, match="already\\s+trained 3 epochs"):
        plan_run(_config(tmp_path, "train.resume=true", "train.epochs=2"))
    assert read_record(str(tmp_path / "r"))["mlflow_run_id"] == "abc"


def test_resume_refuses_keys_that_change_what_is_trained(tmp_path: Path) -> None:
    config = _config(tmp_path)
    write_record(str(tmp_path / "r"), {"mlflow_run_id": "abc", "config": config.to_dict()})
    _finished_epoch(tmp_path, config, epoch=0)
    changed = _config(
        tmp_path, "train.resume=true", "loss.temperature=0.9", "train.global_batch_size=64",
        "eval.knn_k=5", "train.num_workers=1",
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        plan_run(changed)
    message = str(info.value)
    assert "loss.temperature" in message and "train.global_batch_size" in message
    assert "eval.knn_k" not in message and "train.num_workers" not in message


def test_run_folder_is_accepted_as_a_checkpoint(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _finished_epoch(tmp_path, config, epoch=1)
    assert load_state(tmp_path / "r")["epoch"] == 1


def test_training_data_is_compared_by_content_not_path(tmp_path: Path) -> None:
    """`ray job submit` uploads the checkout (and bundled data) to a new directory per job."""
    import shutil

    import pyarrow.parquet as pq

    from service.train.identity import data_fingerprint

    bundled = BUNDLED_DATA_DIR / "cifar10-train-subset.parquet"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(bundled, tmp_path / name / bundled.name)
    fewer = tmp_path / "c" / bundled.name
    fewer.parent.mkdir()
    pq.write_table(pq.read_table(bundled).slice(0, 100), fewer)

    config = _config(tmp_path, f"data.train={tmp_path / 'a' / bundled.name}")
    record = {"mlflow_run_id": "abc", "config": config.to_dict(),
              "data_fingerprint": data_fingerprint(config.data.train)}  # fmt: skip
    write_record(str(tmp_path / "r"), record)
    _finished_epoch(tmp_path, config, epoch=0)
    moved = _config(tmp_path, "train.resume=true", f"data.train={tmp_path / 'b' / bundled.name}")
    assert plan_run(moved).kind == "resume"
    other = _config(tmp_path, "train.resume=true", f"data.train={fewer}",
                    "train.global_batch_size=64")  # fmt: skip
    with pytest.raises(ConfigError, match="data.train"):
        plan_run(other)


def test_starting_over_drops_what_the_failed_attempt_would_hand_on(tmp_path: Path, capsys) -> None:
    """The attempt's tokenizer was fitted on its captions: a new attempt (maybe on other data)
    fits its own; the attempt's MLflow run is left as it ended (FAILED), a new one is opened."""
    from service.train.driver import TOKENIZER_FILE, start_over

    config = _config(tmp_path)
    write_record(str(tmp_path / "r"), {"mlflow_run_id": "abc", "config": config.to_dict()})
    (tmp_path / "r" / TOKENIZER_FILE).write_text("{}")
    plan = plan_run(config)
    start_over(plan)
    assert not (tmp_path / "r" / TOKENIZER_FILE).exists()
    assert "never reached its first checkpoint" in capsys.readouterr().err
    start_over(plan_run(_config(tmp_path, "train.run_name=fresh")))  # a new name: nothing to say
    assert capsys.readouterr().err == ""
