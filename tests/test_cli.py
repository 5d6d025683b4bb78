"""The ``contrastive`` parser is assembled from the commands' own ``add_parser``/``run``.

No Ray, no MLflow: these tests only build and read parsers.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from types import ModuleType

import pytest

import service.commands
from service import cli

# Modules of service/commands that hold no command: shared arguments, the config loader.
HELPERS = {"args", "config"}


def _command_modules() -> list[ModuleType]:
    names = [m.name for m in pkgutil.iter_modules(service.commands.__path__)]
    return [importlib.import_module(f"service.commands.{n}") for n in names if n not in HELPERS]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _registered_by(module: ModuleType) -> set[str]:
    """The top-level commands that ``module.add_parser`` registers on an empty parser."""
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    return set(_subcommands(parser))


def test_every_command_module_exports_add_parser_and_run() -> None:
    modules = _command_modules()
    assert len(modules) >= 8
    for module in modules:
        assert callable(getattr(module, "add_parser", None)), module.__name__
        assert callable(getattr(module, "run", None)), module.__name__


def test_the_cli_parser_has_exactly_the_modules_commands_each_once() -> None:
    per_module = [_registered_by(m) for m in _command_modules()]
    everything = set().union(*per_module)
    assert sum(map(len, per_module)) == len(everything)  # no command registered twice
    assert set(_subcommands(cli.build_parser())) == everything
    assert {m.__name__ for m in cli.COMMANDS} == {m.__name__ for m in _command_modules()}
    assert everything == {
        "demo",
        "pretrain",
        "evaluate",
        "tune",
        "check",
        "data",
        "registry",
        "ui",
        "pull",
        "embed",
        "zero-shot",
        "index",
        "search",
    }


@pytest.mark.parametrize(
    ("argv", "module", "expected"),
    [
        (["pretrain", "--resume"], "pretrain", {"resume": True, "address": None}),
        (["demo", "--set", "a=1", "--set", "b=2"], "demo", {"overrides": ["a=1", "b=2"]}),
        (["tune"], "tune", {"config": "jobs/configs/tune-smoke.yaml", "num_samples": None}),
        (
            ["evaluate", "--model", "m", "--train", "a", "--test", "b"],
            "evaluate",
            {"baseline": "none", "checkpoint": None, "config": None, "overrides": []},
        ),
        (["data", "captions", "i", "o"], "data", {"data_cmd": "captions", "seed": 0}),
        (["registry", "list"], "registry", {"name": None, "tracking_uri": None}),
        (["pull", "n@a", "--out", "d"], "registry", {"command": "pull"}),
        (
            ["embed", "--model", "m", "--input", "i", "--output", "o"],
            "registry",
            {"batch_size": 256, "normalize": False, "text_column": None},
        ),
        (["ui"], "ui", {"port": 5000, "backend_store_uri": None}),
        (
            ["zero-shot", "--model", "m", "--input", "i", "--output", "o", "--classes", "a,b"],
            "zeroshot",
            {"batch_size": 256, "templates": None, "classes_from_column": None},
        ),
    ],
)
def test_each_command_dispatches_to_its_modules_run_with_todays_defaults(
    argv: list[str], module: str, expected: dict[str, object]
) -> None:
    args = cli.build_parser().parse_args(argv)
    assert args.run is importlib.import_module(f"service.commands.{module}").run
    assert {k: getattr(args, k) for k in expected} == expected


def test_bad_arguments_exit_2_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--train", "a", "--test", "b"])  # neither --checkpoint nor --model
    assert exc.value.code == 2
    assert "one of the arguments --checkpoint --model is required" in capsys.readouterr().err


def test_a_missing_config_exits_2_through_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The whole path: parse → the module's ``run`` → handler → the cli's exit code."""
    assert cli.main(["data", "preview", "d", "o.png", "--config", "no/such.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("contrastive: ") and "no/such.yaml" in err


def test_help_imports_no_torch_ray_or_mlflow() -> None:
    from tests.helpers import heavy_modules_after

    code = "from service.cli import build_parser\nbuild_parser().format_help()"
    assert heavy_modules_after(code) == []
