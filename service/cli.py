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


def _cmd_tune(args: argparse.Namespace) -> int:
    from service.tune import tune_command

    _print_json(
        tune_command(
            args.config, args.overrides, args.num_samples, args.address, resume=args.resume
        )
    )
    return 0


def _cmd_data_pack(args: argparse.Namespace) -> int:
    from service.data.commands import pack_command

    _print_json(pack_command(args.src, args.out))
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from service.data.commands import preview_command

    _print_json(preview_command(args.data, args.out, args.config, args.overrides))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from service.registry.register import promote

    promote(args.name, args.version, args.alias, tracking_uri=args.tracking_uri)
    _print_json({"name": args.name, "version": args.version, "alias": args.alias})
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from service.registry.load import pull

    out = pull(args.spec, args.out, tracking_uri=args.tracking_uri)
    _print_json({"spec": args.spec, "out": str(out)})
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from service.registry.embed import embed_parquet

    _print_json(
        embed_parquet(
            args.model,
            args.input,
            args.output,
            batch_size=args.batch_size,
            tracking_uri=args.tracking_uri,
        )
    )
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

    p = sub.add_parser("tune", help="Ray Tune sweep over temperature / augmentation strength")
    _add_config_args(p, default="jobs/configs/tune-smoke.yaml")
    p.add_argument(
        "--num-samples", type=int, default=None, help="trials (default: tune.num_samples)"
    )
    p.add_argument("--address", default=None, help="Ray address (default: embedded local Ray)")
    p.add_argument(
        "--resume", action="store_true", help="continue the sweep of the same name after a crash"
    )
    p.set_defaults(func=_cmd_tune)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_cmd", required=True
    )
    p = data.add_parser("pack", help="pack a folder of class_name/*.jpg images into Parquet")
    p.add_argument("src")
    p.add_argument("out")
    p.set_defaults(func=_cmd_data_pack)
    p = data.add_parser("preview", help="PNG grid of images and their augmented views")
    p.add_argument("data")
    p.add_argument("out")
    _add_config_args(p)
    p.set_defaults(func=_cmd_data_preview)

    registry = sub.add_parser("registry", help="MLflow model registry").add_subparsers(
        dest="registry_cmd", required=True
    )
    p = registry.add_parser("promote", help="point an alias (e.g. champion) at a model version")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", required=True)
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("pull", help="download a registered encoder for offline use")
    p.add_argument("spec", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--out", required=True)
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("embed", help="one embedding per image row of a Parquet file")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/V or a dir")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_cmd_embed)

    return parser


def main(argv: list[str] | None = None) -> int:
    from service.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"contrastive: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Our own errors (bad data, unreachable MLflow, NaN loss, ...) carry actionable messages:
        # print them without a traceback. Anything else is a bug: let it raise.
        if not type(exc).__module__.startswith("service."):
            raise
        print(f"contrastive: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
