"""Accuracy of dogbread on real photos (../shared/data/dogbread-real), beside the seed notebook.

Trains with `dogbread train` on the photos' train split, stops early on the val split, and reports
the val split's accuracy, precision and recall (dog is the positive class, as in the notebook).
With `--members K`, trains K runs (seeds seed..seed+K-1) and reports their `dogbread ensemble`,
beside each member's own figures; a member whose run dir already holds the finished run of the
same config is reused (a stopped one resumed), so an interrupted `--out DIR` can be run again.
With `--distill` too, trains a student of the same recipe (seed seed+K) with the ensemble as its
teacher (`dogbread train --teacher`), and reports it beside the ensemble, with the images/s of
each (LiteRT on every core, batches of 128, the model alone: no decoding).
The photos are read where they are; nothing is copied. Prints one JSON object.

    python bench/accuracy.py [--data ../shared/data/dogbread-real] [--epochs 20] [--augment]
        [--architecture seed|residual] [--lr-schedule constant|cosine] [--image-size 256]
        [--members 1] [--distill] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dogbread import data, ensemble, evaluate, train
from dogbread.config import CONFIG_FILENAME, EnsembleConfig, TrainConfig, load_config

CONFIG_KEYS = ("workers", "epochs", "image_size", "augment", "architecture", "lr_schedule")
SEED_NOTEBOOK = {"accuracy": 0.967, "precision": 0.984, "recall": 0.936}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogbread-real"


def real_photo_manifest(root: Path, limit: int | None = None) -> data.Manifest:
    """The photos' own split: train for fitting, val for early stopping and for the report."""
    rows = pacsv.read_csv(root / "manifest.csv").select(["split", "label", "file"]).to_pylist()
    if limit:  # the classes in turn: the listing is sorted by class, and a smoke run needs both
        kept = []
        for split in ("train", "val"):
            by_label: dict[str, list[dict]] = {}
            for row in rows:
                if row["split"] == split:
                    by_label.setdefault(row["label"], []).append(row)
            kept += [r for group in zip_longest(*by_label.values()) for r in group if r][:limit]
        rows = kept
    table = pa.table(
        {
            "path": [str(root / r["file"]) for r in rows],
            "relpath": [r["file"] for r in rows],
            "label": [r["label"] for r in rows],
            "split": [r["split"] for r in rows],
        },
        schema=data.MANIFEST_SCHEMA,
    )
    # dogbread evaluates on the "test" split after training: here that is the val photos again.
    test = table.filter(pa.compute.equal(table["split"], "val"))
    test = test.set_column(3, "split", pa.array(["test"] * test.num_rows, pa.string()))
    return data.Manifest(pa.concat_tables([table, test]), ("bread", "dog"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--architecture", default="seed", choices=("seed", "residual"))
    parser.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    parser.add_argument("--members", type=int, default=1, help="runs to ensemble")
    parser.add_argument("--distill", action="store_true", help="and a student of the ensemble")
    parser.add_argument(
        "--distill-temperature", type=float, default=TrainConfig.distill_temperature
    )
    parser.add_argument("--distill-weight", type=float, default=TrainConfig.distill_weight)
    parser.add_argument("--seed", type=int, default=0, help="of the first member")
    parser.add_argument("--limit", type=int, help="at most this many photos per split (smoke)")
    parser.add_argument("--out", help="run dir (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.members < 1:
        parser.error("--members must be at least 1")
    if args.distill and args.members < 2:
        parser.error("--distill needs an ensemble to learn from: --members 2 or more")
    if not (args.data / "manifest.csv").exists():
        sys.exit(f"no real photos at {args.data} (expected manifest.csv)")

    start = time.perf_counter()
    # stdout is for the JSON only: Ray forwards the training workers' prints to it, so they go
    # to stderr with the rest of the training's output.
    with contextlib.redirect_stdout(sys.stderr):
        result = measure(args)
    result["seed_notebook"] = SEED_NOTEBOOK
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return result


def measure(args: argparse.Namespace) -> dict:
    """Trains (or reuses) the runs that `args` asks for and scores them on the val split."""
    work = Path(args.out or tempfile.mkdtemp(prefix="dogbread-accuracy-"))
    manifest_path = work / "real-photos.parquet"
    data.write_manifest(real_photo_manifest(args.data, args.limit), str(manifest_path))
    config = TrainConfig(
        data=str(manifest_path),
        out=str(work / "run"),
        workers=args.workers,
        epochs=args.epochs,
        patience=args.patience,
        image_size=args.image_size,
        augment=args.augment,
        architecture=args.architecture,
        lr_schedule=args.lr_schedule,
        seed=args.seed,
    )
    if args.members == 1:
        metrics = train.run(config)
        result = {"benchmark": "accuracy", "data": str(args.data)}
        result |= run_figures(config, metrics)
    else:
        members = [
            dataclasses.replace(config, seed=args.seed + i, out=str(work / f"run-{i}"))
            for i in range(args.members)
        ]
        figures = [run_figures(member, trained(member)) for member in members]
        out = work / "ensemble"
        shutil.rmtree(out, ignore_errors=True)  # this script's own output of an earlier run
        ensemble.run(EnsembleConfig(members=tuple(m.out for m in members), out=str(out)))
        metrics = evaluate.run(str(out), str(manifest_path), split="val")
        result = {
            "benchmark": "accuracy",
            "data": str(args.data),
            "config": figures[0]["config"] | {"members": args.members},
            **scores(metrics),
            "members": figures,
            "run_dir": str(out),
        }
        if args.distill:
            student = dataclasses.replace(
                config,
                seed=args.seed + args.members,
                out=str(work / "student"),
                teacher=str(out),
                distill_temperature=args.distill_temperature,
                distill_weight=args.distill_weight,
            )
            result["images_per_second"] = images_per_second(str(out), args.image_size)
            result["student"] = run_figures(student, trained(student)) | {
                "images_per_second": images_per_second(student.out, args.image_size),
                "distill_temperature": student.distill_temperature,
                "distill_weight": student.distill_weight,
            }
            result["student_minus_ensemble"] = round(
                result["student"]["accuracy"] - result["accuracy"], 4
            )
    return result


def trained(config: TrainConfig) -> dict:
    """`dogbread train`'s metrics for this config: read from its run dir when a finished run of
    the very same config is there, resumed from its checkpoint when a stopped one is, else
    trained."""
    done = Path(config.out) / "metrics.json"
    saved = Path(config.out) / CONFIG_FILENAME
    # Loaded, not compared as text: a key added to TrainConfig since then takes its default.
    if saved.exists() and load_config(TrainConfig, str(saved)) == config:
        if done.exists():
            print(f"reusing the finished run in {config.out}", file=sys.stderr)
            return json.loads(done.read_text())
        return train.resume(config.out)
    return train.run(config)


def images_per_second(model_dir: str, image_size: int, batches: int = 20) -> dict:
    """The model's labeling speed alone, float and (when it serves) int8: LiteRT on every core,
    batches of 128 random images after one to warm up (Keras where there is no LiteRT file)."""
    from dogbread.litert import LiteRTModel
    from dogbread.model import LITERT_FILENAME, load_litert, load_model, predict_probabilities

    served, card = load_litert(model_dir) or load_model(model_dir)
    runners = {"float": served}
    if card.litert_int8.get("served"):
        flatbuffer = Path(model_dir, LITERT_FILENAME).read_bytes()
        runners = {"float": LiteRTModel(flatbuffer, served.output_shape), "int8": served}
    images = np.random.default_rng(0).integers(0, 256, (128, image_size, image_size, 3), np.uint8)
    speeds = {}
    for name, runner in runners.items():
        predict_probabilities(runner, images)
        start = time.perf_counter()
        for _ in range(batches):
            predict_probabilities(runner, images)
        speeds[name] = round(batches * len(images) / (time.perf_counter() - start), 1)
    return speeds


def scores(metrics: dict) -> dict:
    """The val split's size and figures, as `dogbread train` and `dogbread evaluate` give them."""
    figures = {k: round(metrics[k], 4) for k in ("accuracy", "precision", "recall")}
    return {"val_images": metrics["images"], **figures}


def run_figures(config: TrainConfig, metrics: dict) -> dict:
    seconds = [row["seconds"] for row in metrics["history"]]
    return {
        "config": {k: getattr(config, k) for k in CONFIG_KEYS},
        "seed": config.seed,
        "epochs_run": metrics["epochs_run"],
        "best_epoch": metrics["best_epoch"],
        **scores(metrics),
        "median_epoch_seconds": sorted(seconds)[len(seconds) // 2] if seconds else None,
        "fit_seconds": round(sum(seconds), 1),
        "run_dir": config.out,
    }


if __name__ == "__main__":
    main()
