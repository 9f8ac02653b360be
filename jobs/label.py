"""`dogbread label` as a Ray job: the same flags, from the same parser.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/label.py --model s3://bucket/runs/r1 --input s3://bucket/inbox \
        --output s3://bucket/labels/r1 --actors 4 --gpu

No sys.path line: `python jobs/label.py` puts jobs/ on sys.path, but Ray puts the job's working dir
first on PYTHONPATH, so the uploaded dogbread/ is the one imported, by the driver and by actors.
"""

import sys

from dogbread.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
