"""Start-up of `dogbread label`: seconds from the command's start to its first labeled batch.

Each labeled batch is kept as a file under the output's `_dogbread/batches/` as soon as it is
labeled, so the first one to appear marks the first labeled batch (common.run_label polls for
it). On this short manifest of 256x256 images the driver plans and keeps the first batch itself
while Ray starts (dogbread/label.py). Several runs, the median. Prints one JSON object.

    python bench/startup.py [--images 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
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
        manifest = common.write_manifest(
            common.image_paths(common.SMALL, args.images), work / "input.csv"
        )
        runs = [common.run_label(model, manifest, work / f"out-{i}") for i in range(args.runs)]
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
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
