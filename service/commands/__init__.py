"""The commands behind the ``contrastive`` console script, one module per command group.

Each module holds its command's whole command line: ``add_parser(subparsers)`` registers the
command and its arguments (those several commands share are in :mod:`service.commands.args`),
``run(args)`` reads the parsed ``argparse.Namespace`` once and calls the typed handler. The
handlers (exported here; ``jobs/`` and tests call them) take typed arguments, resolve what the
library needs (config files, ``--set`` overrides, where an encoder comes from), call the library
and return the JSON-able summary that ``service.cli`` prints. This is the only layer, beside
``jobs/``, that may import from every package: it sits above ``train``/``tune``.

Heavy imports (torch, ray, mlflow) happen inside the handlers, so ``contrastive --help`` stays
instant.
"""

from service.commands.data import captions_command, pack_command, preview_command
from service.commands.demo import demo_command
from service.commands.evaluate import evaluate_command
from service.commands.pretrain import pretrain_command
from service.commands.registry import (
    embed_command,
    list_command,
    promote_command,
    pull_command,
)
from service.commands.search import index_build_command, search_command
from service.commands.tune import tune_command
from service.commands.ui import ui_command
from service.commands.zeroshot import zero_shot_command

__all__ = [
    "demo_command",
    "embed_command",
    "evaluate_command",
    "index_build_command",
    "list_command",
    "captions_command",
    "pack_command",
    "pretrain_command",
    "preview_command",
    "promote_command",
    "pull_command",
    "search_command",
    "tune_command",
    "ui_command",
    "zero_shot_command",
]
