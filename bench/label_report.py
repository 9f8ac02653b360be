"""Seconds and peak memory of `dogbread report` on label outputs of 5 and 50 million rows.

The outputs are synthesized as `dogbread label` leaves them (a data file of 1M rows per shard, a
marker per shard, `_summary.json`), with paths to files that do not exist (the thumbnails are then
"unreadable" tiles: the report's reading of rows is what is measured). Written once into the
bench cache and reused. Prints one JSON object.

    python bench/label_report.py [--rows 5000000 50000000] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import common
import numpy as np
import pyarrow as pa

from dogbread.output import (
    META,
    OUTPUT_SCHEMA,
    SUMMARY,
    Output,
    by_kind,
    count_rows,
    data_file_name,
    shard_name,
    write_table,
)

ROWS_PER_FILE = 1_000_000


def synthesize(root: Path, rows: int, per_file: int) -> Path:
    """A label output of `rows` rows in files of `per_file` (cached: a `_SUCCESS` marks it)."""
    if (root / "_SUCCESS").exists():
        return root
    out, rng, now = Output.at(str(root)), np.random.default_rng(0), dt.datetime.now(dt.UTC)
    total: Counter[str] = Counter()
    for shard, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        ids = np.sort(rng.choice(rows * 10, n, replace=False))
        dog = rng.random(n).astype(np.float32)
        failed = rng.random(n) < 0.001  # one row in a thousand is an error row
        table = pa.table(
            {
                "path": [f"/nowhere/inbox/{i % 97:02d}/IMG_{i:010d}.jpg" for i in ids.tolist()],
                "label": pa.array(np.where(dog > 0.5, "dog", "bread"), mask=failed),
                "score": pa.array(np.maximum(dog, 1 - dog), mask=failed),
                "probabilities": pa.array(list(np.stack([1 - dog, dog], 1)), mask=failed),
                "model_version": pa.array(["bench"] * n),
                "error": pa.array(np.full(n, "truncated: synthesized"), mask=~failed),
                "labeled_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            }
        ).cast(OUTPUT_SCHEMA)
        write_table(out.fs, out.path(data_file_name(shard)), table)
        counts = count_rows(table)
        total.update(counts)
        marker = {"shard": shard, "rows": n, "labels": by_kind(counts, "label")}
        marker |= {"errors": by_kind(counts, "error"), "retry": 0, "files": {}}
        out.write(f"{META}/shards/{shard_name(shard)}.json", json.dumps(marker).encode())
    summary = {"images": rows, "labels": by_kind(total, "label"), "errors": by_kind(total, "error")}
    out.write(SUMMARY, json.dumps(summary).encode())
    out.write("_SUCCESS", b"")
    return root


def report(root: Path) -> dict:
    """`python -m dogbread report ROOT` in a process of its own: seconds and peak RSS."""
    started = time.monotonic()
    command = [sys.executable, "-m", "dogbread", "report", str(root)]
    process = subprocess.Popen(command, env=common.ENV, cwd=common.PROJECT)
    memory = common.TreeMemory(process.pid)
    process.wait()
    peaks = memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"dogbread report exited {process.returncode}")
    page = (root / "_report.html").read_text()
    return {
        "seconds": round(time.monotonic() - started, 2),
        "peak_rss_mib": peaks["peak_rss_mib"],
        "page_kib": round(len(page) / 1024, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[5_000_000, 50_000_000])
    parser.add_argument("--smoke", action="store_true", help="2,000 and 20,000 rows")
    args = parser.parse_args(argv)
    sizes, per_file = ([2_000, 20_000], 1_000) if args.smoke else (args.rows, ROWS_PER_FILE)
    machine = common.machine()
    runs = {}
    for rows in sizes:
        root = synthesize(common.CACHE / f"report-{rows}-{per_file}", rows, per_file)
        runs[str(rows)] = {"rows": rows, "files": -(-rows // per_file), **report(root)}
    small, large = (runs[str(n)] for n in sizes)
    result = {
        "benchmark": "label_report",
        "machine": machine,
        "runs": runs,
        "seconds_growth": round(large["seconds"] / small["seconds"], 3),
        "rss_growth": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
