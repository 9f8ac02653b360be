"""Peak memory of `dogbread label` at two input sizes: does it grow with the number of images?

The summed RSS (and PSS, which splits shared pages such as Ray's object store fairly) of the
`dogbread label` process and every process it starts (Ray's GCS, raylet, workers), sampled every
0.2 s. 64x64 images and a 64x64 seed CNN keep 50,000 images quick; what could grow with the input
(the listing, the blocks of paths, per-batch results, counters) does not depend on the image size.
With `--plan split` the pixels go through Ray's object store (in PSS), bounded by Ray Data's
backpressure. Prints one JSON object.

    python bench/label_memory.py [--images 5000 50000] [--plan auto|fused|split]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import common


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs=2, default=[5_000, 50_000])
    parser.add_argument("--plan", default="auto", choices=["auto", "fused", "split"])
    args = parser.parse_args(argv)

    machine = common.machine()  # the load average before the runs
    model = common.model_dir(common.TINY.width)
    work = Path(tempfile.mkdtemp(prefix="dogbread-memory-"))
    runs = {}
    try:
        for count in args.images:
            paths = common.image_paths(common.TINY, count)
            manifest = common.write_manifest(paths, work / f"{count}.csv")
            run = common.run_label(model, manifest, work / f"out-{count}", ["--plan", args.plan])
            runs[str(count)] = {k: v for k, v in run.items() if k != "summary"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = (runs[str(n)] for n in args.images)
    result = {
        "benchmark": "label_memory",
        "machine": machine,
        "image_size": f"{common.TINY.width}x{common.TINY.height}",
        "plan": args.plan,
        "runs": runs,
        "rss_growth": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
        "pss_growth": round(large["peak_pss_mib"] / small["peak_pss_mib"], 3),
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
