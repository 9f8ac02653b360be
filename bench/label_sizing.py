"""Sizing a labeling cluster: the stage rates per CPU core that say how many cores feed a GPU.

Each stage is measured alone, in this one process, without Ray (stage rates, not the pipeline):
decoding a JPEG to 256x256 on one thread, from bytes already in memory and then with the read as
the split plan's decoding task does it (`dogbread.labeler.decode_block`, a block of 128 paths, one
CPU), for the 256 px set and for 12 MP photos; the bytes per image that task hands the object
store; and the seed CNN's LiteRT conversion on 1 and 2 threads, batches of 32 preloaded images.
From them, for each GPU rate given (there is no GPU here): the CPU cores that keep one GPU fed,
and the object-store throughput per GPU. Prints one JSON object.

    python bench/label_sizing.py [--images 2000] [--large-images 100] [--gpu-rates 1000 2000 5000]
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import common
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from dogbread.images import decode_image
from dogbread.labeler import decode_block
from dogbread.model import load_litert, predict_probabilities

SIZE = 256  # the model's input: what decoding resizes to
BLOCK = 128  # paths per decode_block task
BATCH = 32  # images per inference call
THREADS = (1, 2)  # LiteRT threads
FS = pafs.LocalFileSystem()


def timed(step: Callable[[Any], Any], items: Sequence[Any], warmup: Any) -> tuple[float, list]:
    """(wall seconds, results) of `step` over `items`, after one untimed call on `warmup`."""
    step(warmup)
    started = time.perf_counter()
    results = [step(item) for item in items]
    return time.perf_counter() - started, results


def paths_block(paths: list[str], shard: int = 0) -> pa.Table:
    """A block of the split plan: the paths and their shard, as decode_block receives them."""
    return pa.table(
        {"path": pa.array(paths, pa.string()), "shard": pa.array([shard] * len(paths), pa.int64())}
    )


def _decode_block_sizes(block: pa.Table) -> tuple[int, int, int]:
    out = decode_block(block, FS, SIZE)
    return out.nbytes, out.num_rows, out.num_rows - out["error"].null_count


def decode_rates(paths: list[str]) -> tuple[float, float, float, list[np.ndarray]]:
    """One thread: (decode_image images/s, decode_block images/s, object-store bytes per image,
    the decoded images)."""
    data = [Path(p).read_bytes() for p in paths]  # read first: decode and resize only
    seconds, images = timed(lambda d: decode_image(d, SIZE), data, data[0])
    decode = len(data) / seconds
    blocks = [paths_block(paths[i : i + BLOCK], i // BLOCK) for i in range(0, len(paths), BLOCK)]
    seconds, sizes = timed(_decode_block_sizes, blocks, paths_block(paths[:1]))
    nbytes, rows, errors = (sum(s[i] for s in sizes) for i in range(3))
    if errors:
        raise SystemExit(f"decode_block failed on {errors} of {rows} images")
    return decode, rows / seconds, nbytes / rows, images


def litert_rates(model_dir: str, images: list[np.ndarray]) -> dict[str, float]:
    """Images/s of the model's LiteRT conversion on each of THREADS threads, batches of BATCH."""
    loaded = load_litert(model_dir)
    if loaded is None:
        raise SystemExit(f"{model_dir} has no LiteRT conversion (model.tflite) of its model")
    batches = [np.stack(images[i : i + BATCH]) for i in range(0, len(images) - BATCH + 1, BATCH)]
    rates = {}
    for threads in THREADS:
        infer = functools.partial(predict_probabilities, loaded[0].with_threads(threads))
        seconds, _ = timed(infer, batches, batches[0])
        rates[str(threads)] = round(len(batches) * BATCH / seconds, 1)
    return rates


def sizing(
    gpu_rates: list[int], decode_256: float, decode_12mp: float, bytes_per_image: float
) -> list[dict[str, Any]]:
    """Per GPU: the decoding cores that keep it fed, and the pixels it draws from the store."""
    return [
        {
            "gpu_images_per_second": rate,
            "cores_per_gpu_256": math.ceil(rate / decode_256),
            "cores_per_gpu_12mp": math.ceil(rate / decode_12mp),
            "object_store_mib_per_second": round(rate * bytes_per_image / 2**20, 1),
        }
        for rate in gpu_rates
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="256x256 images")
    parser.add_argument("--large-images", type=int, default=100, help="4000x3000 images")
    parser.add_argument(
        "--gpu-rates", type=int, nargs="+", default=[1000, 2000, 5000], help="GPU images/s"
    )
    args = parser.parse_args(argv)
    if args.images < BATCH or args.large_images < 1:
        parser.error(f"--images must be at least {BATCH}, --large-images at least 1")

    machine = common.machine()  # the load average before the runs
    small = common.image_paths(common.SMALL, args.images)
    large = common.image_paths(common.LARGE, args.large_images)
    model = common.model_dir(SIZE)
    decode_small, block_small, bytes_per_image, images = decode_rates(small)
    decode_large, block_large, _, _ = decode_rates(large)
    litert = litert_rates(model, images)
    per_core = {t: round(rate / int(t), 1) for t, rate in litert.items()}
    best = max(per_core.values())  # a CPU-only cluster runs LiteRT at its best rate per core
    result = {
        "benchmark": "label_sizing",
        "machine": machine,
        "images": {"small_256": args.images, "large_12mp": args.large_images},
        "decode_per_core": {
            "small_256": round(decode_small, 1),
            "large_12mp": round(decode_large, 1),
        },
        "decode_block_per_core": {
            "small_256": round(block_small, 1),
            "large_12mp": round(block_large, 1),
        },
        "bytes_per_image_256": round(bytes_per_image, 1),
        "litert_images_per_second": litert,
        "litert_per_core": per_core,
        "cpu_only_litert_cores_per_decode_core": {
            "small_256": round(block_small / best, 2),
            "large_12mp": round(block_large / best, 2),
        },
        "sizing": sizing(args.gpu_rates, block_small, block_large, bytes_per_image),
        "load_average_after": common.machine()["load_average"],
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
