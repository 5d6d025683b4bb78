"""Issue 27 item 11: one screen, real warnings only. Ray's token-auth WARNING (embedded Ray),
MLflow's pickle WARNING (registration), ANSI colour codes in redirected output and Tune's tables
are gone at their source; real warnings and our own one line per trial stay."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from tests.cluster import REPO

PICKLE_WARNING = "Saving pytorch model by Pickle or CloudPickle format"  # MLflow's words

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rays_token_auth_notice_is_dropped_and_its_other_warnings_pass(monkeypatch, capfd):
    from ray._private.authentication import authentication_token_setup as setup

    from service.console import quiet_embedded_ray

    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")  # a user's setting wins
    quiet_embedded_ray()
    quiet_embedded_ray()  # idempotent
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"
    # What passes the logger's filter reaches its handlers, wherever they write (Ray's own
    # handler's stream depends on what ran before in this process): listen at the logger.
    seen: list[str] = []
    listener = logging.Handler()
    listener.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    setup.logger.addHandler(listener)
    try:
        setup._warn_token_auth_enabled()  # what ray.init() logs for every new local cluster
        setup._warn_token_auth_disabled()  # a real warning (auth off): still shown
    finally:
        setup.logger.removeHandler(listener)
    assert not any("Token authentication is enabled for this Ray cluster" in m for m in seen)
    assert any("Token authentication is disabled" in m for m in seen), seen


@pytest.mark.slow
def test_an_embedded_ray_and_a_sweep_print_one_screen_into_a_log_file(tmp_path) -> None:
    """A real embedded Ray and a 2-trial Tune run (one trial fails), output redirected to files:
    no token notice, no colour codes, none of Tune's tables; one line per trial report/end."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(storage=tmp_path / "tune"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        done = subprocess.run(
            [sys.executable, str(script)], stdout=out, stderr=err, env=env, cwd=REPO,
            timeout=300,
        )  # fmt: skip
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert done.returncode == 0, stderr[-3000:]
    assert "Token authentication" not in stderr
    assert "\x1b" not in stdout + stderr
    assert stdout.strip() == "", stdout  # Tune's tables went to stdout
    assert "[tune] trial" in stderr and "completed after 2 epoch(s); knn_top1 0.2000" in stderr
    assert "failed after 2 epoch(s)" in stderr and "ValueError: boom" in stderr  # real error


PROBE = """
from ray import tune

from service.console import plain_output
from service.train.driver import connect_ray
from service.tune.progress import TrialLines, quiet_tune_output


def trial(config):
    for epoch in (1, 2):
        tune.report({{"knn_top1": config["x"] * epoch / 10, "epochs_completed": epoch}})
    if config["x"] > 1.5:
        raise ValueError("boom")


with plain_output():
    connect_ray()
    tuner = tune.Tuner(
        trial,
        param_space={{"x": tune.grid_search([1.0, 2.0])}},
        tune_config=tune.TuneConfig(metric="knn_top1", mode="max"),
        run_config=tune.RunConfig(
            name="quiet", storage_path="{storage}", verbose=0,
            callbacks=[TrialLines("knn_top1", 2)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    with quiet_tune_output():
        tuner.fit()
"""


def test_registering_an_encoder_does_not_print_mlflows_pickle_warning(tmp_path, capfd) -> None:
    from tests import registry_store

    registry_store.two_versions(tmp_path)
    err = capfd.readouterr().err
    assert "Created version '2'" in err  # MLflow's output is still there
    assert PICKLE_WARNING not in err

    from service.console import MLFLOW_PICKLE_WARNING, dropping_log_messages

    assert MLFLOW_PICKLE_WARNING in PICKLE_WARNING
    # ... and only that warning is dropped: mlflow.pytorch's other warnings pass.
    with dropping_log_messages("mlflow.pytorch", MLFLOW_PICKLE_WARNING):
        logging.getLogger("mlflow.pytorch").warning("a different warning")
    assert "a different warning" in capfd.readouterr().err


