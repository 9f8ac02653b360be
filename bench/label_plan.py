"""Planning a label job over an S3 Inventory of tens of millions of keys (`label --dry-run`).

For each size, an S3-Inventory-like input is written once into the bench cache and reused: a
`manifest.json` (fileFormat Parquet) naming Parquet data files of `bucket`, `key` and `size`, a
million keys a file, keys of 62-73 bytes such as
`photos/2026/11/23/site-0042/cam-017/IMG_20261123_012345678.jpg`, sorted within a file as S3
Inventory lists them. Every file but the first repeats a fraction (--duplicates, 0.1%) of the
previous file's keys, so the plan must find exactly that many duplicate paths.

`python -m dogbread label --model M --input .../manifest.json --output OUT --dry-run` then runs as
a user runs it (its own local Ray in a private RAY_TMPDIR), with AWS_ENDPOINT_URL pointing at a
loopback port where nothing listens: the keys are s3:// paths, and planning must never open one.
Sampled every 0.2 s: the RSS of the driver, and the summed RSS of it and all its descendants (GCS,
raylet, Ray workers); and the CPU seconds of them all, which vary less with a shared machine's
load than the wall time does. Prints one JSON object; targets (no error, driver peak RSS <= 2 GiB,
<= 120 s at the largest size) are reported, not asserted.

    python bench/label_plan.py [--keys 5000000 50000000] [--keys-per-file 1000000] [--smoke]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import common
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dogbread.config import LabelConfig

GENERATOR = 1  # bumped whenever the keys a cached inventory holds would change
SOURCE_BUCKET, CONFIG_ID = "src-bucket", "all-photos"
# Inside the destination bucket's folder: where S3 Inventory puts a configuration's files.
DATA_DIR = f"inventory/{SOURCE_BUCKET}/{CONFIG_ID}/data"
STAMP_DIR = f"inventory/{SOURCE_BUCKET}/{CONFIG_ID}/2026-11-27T01-00Z"
TOPS = ["photos/", "uploads/mobile/", "archive/raw-2019/", "camera-roll/"]
EXTENSIONS = [".jpg", ".jpeg", ".JPG", ".heic"]
DRIVER_RSS_TARGET_MIB, SECONDS_TARGET = 2048, 120.0


# --- the inventory -------------------------------------------------------------------------------


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64 of each value: the key of index i depends on i alone, in every process."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _digits(values: np.ndarray, width: int) -> pa.Array:
    """Zero-padded decimal strings of `values`, built as one buffer (no Python loop per value)."""
    values = values.astype(np.uint64)
    matrix = np.empty((len(values), width), np.uint8)
    for k in range(width):
        matrix[:, width - 1 - k] = 48 + (values // np.uint64(10**k)) % np.uint64(10)
    offsets = np.arange(0, (len(values) + 1) * width, width, dtype=np.int32)
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(matrix)]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)


def inventory_keys(indices: np.ndarray) -> pa.Array:
    """The keys of the given key numbers: unique by their 9-digit number, the rest hashed."""
    h = _mix(indices)

    def field(shift: int, modulo: int) -> np.ndarray:
        return (h >> np.uint64(shift)) % np.uint64(modulo)

    top = pa.array(TOPS).take(pa.array(field(0, len(TOPS)).astype(np.int64)))
    ext = pa.array(EXTENSIONS).take(pa.array(field(2, len(EXTENSIONS)).astype(np.int64)))
    year, month = _digits(2019 + field(4, 8), 4), _digits(1 + field(8, 12), 2)
    day, site = _digits(1 + field(12, 28), 2), _digits(field(20, 200), 4)
    cam, number = _digits(field(30, 40), 3), _digits(indices, 9)
    return pc.binary_join_element_wise(
        top, year, "/", month, "/", day, "/site-", site, "/cam-", cam, "/IMG_", year, month, day,
        "_", number, ext, "",
    )  # fmt: skip


def layout(keys: int, per_file: int, fraction: float) -> list[tuple[int, int, int]]:
    """(first key number, keys of its own, duplicates) per data file: `keys` rows in all. A file
    repeats round(rows * fraction) keys of the file before it, none of them repeated twice."""
    files, start = [], 0
    for f in range(math.ceil(keys / per_file)):
        rows = min(per_file, keys - f * per_file)
        dups = 0 if f == 0 else min(round(rows * fraction), files[-1][1])
        files.append((start, rows - dups, dups))
        start += rows - dups
    return files


def _write_data_file(path: str, own: tuple[int, int], copied: tuple[int, int, int]) -> dict:
    """One data file: keys own[0].. (own[1] of them) and `copied[2]` keys of the file before,
    spread over its range (first key number copied[0], copied[1] keys); sorted by key."""
    indices = np.arange(own[0], own[0] + own[1], dtype=np.int64)
    start, count, dups = copied
    if dups:
        indices = np.concatenate([indices, start + np.arange(dups) * (count // dups)])
    keys = inventory_keys(indices)
    keys = keys.take(pc.sort_indices(keys))
    sizes = _mix(indices + 10**12) % np.uint64(8_000_000) + np.uint64(200_000)
    table = pa.table(
        {
            "bucket": pa.repeat(pa.scalar(SOURCE_BUCKET), len(keys)),
            "key": keys,
            "size": pa.array(sizes.astype(np.int64)),
        }
    )
    tmp = f"{path}.tmp"  # renamed when whole: a killed run leaves no stub
    pq.write_table(table, tmp)
    os.rename(tmp, path)
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            md5.update(chunk)
    return {"size": os.path.getsize(path), "MD5checksum": md5.hexdigest()}


def inventory(keys: int, per_file: int, fraction: float) -> dict[str, Any]:
    """The cached inventory of `keys` rows (written first if missing): its manifest.json, files,
    expected duplicate paths, bytes, and the seconds it took to write (0 when reused)."""
    root = common.CACHE / "s3-inventory" / f"{keys}-{per_file}-{fraction:g}"
    about = root / "bench.json"  # written last: the inventory is whole
    wanted = {"generator": GENERATOR, "keys": keys, "keys_per_file": per_file, "dups": fraction}
    if about.exists() and json.loads(about.read_text())["wanted"] == wanted:
        return json.loads(about.read_text())["inventory"] | {"generate_seconds": 0.0}
    started = time.monotonic()
    (root / DATA_DIR).mkdir(parents=True, exist_ok=True)
    (root / STAMP_DIR).mkdir(parents=True, exist_ok=True)
    plan = layout(keys, per_file, fraction)
    names = [f"{DATA_DIR}/part-{f:05d}.parquet" for f in range(len(plan))]
    print(f"writing an inventory of {keys:,} keys into {root}", file=sys.stderr, flush=True)
    # A file per process at a time, its keys never all in memory at once (~0.3 GB a process).
    with ProcessPoolExecutor(min(os.cpu_count() or 1, 4)) as pool:
        jobs = [
            pool.submit(
                _write_data_file,
                str(root / name),
                plan[f][:2],
                (plan[f - 1][0], plan[f - 1][1], plan[f][2]) if f else (0, 0, 0),
            )
            for f, name in enumerate(names)
        ]
        files = [{"key": name, **job.result()} for name, job in zip(names, jobs, strict=True)]
    manifest = {
        "sourceBucket": SOURCE_BUCKET,
        "destinationBucket": "arn:aws:s3:::inventory-dest",
        "version": "2016-11-30",
        "creationTimestamp": "1795741200000",
        "fileFormat": "Parquet",
        "fileSchema": "message s3.inventory { required binary bucket (STRING); required binary "
        "key (STRING); optional int64 size; }",
        "files": files,
    }
    (root / STAMP_DIR / "manifest.json").write_text(json.dumps(manifest, indent=1))
    found = {
        "manifest": str(root / STAMP_DIR / "manifest.json"),
        "keys": keys,
        "files": len(files),
        "duplicates": sum(d for _, _, d in plan),
        "bytes": sum(f["size"] for f in files),
    }
    seconds = round(time.monotonic() - started, 1)
    about.write_text(json.dumps({"wanted": wanted, "inventory": found, "seconds": seconds}))
    return found | {"generate_seconds": seconds}


# --- the dry run ---------------------------------------------------------------------------------


def _unused_port() -> int:
    """A loopback port nothing listens on (bound, then closed): a request there is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dry_run(model: str, found: dict[str, Any], rows_per_file: int) -> dict[str, Any]:
    """`dogbread label --dry-run` of the inventory: wall time, memory, its JSON and checks."""
    # Short, under /tmp: Ray's socket paths below it must fit in 107 bytes.
    scratch = Path(tempfile.mkdtemp(prefix="dbp-", dir="/tmp"))
    out = scratch / "out"
    command = [sys.executable, "-m", "dogbread", "label", "--model", model, "--dry-run"]
    command += ["--input", found["manifest"], "--output", str(out)]
    command += ["--rows-per-file", str(rows_per_file)]
    env = {k: v for k, v in common.ENV.items() if k != "RAY_ADDRESS"}
    env |= {
        "RAY_TMPDIR": str(scratch / "ray"),  # a Ray of its own, not one found in /tmp/ray
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_unused_port()}",
        "AWS_ACCESS_KEY_ID": "bench-dummy",
        "AWS_SECRET_ACCESS_KEY": "bench-dummy",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    (scratch / "ray").mkdir()
    load_before = os.getloadavg()[0]
    try:
        with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
            started = time.monotonic()
            process = subprocess.Popen(
                command, env=env, cwd=common.PROJECT, stdout=stdout, stderr=stderr
            )
            memory = common.TreeMemory(process.pid)
            process.wait()
            wall = time.monotonic() - started
            peaks = memory.stop()
            stdout.seek(0), stderr.seek(0)
            printed, errors = stdout.read(), stderr.read()
        wrote = out.exists()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result: dict[str, Any] = {
        "keys": found["keys"],
        "files": found["files"],
        "inventory_mib": round(found["bytes"] / 2**20, 1),
        "duplicates_expected": found["duplicates"],
        "seconds": round(wall, 2),
        "cpu_seconds": round(memory.cpu_seconds(), 1),
        "driver_peak_rss_mib": round(memory.peak_root_rss_kib / 1024, 1),
        "total_peak_rss_mib": peaks["peak_rss_mib"],
        "total_peak_pss_mib": peaks["peak_pss_mib"],
        "peak_processes": peaks["peak_processes"],
        "exit_code": process.returncode,
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    lines = printed.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        report = None
    if process.returncode != 0 or report is None:
        return result | {"dry_run": report, "error": errors[-3000:], "ok": False}
    images = found["keys"] - found["duplicates"]
    expected_shards = math.ceil(found["keys"] / rows_per_file)
    checks = {
        "images_is_keys_less_duplicates": report["images"] == images,
        "duplicate_paths_as_written": report["duplicate_paths"] == found["duplicates"],
        "all_to_label": (report["to_label"], report["already_done"], report["retry"])
        == (images, 0, 0),
        "shards_as_estimated": report["shards"] == expected_shards,
        "nothing_written": not wrote,
    }
    return result | {"dry_run": report, "checks": checks, "ok": all(checks.values())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[5_000_000, 50_000_000])
    parser.add_argument("--keys-per-file", type=int, default=1_000_000)
    parser.add_argument("--duplicates", type=float, default=0.001, help="fraction repeated")
    parser.add_argument("--rows-per-file", type=int, default=LabelConfig.rows_per_file)
    parser.add_argument(
        "--smoke", action="store_true", help="20,000 keys in 4 files, 4 shards: a check"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.keys, args.keys_per_file, args.rows_per_file = [20_000], 5_000, 5_000

    machine = common.machine()  # the load average before the runs
    model = common.model_dir(64)
    runs = {}
    for keys in args.keys:
        found = inventory(keys, args.keys_per_file, args.duplicates)
        print(f"dogbread label --dry-run of {keys:,} keys", file=sys.stderr, flush=True)
        runs[str(keys)] = {"generate_seconds": found["generate_seconds"]}
        runs[str(keys)] |= dry_run(model, found, args.rows_per_file)
        print(json.dumps(runs[str(keys)]), file=sys.stderr, flush=True)  # long runs: as they end
    small, large = runs[str(min(args.keys))], runs[str(max(args.keys))]
    ratios = None
    if len(runs) > 1:
        ratios = {
            key: round(large[field] / small[field], 2)
            for key, field in [
                ("keys", "keys"),
                ("seconds", "seconds"),
                ("cpu_seconds", "cpu_seconds"),
                ("driver_peak_rss", "driver_peak_rss_mib"),
                ("total_peak_rss", "total_peak_rss_mib"),
            ]
        }
    targets = {
        "no_error": all(r["ok"] for r in runs.values()),
        "driver_peak_rss_le_2gib": all(
            r["driver_peak_rss_mib"] <= DRIVER_RSS_TARGET_MIB for r in runs.values()
        ),
        "seconds_le_120_at_largest": large["seconds"] <= SECONDS_TARGET,
    }
    result = {
        "benchmark": "label_plan",
        "machine": machine,
        "keys_per_file": args.keys_per_file,
        "duplicate_fraction": args.duplicates,
        "rows_per_file": args.rows_per_file,
        "runs": runs,
        "ratios_largest_over_smallest": ratios,
        "targets": targets,
        "targets_met": all(targets.values()),
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
