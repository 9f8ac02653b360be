"""The `dogbread` command. It only parses arguments and calls the job modules.

Job flags are generated from the config dataclasses, so a flag and a YAML key always agree:
`--batch-size 64` on the command line is `batch_size: 64` in a --config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from collections.abc import Sequence
from typing import Any

from dogbread import console
from dogbread.config import (
    EnsembleConfig,
    LabelConfig,
    SynthConfig,
    TrainConfig,
    load_config,
    recipe_names,
)
from dogbread.errors import DogbreadError, first_line

VERBOSE_HELP = "show every log on the terminal (default: in a log file, shown only on errors)"
# Short flags users expect, beside the generated --field-name ones.
ALIASES = {"use_gpu": ["--gpu"]}


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per config field; all default to None so only given flags override YAML."""
    parser.add_argument("--config", metavar="YAML", help="a YAML file of config keys")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flags = [f"--{field.name.replace('_', '-')}", *ALIASES.get(field.name, [])]
        hint = hints[field.name]
        optional = isinstance(hint, types.UnionType)  # `X | None`; not tuple[str, ...]'s args
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        default = "" if field.default is dataclasses.MISSING else f" (default: {field.default})"
        if base is bool:
            parser.add_argument(
                *flags, dest=field.name, action=argparse.BooleanOptionalAction, default=None
            )
        elif typing.get_origin(base) is tuple:
            parser.add_argument(*flags, dest=field.name, help=f"comma-separated{default}")
        else:
            parser.add_argument(*flags, dest=field.name, type=base, help=default.strip() or None)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return load_config(cls, args.config, overrides, getattr(args, "recipe", None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dogbread", description="Train an image classifier and label image stores on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="draw a synthetic labeled image tree")
    p.add_argument("out", help="output folder (one subfolder per class)")
    add_config_flags(p, SynthConfig, skip=["out"])

    p = sub.add_parser("manifest", help="list a labeled tree and write its train/val/test split")
    p.add_argument("data", help="a labeled tree: folder or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="manifest file (.parquet or .csv)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--s3-endpoint")

    p = sub.add_parser("predict", help="classify images, one line each")
    p.add_argument("--model", required=True, help="a run dir or model.keras")
    p.add_argument("images", nargs="+", help="image paths or s3:// URIs")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--s3-endpoint")

    p = sub.add_parser("train", help="train the CNN data-parallel with Ray Train")
    add_config_flags(p, TrainConfig)
    recipes = ", ".join(recipe_names())
    p.add_argument(
        "--recipe",
        metavar="NAME",
        help=f"a shipped config under --config and the flags: {recipes} (default: the seed's)",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint")

    p = sub.add_parser("ensemble", help="one model averaging the probabilities of several runs")
    add_config_flags(p, EnsembleConfig)

    p = sub.add_parser("evaluate", help="metrics of a model on a labeled tree or manifest")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", help="only this split of the data (default: all of it)")
    p.add_argument("--s3-endpoint")

    p = sub.add_parser("label", help="label an image store into Parquet with Ray Data")
    add_config_flags(p, LabelConfig)

    p = sub.add_parser("report", help="write report.html for a label output or a training run")
    p.add_argument("target", help="a label output or a training run dir (local or s3://)")
    p.add_argument("--s3-endpoint")

    p = sub.add_parser("demo", help="the whole job on synthetic images and a local Ray")
    p.add_argument("--out", default="demo-out", help="where the demo writes (default: demo-out)")
    p.add_argument("--s3", action="store_true", help="go through a local SeaweedFS S3 server")
    p.add_argument("--images", type=int, default=2000, help="images to label")

    p = sub.add_parser("submit", help="run train or label on a Ray cluster, following its logs")
    p.add_argument("job", choices=["train", "label"])
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="the job's flags, plus --address http://HEAD:8265, --working-dir, --runtime-env "
        "(see `dogbread submit train --help`)",
    )
    for command in sub.choices.values():  # -v after the command too, as in `ray job submit -- ...`
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with console.session(args.command, args.verbose) as log_path:
        try:
            return run_command(args)
        except DogbreadError as exc:  # the user's to fix: the message says what
            print(f"dogbread: error: {exc}", file=console.terminal())
            return 2
        except KeyboardInterrupt:
            print("dogbread: interrupted", file=console.terminal())
            return 130
        except Exception as exc:
            if log_path is None:  # -v: the traceback, as Python prints it
                raise
            # The root logger: only the log file gets the traceback, not our terminal handler.
            logging.getLogger().exception("dogbread %s failed", args.command)
            reason = f"{type(exc).__name__}: {first_line(exc)}"
            print(
                f"dogbread: error: {reason} (full log: {log_path})",
                file=console.terminal(),
            )
            return 1


def run_command(args: argparse.Namespace) -> int:
    # Job modules are imported on use: `dogbread synth` should not wait for TensorFlow or Ray.
    if args.command == "synth":
        from dogbread import synth

        config = config_from_args(SynthConfig, args)
        counts = synth.write_synthetic_tree(
            config.out, config.per_class, config.seed, config.classes
        )
        print(f"wrote {sum(counts.values())} images to {config.out}: {counts}")
        return 0
    if args.command == "manifest":
        from dogbread import data

        manifest = data.list_labeled_tree(
            args.data, args.val_fraction, args.test_fraction, args.s3_endpoint
        )
        data.write_manifest(manifest, args.out, args.s3_endpoint)
        counts = {s: manifest.split(s).num_rows for s in data.SPLITS}
        print(f"wrote {manifest.table.num_rows} files to {args.out}: {counts}")
        return 0
    if args.command == "predict":
        from dogbread import predict

        return predict.run(args.model, args.images, args.json, args.s3_endpoint)
    if args.command == "train":
        config = None if args.resume else config_from_args(TrainConfig, args)
        from dogbread import train

        if config is None:
            train.resume(args.resume, args.s3_endpoint)
        else:
            train.run(config)
        return 0
    if args.command == "evaluate":
        from dogbread import evaluate

        evaluate.run(args.model, args.data, args.split, args.s3_endpoint)
        return 0
    if args.command == "ensemble":
        from dogbread import ensemble

        ensemble.run(config_from_args(EnsembleConfig, args))
        return 0
    if args.command == "label":
        from dogbread import label

        config = config_from_args(LabelConfig, args)
        result = label.run(config)  # the summary, or what a --dry-run would do in one line
        print(json.dumps(result, indent=None if config.dry_run else 2), flush=True)
        return 0
    if args.command == "report":
        from dogbread import report

        print(report.write_report(args.target, args.s3_endpoint))
        return 0
    if args.command == "demo":
        from dogbread import demo

        return demo.run(args.out, s3=args.s3, images=args.images)
    if args.command == "submit":
        from dogbread import submit

        return submit.main(args.job, args.args)
    raise AssertionError(args.command)