def test_rays_coloured_worker_lines_are_plain_in_a_log_file(capsys) -> None:
    from ray._private.worker import print_worker_logs

    from service.console import PlainText, plain_output

    batch = {"pid": 4242, "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": ["step 3"]}
    batch["actor_name"] = "TrainController"
    with plain_output():  # stdout is pytest's capture here: not a terminal
        print_worker_logs(batch, sys.stdout)  # Ray's own printer, as for log_to_driver
        print("\x1b[31merror\x1b[0m text", file=sys.stderr)
    captured = capsys.readouterr()
    assert captured.out == "(TrainController pid=4242) step 3\n"
    assert captured.err == "error text\n"
    # A logging handler set up before (as Ray's, when ray is imported) writes plain text too.
    handler = logging.StreamHandler(sys.stderr)
    log = logging.getLogger("test.quiet.before")
    log.addHandler(handler)
    try:
        with plain_output():
            log.warning("\x1b[36mray::ImplicitFunc.train()\x1b[39m failed")
        assert handler.stream is sys.stderr, "restored on exit"
    finally:
        log.removeHandler(handler)
    assert capsys.readouterr().err == "ray::ImplicitFunc.train() failed\n"
    assert not isinstance(sys.stdout, PlainText), "restored on exit"


def test_a_terminal_keeps_its_colours() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from service.console import plain_output

    terminal = Terminal()
    saved = sys.stdout
    sys.stdout = terminal
    try:
        with plain_output():
            assert sys.stdout is terminal
            print("\x1b[36mcyan\x1b[0m")
    finally:
        sys.stdout = saved
    assert terminal.getvalue() == "\x1b[36mcyan\x1b[0m\n"


def test_the_cli_writes_no_colour_codes_into_a_pipe(monkeypatch, capsys) -> None:
    from service.cli import main
    from service.commands import ui

    def colourful(**_: object) -> dict[str, str]:
        print("\x1b[36m(pid=1)\x1b[39m worker line")
        print("\x1b[33mWARNING\x1b[0m real warning", file=sys.stderr)
        return {"url": "\x1b[1mhttp://x\x1b[0m"}

    monkeypatch.setattr(ui, "ui_command", colourful)  # a command whose output is coloured
    assert main(["ui"]) == 0
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err
    assert "(pid=1) worker line" in captured.out and "WARNING real warning" in captured.err


def test_a_sweep_runs_with_tunes_tables_off_and_one_line_per_trial(tmp_path) -> None:
    from service.config import load_config
    from service.tune.progress import TrialLines
    from service.tune.settings import resolve_settings
    from service.tune.sweep import _build_tuner

    config = load_config(
        "jobs/configs/tune-smoke.yaml", overrides={"train.storage_path": str(tmp_path)}
    )
    settings = resolve_settings(config, 2)
    tuner = _build_tuner(settings, lambda config: None)
    run_config = tuner._local_tuner._run_config
    assert run_config.verbose == 0
    lines = [c for c in run_config.callbacks if isinstance(c, TrialLines)]
    assert len(lines) == 1 and lines[0].metric == settings.metric


def test_tune_output_engine_is_the_quiet_one_only_during_the_fit(monkeypatch) -> None:
    from ray.tune.experimental.output import get_air_verbosity

    from service.tune.progress import quiet_tune_output

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    monkeypatch.delenv("CONTRASTIVE_TUNE_VERBOSE", raising=False)
    with quiet_tune_output():
        # Tune's new engine prints its tables even at verbose=0; the legacy one prints nothing
        assert get_air_verbosity(0) is None  # i.e. Tune uses the legacy engine
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    monkeypatch.setenv("CONTRASTIVE_TUNE_VERBOSE", "1")  # the tables back, on request
    with quiet_tune_output():
        assert get_air_verbosity(1) is not None


def test_trial_lines_say_epoch_metric_and_how_each_trial_ended(capsys) -> None:
    from ray.tune.experiment import Trial

    from service.tune.progress import TrialLines

    lines = TrialLines("knn_top1", max_epochs=2)
    trials = [Trial("run_trial", config={}, trial_id=f"abc_0000{i}", stub=True) for i in (1, 2)]
    first, second = trials
    lines.on_trial_result(1, trials, first, {"epochs_completed": 1, "knn_top1": 0.25})
    first.update_last_result({"epochs_completed": 2, "knn_top1": 0.3})
    lines.on_trial_complete(1, trials, first)
    second.update_last_result({"epochs_completed": 1, "knn_top1": 0.2})
    lines.on_trial_complete(2, trials, second)  # ASHA stopped it after 1 of 2 epochs
    third = Trial("run_trial", config={}, trial_id="abc_00003", stub=True)
    lines.on_trial_error(3, trials, third)
    assert capsys.readouterr().err.splitlines() == [
        "[tune] trial abc_00001 epoch 1/2: knn_top1 0.2500",
        "[tune] trial abc_00001 completed after 2 epoch(s); knn_top1 0.3000",
        "[tune] trial abc_00002 stopped early (ASHA) after 1 epoch(s); knn_top1 0.2000",
        "[tune] trial abc_00003 failed after 0 epoch(s)",
    ]
