"""Peak memory of `dogbread train` at two dataset sizes: Ray's object store, the driver, all.

`python -m dogbread train --data TREE --out RUN --image-size 64 --epochs 2 --workers 2
--batch-size 32 --seed 0` runs as a user runs it, on synthetic trees of each size (drawn once
into the cache by `dogbread.synth.write_synthetic_tree`, half the images per class), each run
starting its own local Ray in a private RAY_TMPDIR (short, under /tmp: Ray's socket paths must
fit in 107 bytes). Every 0.2 s, while it runs:

- object store: the bytes of tmpfs pages behind the raylet's plasma file. The raylet (found by
  our RAY_TMPDIR in its command line) makes the store one /dev/shm/plasmaXXXXXX file, unlinks
  it and keeps it open, so `stat /proc/RAYLET/fd/N` gives the store's capacity (`st_size`) and
  the pages written so far (`st_blocks`): RAM the store really holds. Written pages stay (freed
  space is reused, not returned), so this is the store's high-water mark, slack included, read
  with one stat, where `ray memory` or the state API start a Ray client per sample and the
  raylet's debug_state.txt and metrics are refreshed every 10 s. Against Ray's own accounting
  (object_store_memory total - available in debug_state.txt), 2026-12-07: 1-2 MiB more at 200
  to 20,000 images (60.6 vs 58.9 MiB at 5,000, 237.1 vs 235.8 at 20,000);
- spilled: the bytes of the files in the session's ray_spilled_objects_* folder, Ray's default
  spill folder, peak;
- driver: VmHWM of the `dogbread train` process (peak RSS; its last < 0.2 s is not seen);
- all processes: common.TreeMemory's summed RSS and PSS of it and its descendants (Ray's GCS,
  raylet, workers), which count the store's pages too (RSS once per process mapping them).

Growth is the larger size's figure over the smaller's; the target is 1.25x. `--worker-cache-mib`
is passed on: the default (2048) keeps each worker's decoded rows in its memory, 0 streams every
epoch through Ray Data. Prints one JSON object.

    python bench/train_memory.py [--sizes 5000,20000] [--epochs 2] [--image-size 64]
                                 [--worker-cache-mib N] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import common

TARGET_GROWTH = 1.25
TRAIN_FLAGS = ["--workers", "2", "--batch-size", "32", "--seed", "0"]
MIB = 2**20


def _draw_tree(images: int) -> None:
    from dogbread.synth import write_synthetic_tree

    tree = common.CACHE / f"train-synth-{images}"
    # Drawn aside and renamed when whole, so a killed run leaves no tree that looks finished.
    partial = tree.with_name(f".{tree.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_synthetic_tree(partial, per_class=images // 2, seed=0)
    partial.rename(tree)


def synthetic_trees(sizes: list[int]) -> dict[int, Path]:
    """A labeled tree (bread/, dog/) of each size in the cache, drawing the missing ones."""
    trees = {n: common.CACHE / f"train-synth-{n}" for n in sizes}
    missing = [n for n, tree in trees.items() if not tree.is_dir()]
    if missing:
        print(f"drawing synthetic trees of {missing} images", file=sys.stderr, flush=True)
        common.CACHE.mkdir(parents=True, exist_ok=True)
        # One tree per process: both cores work when two are missing.
        with ProcessPoolExecutor(len(missing)) as pool:
            list(pool.map(_draw_tree, missing))
    return trees


class StoreSampler:
    """Peaks of the object store's pages, spilled bytes and the driver's VmHWM (module doc)."""

    def __init__(self, pid: int, ray_tmpdir: str, every: float = 0.2) -> None:
        self.pid, self.ray_tmpdir, self.every = pid, ray_tmpdir, every
        self.raylet: int | None = None
        self.store_bytes = self.capacity_bytes = self.spilled_bytes = self.driver_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _find_raylet(self) -> int | None:
        tag = self.ray_tmpdir.encode()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):  # the process ended while we looked
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"/raylet") and tag in b" ".join(argv):
                    return int(entry.name)
        return None

    def _sample(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.driver_kib = max(self.driver_kib, int(line.split()[1]))
        self.raylet = self.raylet or self._find_raylet()
        if self.raylet:
            store = capacity = 0
            with contextlib.suppress(OSError):  # the raylet ended meanwhile
                for fd in os.scandir(f"/proc/{self.raylet}/fd"):
                    with contextlib.suppress(OSError):
                        if "plasma" in os.readlink(fd.path):
                            st = os.stat(fd.path)
                            store, capacity = store + st.st_blocks * 512, capacity + st.st_size
            self.store_bytes = max(self.store_bytes, store)
            self.capacity_bytes = max(self.capacity_bytes, capacity)
        spilled = 0
        for folder in glob.glob(f"{self.ray_tmpdir}/ray/session_*/ray_spilled_objects*"):
            for root, _, files in os.walk(folder):
                for name in files:
                    with contextlib.suppress(OSError):  # deleted when its object is freed
                        spilled += os.stat(os.path.join(root, name)).st_size
        self.spilled_bytes = max(self.spilled_bytes, spilled)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {
            "driver_peak_rss_mib": round(self.driver_kib / 1024, 1),
            # None: no raylet of ours was seen, so nothing was measured (not an empty store).
            "object_store_peak_mib": round(self.store_bytes / MIB, 1) if self.raylet else None,
            "object_store_capacity_mib": round(self.capacity_bytes / MIB),
            "spilled_peak_mib": round(self.spilled_bytes / MIB, 1),
        }


def run_train(
    tree: Path, out: Path, epochs: int, image_size: int, cache_mib: int
) -> dict[str, Any]:
    """`python -m dogbread train` on `tree` with its own Ray: wall time and memory peaks."""
    ray_tmpdir = tempfile.mkdtemp(prefix="dbtm-", dir="/tmp")
    env = {k: v for k, v in common.ENV.items() if k != "RAY_ADDRESS"}  # a local Ray, ours
    env["RAY_TMPDIR"] = ray_tmpdir
    command = [sys.executable, "-m", "dogbread", "train", "--data", str(tree), "--out", str(out)]
    command += ["--image-size", str(image_size), "--epochs", str(epochs), *TRAIN_FLAGS]
    command += ["--worker-cache-mib", str(cache_mib)]
    # A file, not a pipe: nobody reads a pipe while the job runs, and a full one blocks it.
    with tempfile.TemporaryFile("w+") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            command, env=env, cwd=common.PROJECT, stdout=log, stderr=subprocess.STDOUT
        )
        tree_memory = common.TreeMemory(process.pid)
        store = StoreSampler(process.pid, ray_tmpdir)
        process.wait()
        wall = time.monotonic() - started
        peaks = {**store.stop(), **tree_memory.stop()}
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"dogbread train exited {process.returncode}:\n{log.read()[-3000:]}")
    return {"wall_seconds": round(wall, 1), **peaks}


def _growth(small: float | None, large: float | None) -> float | None:
    return round(large / small, 3) if small and large is not None else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,20000", help="two image counts, small,large")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--worker-cache-mib", type=int, default=2048)
    # One run: a second size adds a minute of CI and nothing the first run does not exercise.
    parser.add_argument("--smoke", action="store_true", help="one run of 200 images, 1 epoch")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.epochs = "200", 1
    sizes = [int(n) for n in args.sizes.split(",")]
    if len(sizes) != 2 and not args.smoke:
        parser.error("--sizes takes two image counts, e.g. 5000,20000")

    machine = common.machine()  # the load average before the runs
    trees = synthetic_trees(sizes)
    work = Path(tempfile.mkdtemp(prefix="dogbread-train-memory-"))
    runs = {}
    try:
        for n in sizes:
            runs[str(n)] = run_train(
                trees[n], work / f"run-{n}", args.epochs, args.image_size, args.worker_cache_mib
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small = runs[str(sizes[0])]
    large = runs[str(sizes[1])] if len(sizes) == 2 else {}  # --smoke: no growth to measure
    result = {
        "benchmark": "train_memory",
        "machine": machine,
        "load_average_after": list(os.getloadavg()),
        "command": f"dogbread train --image-size {args.image_size} --epochs {args.epochs} "
        + " ".join(TRAIN_FLAGS)
        + f" --worker-cache-mib {args.worker_cache_mib}",
        "runs": runs,
        "driver_rss_growth": _growth(
            small["driver_peak_rss_mib"], large.get("driver_peak_rss_mib")
        ),
        "object_store_growth": _growth(
            small["object_store_peak_mib"], large.get("object_store_peak_mib")
        ),
        "tree_rss_growth": _growth(small["peak_rss_mib"], large.get("peak_rss_mib")),
        "tree_pss_growth": _growth(small["peak_pss_mib"], large.get("peak_pss_mib")),
        "target_growth": TARGET_GROWTH,
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
