"""Arguments that several ``contrastive`` commands share, each written once.

The commands' ``add_parser`` functions call these; what a command alone takes it adds itself.
Only argparse here: the parser is built for ``contrastive --help``, which must stay instant.
"""

from __future__ import annotations

import argparse

# The ``subparsers`` object that ``add_subparsers()`` returns, which each ``add_parser`` fills.
Subparsers = argparse._SubParsersAction


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
