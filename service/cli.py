"""The ``contrastive`` console script: a thin argparse layer over the library.

Heavy imports (torch, ray, mlflow) happen inside the handlers so ``contrastive --help`` is instant.
Commands that produce results print one JSON object as their last stdout line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, help="YAML config file (jobs/configs/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set loss.temperature=0.2 (repeatable)",
    )


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from service.config import load_config
    from service.train.driver import run_pretraining

    config = load_config(args.config, args.overrides)
    summary = run_pretraining(config, address=args.address)
    _print_json(summary)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from service.eval.offline import evaluate_command

    _print_json(evaluate_command(args))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from service.train.demo import run_demo

    _print_json(run_demo(args.config, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contrastive", description="Distributed contrastive pretraining on Ray + MLflow"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pretrain → evaluate → register on the bundled data (embedded)")
    _add_config_args(p, default="jobs/configs/smoke-cpu.yaml")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pretrain", help="distributed contrastive pretraining on Ray Train")
    _add_config_args(p, default="jobs/configs/smoke-cpu.yaml")
    p.add_argument("--address", default=None, help="Ray address (default: embedded local Ray)")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("evaluate", help="linear + kNN evaluation of a frozen encoder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a pretraining checkpoint directory")
    src.add_argument("--model", help="a registered encoder, models:/NAME@ALIAS or models:/NAME/V")
    p.add_argument("--train", required=True, help="labelled Parquet for fitting the probes")
    p.add_argument("--test", required=True, help="labelled Parquet for scoring the probes")
    p.add_argument("--baseline", choices=["random", "none"], default="none")
    p.add_argument("--log-to-run", default=None, help="MLflow run id to log the results into")
    _add_config_args(p)
    p.set_defaults(func=_cmd_evaluate)

    return parser


def main(argv: list[str] | None = None) -> int:
    from service.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"contrastive: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
