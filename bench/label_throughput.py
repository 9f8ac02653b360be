"""Labeling throughput, side by side on the same images: (a) the seed's loop, (b) the fastest
pipeline without Ray (bench/local_pipeline.py), (c) `dogbread label` as a user runs it, and on
the 256 px set (d) `dogbread label --plan split`.

Two image sets: N synthetic JPEGs of 256x256, and N/10 photo-sized ones of 4000x3000 (see
common.py). (b), (c) and (d) are whole programs timed from start to exit, so all pay for loading
the model; (c) and (d) also start Ray. Their steady rates leave the start-up out: (b)'s from its
own clock, (c)'s and (d)'s from the times their Parquet parts appeared. (a) times its loop only,
on the first --seed-images images (it is ~40x slower). (c) runs the default plan, which on one
machine without --gpu is fused (the labeling actor reads, decodes and infers); (d) decodes in
Ray Data tasks of one CPU and passes the pixels through the object store to the actor, which only
infers: split/fused is the measurement that default is chosen by. With --int8, (e) is (c) on
the same model saved with its int8 quantization, served (`int8_over_fused_wall`: e/c). Prints
one JSON object.

    python bench/label_throughput.py [--images 10000] [--large-images 1000] [--repeat 1]
        [--int8] [--architecture seed|residual] [--image-size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

BENCH = Path(__file__).resolve().parent


def run_script(name: str, *args: str) -> tuple[float, dict[str, Any]]:
    """(wall seconds from start to exit, the JSON it printed) of bench/<name>."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(BENCH / name), *args], env=common.ENV, capture_output=True, text=True
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout[done.stdout.index("{") :])


def run_label(model: str, manifest: str, out: Path, *extra: str) -> dict[str, Any]:
    """common.run_label into a fresh `out`, with the plan the run resolved (its _summary.json):
    how it decoded, its actors and their CPUs, and the images its driver labeled while Ray
    started (the fused plan only)."""
    shutil.rmtree(out, ignore_errors=True)
    run = common.run_label(model, manifest, out, list(extra), sample_memory=False)
    plan = json.loads((out / "_summary.json").read_text()).get("plan") or {}
    run["plan"] = {k: plan.get(k) for k in ("decode", "actor_cpus", "actors")}
    labeled_on = plan.get("images_by_node", {}).get("labeled", {})
    run["plan"]["labeled_in_driver"] = labeled_on.get("driver", 0)
    return run


def measure(
    spec: common.ImageSet,
    count: int,
    seed_count: int,
    repeat: int,
    work: Path,
    split: bool,
    models: tuple[str, str | None],
) -> dict:
    """(a), (b) and (c) on the first `count` images of `spec` with models[0]; (d), the split
    plan, if `split`; (e), (c) with models[1] (its int8 twin), if there is one. (b) to (e) run
    `repeat` times, in turn; each reports its median run."""
    seed_count = min(seed_count, count)
    paths = common.image_paths(spec, count)
    manifest = common.write_manifest(paths, work / f"{spec.name}-{count}.csv")
    model, int8_model = models
    load_before = os.getloadavg()[0]
    _, seed = run_script(
        "seed_loop.py", "--model", model, "--input", manifest, "--limit", str(seed_count)
    )
    local_runs, label_runs, split_runs, int8_runs = [], [], [], []
    for _ in range(repeat):  # alternated, so that a change of load hits each alike
        output = work / f"{spec.name}-local.parquet"
        wall, local = run_script(
            "local_pipeline.py", "--model", model, "--input", manifest, "--output", str(output)
        )
        local_runs.append(
            {
                **local,
                "wall_seconds": round(wall, 2),
                "images_per_second_wall": round(count / wall, 1),
            }
        )
        label_runs.append(run_label(model, manifest, work / f"{spec.name}-labels"))
        if split:  # default actors and actor CPUs: 1 actor of 1 CPU, decoding on the rest
            out = work / f"{spec.name}-labels-split"
            split_runs.append(run_label(model, manifest, out, "--plan", "split"))
        if int8_model:
            out = work / f"{spec.name}-labels-int8"
            int8_runs.append({**run_label(int8_model, manifest, out), "int8": _int8_share(out)})
    local = _median_run(local_runs, "images_per_second_wall")
    label = _median_run(label_runs, "images_per_second_wall")
    seed_rate = seed["images_per_second"]
    steady = label["images_per_second_steady"]  # None when all went into one part
    result = {
        "images": count,
        "image_size": f"{spec.width}x{spec.height}",
        "mean_file_kib": round(sum(os.path.getsize(p) for p in paths) / len(paths) / 1024, 1),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "a_seed_loop": seed,
        "b_local_pipeline": local,
        "c_dogbread_label": label,
        "runs": {
            "b": [r["images_per_second_wall"] for r in local_runs],
            "c": [r["images_per_second_wall"] for r in label_runs],
        },
        "c_over_a": round(label["images_per_second_wall"] / seed_rate, 1),
        "c_over_b_wall": round(
            label["images_per_second_wall"] / local["images_per_second_wall"], 2
        ),
        "c_over_b_steady": steady and round(steady / local["images_per_second_labeling"], 2),
    }
    if split_runs:
        _beside_c(result, "d_label_split", "d", split_runs, "split_over_fused")
    if int8_runs:
        _beside_c(result, "e_label_int8", "e", int8_runs, "int8_over_fused")
    return result


