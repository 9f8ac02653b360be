"""`dogbread train` as a Ray job: the same flags (the same parser), plus --smoke-test.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train.py --data s3://bucket/train --out s3://bucket/runs/r1 --workers 4 --gpu

--smoke-test trains 1 epoch at 32x32 on a tiny synthetic tree drawn into a temp dir on the driver's
node (local paths: a single-node check, for CI); flags given with it override its defaults.

No sys.path line: `python jobs/train.py` puts jobs/ on sys.path, but Ray puts the job's working dir
first on PYTHONPATH, so the uploaded dogbread/ is the one imported, by the driver and by workers.
"""

import argparse
import sys
import tempfile

from dogbread.cli import main
from dogbread.synth import write_synthetic_tree

SMOKE_FLAGS = ["--epochs", "1", "--image-size", "32", "--workers", "1", "--batch-size", "8"]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--smoke-test", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if not args.smoke_test:
        return main(["train", *rest])
    with tempfile.TemporaryDirectory(prefix="dogbread-smoke-") as tmp:
        write_synthetic_tree(f"{tmp}/data", per_class=30, seed=0)
        # The caller's flags come last: argparse keeps the last value of a repeated flag.
        return main(["train", "--data", f"{tmp}/data", "--out", f"{tmp}/run", *SMOKE_FLAGS, *rest])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
