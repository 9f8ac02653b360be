"""Accuracy of dogbread on real photos (../shared/data/dogbread-real), beside the seed notebook.

Trains with `dogbread train` on the photos' train split, stops early on the val split, and reports
the val split's accuracy, precision and recall (dog is the positive class, as in the notebook).
The photos are read where they are; nothing is copied. Prints one JSON object.

    python bench/accuracy.py [--data ../shared/data/dogbread-real] [--epochs 20] [--augment]
        [--architecture seed|residual] [--lr-schedule constant|cosine] [--image-size 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import zip_longest
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from dogbread import data, train
from dogbread.config import TrainConfig

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
    parser.add_argument("--limit", type=int, help="at most this many photos per split (smoke)")
    parser.add_argument("--out", help="run dir (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not (args.data / "manifest.csv").exists():
        sys.exit(f"no real photos at {args.data} (expected manifest.csv)")

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
    )
    start = time.perf_counter()
    metrics = train.run(config)
    seconds = [row["seconds"] for row in metrics["history"]]
    result = {
        "benchmark": "accuracy",
        "data": str(args.data),
        "config": {k: getattr(config, k) for k in CONFIG_KEYS},
        "epochs_run": metrics["epochs_run"],
        "best_epoch": metrics["best_epoch"],
        "val_images": metrics["images"],
        "accuracy": round(metrics["accuracy"], 4),
        "precision": round(metrics["precision"], 4),
        "recall": round(metrics["recall"], 4),
        "seed_notebook": SEED_NOTEBOOK,
        "median_epoch_seconds": sorted(seconds)[len(seconds) // 2] if seconds else None,
        "total_seconds": round(time.perf_counter() - start, 1),
        "run_dir": config.out,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
