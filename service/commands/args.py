"""Arguments that several ``contrastive`` commands share, each written once.

The commands' ``add_parser`` functions call these; what a command alone takes it adds itself.
Only argparse here: the parser is built for ``contrastive --help``, which must stay instant.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any

# The ``subparsers`` object that ``add_subparsers()`` returns, which each ``add_parser`` fills.
Subparsers = argparse._SubParsersAction
# Handler parameters whose argument has a shorter name on the command line.
RENAMED = {"config_path": "config", "templates_path": "templates", "input_path": "input",
           "output_path": "output"}  # fmt: skip


def call(handler: Callable[..., Any], a: argparse.Namespace, **given: Any) -> Any:
    """Call a typed handler with the parsed arguments its parameters name (``RENAMED`` where
    the option is shorter), so an option is written twice only: in the parser and as the
    handler's parameter. ``given`` supplies values the command line does not hold as such.

    >>> def handler(config_path, overrides=None, resume=False): return config_path, resume
    >>> call(handler, argparse.Namespace(config="a.yaml", overrides=[], resume=True, run=None))
    ('a.yaml', True)
    """
    values = vars(a)
    kwargs = {}
    for name in inspect.signature(handler).parameters:
        dest = RENAMED.get(name, name)
        if name in given:
            kwargs[name] = given[name]
        elif dest in values:
            kwargs[name] = values[dest]
    return handler(**kwargs)


def add_group(subparsers: Subparsers, name: str, help: str, run: Callable[..., Any]) -> Subparsers:
    """A command with subcommands (``contrastive NAME SUB ...``, chosen as ``NAME_cmd``)."""
    group = subparsers.add_parser(name, help=help)
    group.set_defaults(run=run)
    return group.add_subparsers(dest=f"{name}_cmd", required=True)


def add_config(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--config FILE`` and the repeatable ``--set KEY=VALUE`` (read as ``overrides``)."""
    p.add_argument("--config", default=default, help="YAML config file (jobs/configs/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set loss.temperature=0.2 (repeatable)",
    )


def add_address(p: argparse.ArgumentParser) -> None:
    """``--address``: the Ray cluster to join."""
    p.add_argument("--address", default=None, help="Ray address (default: embedded local Ray)")


def add_tracking_uri(p: argparse.ArgumentParser) -> None:
    """``--tracking-uri``: the MLflow store (default: the one every command resolves)."""
    p.add_argument("--tracking-uri", default=None)


def add_model(p: argparse.ArgumentParser) -> None:
    """``--model`` (required) of the commands that run a registered or pulled encoder."""
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/V or a dir")


def add_batch_size(p: argparse.ArgumentParser) -> None:
    """``--batch-size``: images per forward pass (default 256)."""
    p.add_argument("--batch-size", type=int, default=256)
