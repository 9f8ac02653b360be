"""What the benchmarks share: cached image sets, a model, process-tree memory, `dogbread label`.

Image sets are generated once into a cache folder (DOGBREAD_BENCH_CACHE, default
/tmp/dogbread-bench) and reused: image i of a set is always the same, so a run of N images uses
the first N files, listed in a manifest, and a larger run only draws the missing ones.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DOGBREAD_BENCH_CACHE", "/tmp/dogbread-bench"))
# Every Python the benchmarks start runs tf-keras and stays quiet, as the tests' conftest does.
# Ray's own temp folder: with the default one, ray.init() joins whatever Ray another user of a
# shared machine started last (/tmp/ray/ray_current_cluster) instead of starting its own.
ENV = {
    **os.environ,
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "RAY_TMPDIR": str(CACHE / "ray"),
}
os.environ.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")


@dataclass(frozen=True)
class ImageSet:
    """How the images of a set are made: a synthetic drawing resized to `width` x `height`."""

    name: str
    width: int
    height: int
    noise: float  # weight of uniform noise blended in after resizing (sensor-like detail)
    quality: int  # JPEG quality


# About 256x256, the model's input size: decoding is cheap and the model dominates.
SMALL = ImageSet("small-256", 256, 256, 0.0, 90)
# Phone-photo sized. Upscaling a drawing gives smooth images that JPEG squeezes to a few hundred
# KB; blended noise brings them to ~1.4 MB, closer to a real 12 MP photo's entropy-decoding cost.
LARGE = ImageSet("large-4000x3000", 4000, 3000, 0.04, 90)
# For the memory benchmark: 50,000 of them are quick to draw and to label with a 64x64 model.
TINY = ImageSet("tiny-64", 64, 64, 0.0, 90)


def _draw(spec: ImageSet, index: int) -> None:
    from dogbread.synth import draw_image

    path = CACHE / spec.name / f"img_{index:06d}.jpg"
    if path.exists():
        return
    rng = np.random.default_rng(np.random.SeedSequence(7, spawn_key=(index,)))
    image = draw_image(index % 2, rng)
    resample = Image.Resampling.BICUBIC if spec.width > image.width else Image.Resampling.BILINEAR
    image = image.resize((spec.width, spec.height), resample)
    if spec.noise:
        noise = Image.frombytes("RGB", image.size, rng.bytes(spec.width * spec.height * 3))
        image = Image.blend(image, noise, spec.noise)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=spec.quality)
    tmp = path.with_name(f".{path.name}.tmp")  # renamed when whole: a killed run leaves no stub
    tmp.write_bytes(buffer.getvalue())
    tmp.rename(path)


def image_paths(spec: ImageSet, count: int) -> list[str]:
    """The first `count` images of the set, drawing (on every core) whichever are missing."""
    folder = CACHE / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"img_{i:06d}.jpg") for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not os.path.exists(p)]
    if missing:
        print(f"drawing {len(missing)} {spec.name} images into {folder}", file=sys.stderr)
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_draw, [spec] * len(missing), missing, chunksize=16))
    return paths


def write_manifest(paths: list[str], out: Path) -> str:
    """A CSV manifest of `paths`, the input `dogbread label` takes instead of a folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("path\n" + "\n".join(paths) + "\n")
    return str(out)


def model_dir(image_size: int, architecture: str = "seed", int8: bool = False) -> str:
    """An untrained CNN (fixed initial weights) with its card; throughput ignores weights.

    With `int8`, the same model saved with its int8 quantization too, served whatever its
    accuracy (an untrained model's is meaningless): `dogbread label` then runs it. Its value
    ranges are taken from the first CALIBRATION_IMAGES images of the 256 px set.
    """
    name = "model" if architecture == "seed" else f"model-{architecture}"
    folder = CACHE / f"{name}-{image_size}{'-int8' if int8 else ''}"
    if not (folder / "model_card.json").exists():
        import tf_keras as keras

        from dogbread.model import ModelCard, ModelConfig, build_model, save_model

        keras.utils.set_random_seed(0)
        model = build_model(ModelConfig(image_size=image_size, architecture=architecture))
        card = ModelCard(("bread", "dog"), image_size, 0)
        quantized, int8_card = _int8(model, image_size) if int8 else (None, None)
        save_model(model, card, str(folder), litert=True, int8=quantized, int8_card=int8_card)
    return str(folder)


