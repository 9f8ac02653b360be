"""Start-up: `dogbread label`'s seconds from the command's start to its first labeled batch, and
`dogbread predict`'s seconds for one image, through LiteRT and through Keras, side by side.

Each labeled batch is kept as a file under the output's `_dogbread/batches/` as soon as it is
labeled, so the first one to appear marks the first labeled batch (common.run_label polls for
it). On this short manifest of 256x256 images the driver plans and keeps the first batch itself
while Ray starts (dogbread/label.py). `predict` of a run dir with its `model.tflite` runs without
TensorFlow; the same run dir without it loads the Keras model. Several runs, the median (predict:
alternating). Prints one JSON object.

    python bench/startup.py [--images 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    machine = common.machine()  # the load average before the runs
    model = common.model_dir(common.SMALL.width)
    work = Path(tempfile.mkdtemp(prefix="dogbread-startup-"))
    try:
        paths = common.image_paths(common.SMALL, args.images)
        manifest = common.write_manifest(paths, work / "input.csv")
        runs = [common.run_label(model, manifest, work / f"out-{i}") for i in range(args.runs)]
        predict = predict_seconds(model, paths[0], work, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = [r["first_batch_seconds"] for r in runs]
    result = {
        "benchmark": "startup",
        "machine": machine,
        "images": args.images,
        "first_batch_seconds": statistics.median(first),
        "first_batch_seconds_runs": first,
        "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "predict": predict,
    }
    common.emit(result)
    return result


def predict_seconds(model: str, image: str, work: Path, runs: int) -> dict:
    """`dogbread predict` of one image, command start to exit: the run dir as `dogbread train`
    writes it (with model.tflite), and a copy without it (Keras), alternating."""
    keras_only = work / "model-keras-only"
    shutil.copytree(model, keras_only, ignore=shutil.ignore_patterns("model.tflite"))
    seconds: dict[str, list[float]] = {"litert": [], "keras": []}
    for _ in range(runs):
        for name, folder in (("litert", model), ("keras", str(keras_only))):
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "dogbread", "predict", "--model", folder, image],
                env=common.ENV,
                cwd=common.PROJECT,
                capture_output=True,
                text=True,
            )
            seconds[name].append(round(time.monotonic() - started, 2))
            if done.returncode != 0 or len(done.stdout.splitlines()) != 1:
                raise RuntimeError(f"predict exited {done.returncode}:\n{done.stderr[-3000:]}")
    litert, keras = (statistics.median(seconds[k]) for k in ("litert", "keras"))
    return {
        "one_image_seconds_litert": litert,
        "one_image_seconds_keras": keras,
        "keras_over_litert": round(keras / litert, 2),
        "runs": seconds,
    }


if __name__ == "__main__":
    main()
