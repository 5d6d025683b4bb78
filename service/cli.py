"""The ``contrastive`` console script: argparse parsing, dispatch and error reporting only.

The work happens in :mod:`service.commands` (one typed handler per command; they import torch,
ray and mlflow only when they run, so ``contrastive --help`` is instant). Every command prints
its JSON-able result as one JSON object, the last line of stdout.

Exit codes: 0 success; 2 bad input (invalid config, a path that does not exist, bad arguments);
1 any other error of ours (bad data, unreachable MLflow, NaN loss, ...). Those print one line
without a traceback unless ``--debug`` is given; an unexpected exception (a bug) always raises.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from service import commands  # light: the handlers import torch/ray/mlflow when they run
from service.config import ConfigError


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


# argparse → typed arguments: the only place a Namespace is read; each returns the JSON summary.


def _cmd_pretrain(a: argparse.Namespace) -> dict[str, Any]:
    return commands.pretrain_command(a.config, a.overrides, address=a.address, resume=a.resume)


def _cmd_evaluate(a: argparse.Namespace) -> dict[str, Any]:
    return commands.evaluate_command(
        a.train,
        a.test,
        checkpoint=a.checkpoint,
        model=a.model,
        random_baseline=a.baseline == "random",
        log_to_run=a.log_to_run,
        config_path=a.config,
        overrides=a.overrides,
    )


def _cmd_demo(a: argparse.Namespace) -> dict[str, Any]:
    return commands.demo_command(a.config, a.overrides)


def _cmd_tune(a: argparse.Namespace) -> dict[str, Any]:
    return commands.tune_command(a.config, a.overrides, a.num_samples, a.address, resume=a.resume)


def _cmd_data_pack(a: argparse.Namespace) -> dict[str, Any]:
    return commands.pack_command(a.src, a.out, captions=a.captions)


def _cmd_data_captions(a: argparse.Namespace) -> dict[str, Any]:
    return commands.captions_command(a.src, a.out, templates=a.templates, seed=a.seed)


def _cmd_data_preview(a: argparse.Namespace) -> dict[str, Any]:
    return commands.preview_command(a.data, a.out, a.config, a.overrides)


def _cmd_promote(a: argparse.Namespace) -> dict[str, Any]:
    return commands.promote_command(a.name, a.version, a.alias, tracking_uri=a.tracking_uri)


def _cmd_pull(a: argparse.Namespace) -> dict[str, Any]:
    return commands.pull_command(a.spec, a.out, tracking_uri=a.tracking_uri)


def _cmd_embed(a: argparse.Namespace) -> dict[str, Any]:
    return commands.embed_command(
        a.model,
        a.input,
        a.output,
        batch_size=a.batch_size,
        tracking_uri=a.tracking_uri,
        text_column=a.text_column,
        normalize=a.normalize,
    )


def _cmd_registry_list(a: argparse.Namespace) -> dict[str, Any]:
    return commands.list_command(a.name, tracking_uri=a.tracking_uri)


def _cmd_zero_shot(a: argparse.Namespace) -> dict[str, Any]:
    return commands.zero_shot_command(
        a.model,
        a.input,
        a.output,
        classes=a.classes,
        classes_from_column=a.classes_from_column,
        templates_path=a.templates,
        batch_size=a.batch_size,
        tracking_uri=a.tracking_uri,
    )


def _cmd_ui(a: argparse.Namespace) -> dict[str, Any]:
    return commands.ui_command(a.backend_store_uri, port=a.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contrastive", description="Distributed contrastive pretraining on Ray + MLflow"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show tracebacks (default: known errors print one line)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pretrain → evaluate → register on the bundled data (embedded)")
    _add_config_args(p, default="jobs/configs/smoke-cpu.yaml")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pretrain", help="distributed contrastive pretraining on Ray Train")
    _add_config_args(p, default="jobs/configs/smoke-cpu.yaml")
    p.add_argument("--address", default=None, help="Ray address (default: embedded local Ray)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run train.storage_path/train.run_name (same MLflow run); without it "
        "an existing run name is refused",
    )
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
    p.add_argument(
        "--captions",
        default=None,
        help="CSV or JSONL of (file, caption), paths relative to SRC: adds a text column",
    )
    p.set_defaults(func=_cmd_data_pack)
    p = data.add_parser("captions", help="add a text column built from label_name (templates)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--templates", default=None, help="file: one template with {} per line")
    p.add_argument("--seed", type=int, default=0, help="seeds the template drawn for each row")
    p.set_defaults(func=_cmd_data_captions)
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
    p = registry.add_parser("list", help="registered models: versions, aliases, metric, run")
    p.add_argument("name", nargs="?", default=None, help="one registered model (default: all)")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_cmd_registry_list)

    p = sub.add_parser("ui", help="the MLflow UI on this store (127.0.0.1) until Ctrl-C")
    p.add_argument(
        "--backend-store-uri",
        default=None,
        help="tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db); an "
        "http(s) server's URL is printed, nothing started",
    )
    p.add_argument("--port", type=int, default=5000, help="local port (default 5000)")
    p.set_defaults(func=_cmd_ui)

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
    p.add_argument(
        "--text-column",
        default=None,
        help="embed this text column with the text tower (image-text models; L2-normalised)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="L2-normalise image embeddings (default: the backbone's raw features)",
    )
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser(
        "zero-shot", help="classify a Parquet of images by class names (image-text models)"
    )
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/V or a dir")
    p.add_argument("--input", required=True, help="Parquet with an image column")
    p.add_argument("--output", required=True, help="predictions Parquet to write")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help="comma-separated class names, e.g. cat,dog,ship")
    names.add_argument("--classes-from-column", help="class names: this column's values")
    p.add_argument(
        "--templates", default=None, help="file, one prompt per line with {} (default: the run's)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_cmd_zero_shot)

    return parser


def _exit_code(exc: Exception) -> int | None:
    """2 for bad input, 1 for our other errors, None for anything else (a bug: let it raise)."""
    from service.data.errors import DataError  # light: no torch

    if isinstance(exc, ConfigError | FileNotFoundError | DataError):
        return 2
    # Our own errors (bad data, unreachable MLflow, NaN loss, ...) carry actionable messages.
    return 1 if type(exc).__module__.startswith("service.") else None


def _message(exc: Exception) -> str:
    if isinstance(exc, ConfigError):
        return f"config error: {exc}"
    if isinstance(exc, FileNotFoundError):
        return str(exc)  # names the path (e.g. "no checkpoint at ...")
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere, so `jobs/*.py ... --debug` works too
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    # MLflow draws a download bar per artifact fetch (registration checks, pulls): progress
    # nobody asked for in a command's output. An explicit setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        _print_json(args.func(args))
    except Exception as exc:
        code = _exit_code(exc)
        if debug or code is None:
            raise
        print(f"contrastive: {_message(exc)}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