def _beside_c(result: dict, name: str, letter: str, runs: list[dict], ratio: str) -> None:
    """The median of `runs` as result[name], beside (c): its rates over (c)'s, end to end as
    `ratio`_wall and at the steady rate as `ratio`_steady."""
    label = result["c_dogbread_label"]
    steady = label["images_per_second_steady"]
    run = _median_run(runs, "images_per_second_wall")
    result[name] = run
    result["runs"][letter] = [r["images_per_second_wall"] for r in runs]
    result[f"{ratio}_wall"] = round(
        run["images_per_second_wall"] / label["images_per_second_wall"], 2
    )
    run_steady = run["images_per_second_steady"]
    result[f"{ratio}_steady"] = round(run_steady / steady, 2) if run_steady and steady else None


def _int8_share(out: Path) -> float:
    """The share of the labels' scores that are whole 256ths: the int8 model's output steps.
    1.0 shows that the run served the int8 model; the float one's hardly ever are."""
    import pyarrow.parquet as pq

    scores = pq.read_table(out, columns=["score"])["score"].to_numpy()
    return round(float(np.mean(np.isclose(scores * 256, np.round(scores * 256), atol=1e-3))), 3)


def _median_run(runs: list[dict], key: str) -> dict:
    value = statistics.median_low(r[key] for r in runs)
    return next(r for r in runs if r[key] == value)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="256x256 images")
    parser.add_argument(
        "--large-images", type=int, help="4000x3000 images (default: images/10; 0: none)"
    )
    parser.add_argument("--seed-images", type=int, default=300, help="images for the seed loop")
    parser.add_argument("--repeat", type=int, default=1, help="runs of (b) to (e); the median")
    parser.add_argument("--int8", action="store_true", help="(e): (c) with int8 inference")
    parser.add_argument("--architecture", default="seed", choices=("seed", "residual"))
    parser.add_argument("--image-size", type=int, default=256, help="the model's input size")
    args = parser.parse_args(argv)
    model = common.model_dir(args.image_size, args.architecture)
    int8 = common.model_dir(args.image_size, args.architecture, int8=True) if args.int8 else None
    large = args.large_images if args.large_images is not None else max(1, args.images // 10)

    work = Path(tempfile.mkdtemp(prefix="dogbread-throughput-"))
    try:
        result = {
            "benchmark": "label_throughput",
            "machine": common.machine(),  # the load average before the runs
            "model": {"architecture": args.architecture, "image_size": args.image_size},
            "small": measure(
                common.SMALL, args.images, args.seed_images, args.repeat, work, True, (model, int8)
            ),
        }
        if large:
            seed_large = max(1, args.seed_images // 3)  # each takes seconds in the seed's loop
            # No (d): at ~70 img/s, 1,000 12 MP images take minutes a run.
            result["large"] = measure(
                common.LARGE, large, seed_large, args.repeat, work, False, (model, int8)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
