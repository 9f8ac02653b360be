"""Training overhead: epoch time of `dogbread train` against a plain single-process Keras fit.

Both train the seed CNN at 256x256 with batch 32 on the same photos: the real photos'
train split (../shared/data/dogbread-real, read in place), or synthetic ones when those are absent
(then `data` says so). `dogbread train` runs as a user runs it (Ray Train, tf-keras under
MultiWorkerMirroredStrategy, each worker's rows decoded once and kept in its memory); its epoch
times are the `seconds` of metrics.json's history (fit plus validation; the checkpoint is not
in them). The plain fit gets the same pixels, decoded once into numpy arrays, and is timed the
same way (fit plus validation per epoch). Steady state: the median of epochs 2..n.

Rounds: a fit of 512 random images here took ~8.5 s in some runs and ~10.3 s in others (then
with 1.6 of the 2 CPUs busy), so that one pair of runs could show an overhead that is not there.
Each round runs the plain fit and then `dogbread train --workers 1`, back to back; the
overhead is the median of the rounds' ratios. Other worker counts run in the first round only.
Prints one JSON object.

    python bench/train_overhead.py [--epochs 5] [--workers 1 2] [--rounds 3] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import accuracy
import common
import numpy as np

from dogbread import data
from dogbread.images import decode_image

SIZE, BATCH = 256, 32


def training_manifest(work: Path, limit: int | None) -> tuple[str, str]:
    """(manifest path, what data it lists)."""
    if (accuracy.DEFAULT_DATA / "manifest.csv").exists():
        manifest = accuracy.real_photo_manifest(accuracy.DEFAULT_DATA, limit)
        source = f"real photos: {accuracy.DEFAULT_DATA}"
    else:
        from dogbread.synth import write_synthetic_tree

        per_class = (limit or 800) // 2
        write_synthetic_tree(work / "synthetic", per_class=per_class, seed=3)
        manifest = data.list_labeled_tree(str(work / "synthetic"))
        source = f"SYNTHETIC images ({2 * per_class}): no real photos at {accuracy.DEFAULT_DATA}"
    path = work / "manifest.parquet"
    data.write_manifest(manifest, str(path))
    return str(path), source


def dogbread_epochs(manifest: str, workers: int, epochs: int, work: Path) -> dict[str, Any]:
    out = work / f"run-{workers}"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "dogbread", "train", "--data", manifest, "--out", str(out)]
    command += ["--workers", str(workers), "--epochs", str(epochs), "--patience", str(epochs)]
    # No retries: a run resumed from a checkpoint would mix restarts into the epoch times. The
    # plain fit's batch, split over the workers (--batch-size is per worker), at its rate.
    command += ["--image-size", str(SIZE), "--batch-size", str(BATCH // workers)]
    command += ["--learning-rate", str(1e-3 / workers), "--max-failures", "0"]
    (common.CACHE / "ray").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = subprocess.run(command, env=common.ENV, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:  # recorded, so that the other worker counts are still measured
        return {"error": f"exit code {done.returncode}", "stderr_tail": done.stderr[-3000:]}
    history = json.loads((out / "metrics.json").read_text())["history"]
    return _epochs([row["seconds"] for row in history]) | {"wall_seconds": round(wall, 1)}


def plain_keras_epochs(manifest: str, epochs: int) -> dict[str, Any]:
    import tf_keras as keras

    from dogbread.model import ModelConfig, build_model

    table = data.read_manifest(manifest)
    splits = {}
    for split in ("train", "val"):
        rows = table.split(split).to_pylist()
        images = np.stack([decode_image(Path(r["path"]).read_bytes(), SIZE) for r in rows])
        labels = np.array([table.class_names.index(r["label"]) for r in rows])
        splits[split] = images, labels
    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            times.append(time.perf_counter() - self.started)  # validation included, as in train

    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(image_size=SIZE, num_classes=len(table.class_names)))
    model.fit(
        *splits["train"],
        batch_size=BATCH,
        epochs=epochs,
        validation_data=splits["val"],
        shuffle=True,
        callbacks=[EpochTimer()],
        verbose=0,
    )
    return _epochs(times)


def _epochs(seconds: list[float]) -> dict[str, Any]:
    steady = seconds[1:] or seconds  # epoch 1 also traces and warms up
    return {
        "epoch_seconds": [round(s, 2) for s in seconds],
        "steady_epoch_seconds": round(statistics.median(steady), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, help="at most this many photos per split (smoke)")
    args = parser.parse_args(argv)

    machine = common.machine()  # the load average before the runs
    work = Path(tempfile.mkdtemp(prefix="dogbread-train-overhead-"))
    rounds = []
    try:
        manifest, source = training_manifest(work, args.limit)
        for number in range(args.rounds):
            counts = args.workers if number == 0 else [w for w in args.workers if w == 1]
            plain = plain_keras_epochs(manifest, args.epochs)
            runs = {
                str(w): dogbread_epochs(manifest, w, args.epochs, work / str(number))
                for w in counts
            }
            rounds.append({"plain_keras": plain, "dogbread_train": runs})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    overhead: dict[str, list[float]] = {}
    for round_ in rounds:
        plain_steady = round_["plain_keras"]["steady_epoch_seconds"]
        for w, run_ in round_["dogbread_train"].items():
            if "error" not in run_:
                overhead.setdefault(w, []).append(run_["steady_epoch_seconds"] / plain_steady)
    result = {
        "benchmark": "train_overhead",
        "machine": machine,
        "data": source,
        "image_size": SIZE,
        "batch_size": BATCH,
        "epochs": args.epochs,
        "rounds": rounds,
        "overhead": {w: round(statistics.median(r), 3) for w, r in overhead.items()},
        "overhead_by_round": {w: [round(x, 3) for x in r] for w, r in overhead.items()},
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