def _int8(model: Any, image_size: int) -> tuple[Any, dict[str, Any]]:
    from dogbread.images import decode_image
    from dogbread.litert import quantize_int8
    from dogbread.quantize import CALIBRATION_IMAGES

    paths = image_paths(SMALL, CALIBRATION_IMAGES)
    calibration = np.stack([decode_image(Path(p).read_bytes(), image_size) for p in paths])
    quantized = quantize_int8(model, calibration)
    if quantized is None:
        raise RuntimeError("the int8 quantization failed: see the warning above")
    card = {"float_val_accuracy": None, "int8_val_accuracy": None, "val_images": 0}
    return quantized, {**card, "served": True}


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including how busy it was at the time."""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # The name in parentheses may hold spaces; the parent pid is the 2nd field after it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(root: int) -> Iterator[int]:
    tree, todo = _children(), [root]
    while todo:
        pid = todo.pop()
        yield pid
        todo.extend(tree.get(pid, ()))


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; PSS splits shared pages (the object store) fairly."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if ":" in line}
    return values.get("Rss", 0), values.get("Pss", 0)


class TreeMemory:
    """Samples the summed RSS and PSS of a process and all its descendants every `every` s.

    A local `ray.init` starts GCS, the raylet and every Ray worker as descendants of the driver,
    so the tree of `dogbread label` is all of its processes, and none of another user's Ray.
    `peak_root_rss_kib` is the peak RSS of the process `pid` alone (the driver); `cpu_seconds()`
    the CPU time of every process of the tree as last sampled (Ray's processes are not reaped by
    their parents, so the rusage of children misses most of them).
    """

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every = pid, every
        self.peak_rss_kib = self.peak_pss_kib = self.peak_processes = self.peak_root_rss_kib = 0
        self._cpu_ticks: dict[tuple[int, str], int] = {}  # (pid, start time): utime + stime
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = list(_descendants(self.pid))
            usage = [_memory_kib(p) for p in pids]  # pids[0] is the root
            self.peak_root_rss_kib = max(self.peak_root_rss_kib, usage[0][0])
            self.peak_rss_kib = max(self.peak_rss_kib, sum(r for r, _ in usage))
            self.peak_pss_kib = max(self.peak_pss_kib, sum(p for _, p in usage))
            self.peak_processes = max(self.peak_processes, len(pids))
            for pid in pids:
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:  # ended meanwhile
                    continue
                self._cpu_ticks[pid, fields[19]] = int(fields[11]) + int(fields[12])
            self._stop.wait(self.every)

    def cpu_seconds(self) -> float:
        return sum(self._cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss_mib": round(self.peak_rss_kib / 1024, 1),
            "peak_pss_mib": round(self.peak_pss_kib / 1024, 1),
            "peak_processes": self.peak_processes,
        }


def run_label(
    model: str,
    manifest: str,
    output: Path,
    extra: list[str] | None = None,
    sample_memory: bool = True,
) -> dict[str, Any]:
    """`python -m dogbread label` as a user runs it: wall time, first batch, its summary, memory.

    The output's kept batches (`_dogbread/batches/**/batch-*-n<rows>.pq`, each written once
    its batch is labeled, deleted once its shard is committed) are polled: the first one's
    appearance is the first labeled batch, and their write times give the steady rate. Sampling
    memory reads every process's smaps_rollup 5 times a second, which costs CPU: throughput runs
    leave it out.
    """
    command = [sys.executable, "-m", "dogbread", "label", "--model", model]
    command += ["--input", manifest, "--output", str(output), *(extra or [])]
    (CACHE / "ray").mkdir(parents=True, exist_ok=True)
    # Files rather than pipes: nobody reads a pipe while the job runs, and a full one blocks it.
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    started = time.monotonic()
    process = subprocess.Popen(command, env=ENV, cwd=PROJECT, stdout=stdout, stderr=stderr)
    memory = TreeMemory(process.pid) if sample_memory else None
    first_part, batches = None, {}
    while process.poll() is None:
        for batch in (output / "_dogbread" / "batches").rglob("batch-*.pq"):
            if batch not in batches:
                with contextlib.suppress(FileNotFoundError):  # committed meanwhile
                    batches[batch] = (batch.stat().st_mtime, int(batch.stem.rsplit("-n", 1)[1]))
                first_part = first_part or time.monotonic() - started
        time.sleep(0.05 if first_part is None else 0.5)  # write times date the rest
    wall = time.monotonic() - started
    peaks = memory.stop() if memory else {}
    out, err = (_read_all(f) for f in (stdout, stderr))
    if process.returncode != 0:
        raise RuntimeError(f"dogbread label exited {process.returncode}:\n{err[-3000:]}")
    summary = json.loads(out[out.index("{") :])
    by_node = summary.get("plan", {}).get("images_by_node", {})
    in_driver = by_node.get("labeled", {}).get("driver", 0)  # kept while Ray started
    return {
        "wall_seconds": round(wall, 2),
        "images_per_second_wall": round(summary["labeled"] / wall, 1),
        "images_per_second_summary": summary["images_per_second"],
        "images_per_second_steady": _steady_rate(sorted(batches.values()), in_driver),
        "first_batch_seconds": round(first_part, 2) if first_part is not None else None,
        "summary": {k: summary[k] for k in ("labeled", "labels", "errors", "labeling_seconds")},
        **peaks,
    }


def _steady_rate(batches: list[tuple[float, int]], in_driver: int) -> float | None:
    """Images/s of Ray's pipeline, from its first batch to its last: start-up left out.

    The driver of a small job keeps the first `in_driver` rows while Ray starts, in batches
    written before any of Ray's (it stops when Ray is up); they and the gap before Ray's first
    batch are left out too.
    """
    while batches and in_driver > 0:
        in_driver -= batches.pop(0)[1]
    if len(batches) < 2:
        return None
    rows = sum(n for _, n in batches[1:])
    return round(rows / (batches[-1][0] - batches[0][0]), 1)


def _read_all(file: IO[str]) -> str:
    with file:
        file.seek(0)
        return file.read()


def model_and_input_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the scripts that label a manifest with a model: --model, --input."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True, help="a CSV manifest with a path column")
    return parser


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2), flush=True)
