"""The ``contrastive`` console script: the parser from the commands' parts, dispatch, the JSON
result and exit codes; nothing about any one command.

Each :mod:`service.commands` module registers its command(s) (``add_parser``) and turns the
parsed arguments into a call of its typed handler (``run``); the handlers import torch, ray and
mlflow only when they run, so ``contrastive --help`` is instant. Every command prints its
JSON-able result as one JSON object, the last line of stdout.

Exit codes: 0 success; 2 bad input: the command was refused before doing any work, and what
the user gave must change — bad arguments, an invalid config, a path that does not exist, bad
data, a registered model / alias / version that does not exist (the message lists what does),
class names or templates that cannot work, an image-only model where an image–text one is
needed, and an **unreachable MLflow tracking server** (checked before any work, wherever its
URI came from: ``--tracking-uri``, the config or ``$MLFLOW_TRACKING_URI``: fix the URI or start
the server); 1 any other error of ours (a run that started and failed: NaN loss, workers lost,
a server that went away mid-run, ...). Both print one line without a traceback unless
``--debug`` is given; an unexpected exception (a bug) always raises.

An error class says it is bad input with a class attribute ``bad_input = True``
(``service.registry.RegistryInputError``, ``service.tracking.uri.TrackingUnavailableError``), so
this module needs no import of the layers below it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from service.commands import (
    check,
    data,
    demo,
    evaluate,
    pretrain,
    registry,
    search,
    tune,
    ui,
    zeroshot,
)
from service.config import ConfigError
from service.console import plain_output

# Each module registers its command(s) and reads the parsed arguments in its own ``run``; they
# import torch, ray and mlflow only when a command runs. The order is that of ``--help``.
COMMANDS = (demo, pretrain, evaluate, tune, check, data, registry, search, ui, zeroshot)


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``contrastive`` parser: ``--debug`` and every command's own ``add_parser``."""
    parser = argparse.ArgumentParser(
        prog="contrastive", description="Distributed contrastive pretraining on Ray + MLflow"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show tracebacks (default: known errors print one line)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _exit_code(exc: Exception) -> int | None:
    """2 for bad input, 1 for our other errors, None for anything else (a bug: let it raise)."""
    from service.data.errors import DataError  # light: no torch

    if isinstance(exc, ConfigError | FileNotFoundError | DataError) or _bad_input(exc):
        return 2
    # Our own errors (NaN loss, lost workers, ...) carry actionable messages.
    return 1 if type(exc).__module__.startswith("service.") else None


def _bad_input(exc: Exception) -> bool:
    return bool(getattr(type(exc), "bad_input", False))


def _message(exc: Exception) -> str:
    if isinstance(exc, ConfigError):
        return f"config error: {exc}"
    if isinstance(exc, FileNotFoundError) or _bad_input(exc):
        return str(exc)  # names what to fix (the path, the model, the URI); no class name
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere, so `jobs/*.py ... --debug` works too
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    # MLflow draws a download bar per artifact fetch (registration checks, pulls): progress
    # nobody asked for in a command's output. An explicit setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with plain_output():  # no colour codes in a log file or pipe (Ray colours its output)
        try:
            _print_json(args.run(args))
        except Exception as exc:
            code = _exit_code(exc)
            if debug or code is None:
                raise
            if getattr(exc, "result", None) is not None:  # a command that ran and failed
                _print_json(exc.result)  # e.g. contrastive check: its findings, then exit 1
            print(f"contrastive: {_message(exc)}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
