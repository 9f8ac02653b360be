"""The fastest labeling pipeline without Ray we have: the yardstick for `dogbread label`.

One process. A thread pool reads and decodes the images (dogbread.images.decode_image, so the
same pixels and the same draft-mode JPEG decoding) while the model runs on the chunk before,
through dogbread.model.predict_probabilities: the same LiteRT (XNNPACK) runtime `dogbread label`
uses, on all cores. Labels and scores go to one Parquet file. Prints one JSON object.

    python bench/local_pipeline.py --model DIR --input MANIFEST.csv --output FILE.parquet
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dogbread.images import ImageDecodeError, decode_image
from dogbread.litert import inference_model
from dogbread.model import (
    label_predictions,
    load_litert,
    load_model,
    predict_probabilities,
)

CHUNK = 32  # images per model call, as in the label actor


def _decode(path: str, size: int) -> np.ndarray | None:
    try:
        return decode_image(Path(path).read_bytes(), size)
    except (OSError, ImageDecodeError):
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = common.model_and_input_parser(__doc__)
    parser.add_argument("--output", required=True, help="a Parquet file")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    # As `dogbread label` does: the model's saved LiteRT conversion if it has one (no
    # TensorFlow to import), else the Keras model, converted once.
    saved = load_litert(args.model)
    if saved:
        runner, card = saved
    else:
        model, card = load_model(args.model)
        runner = inference_model(model)
    paths = pacsv.read_csv(args.input)["path"].to_pylist()
    ready = time.perf_counter()

    size, threads = card.image_size, len(os.sched_getaffinity(0))
    probabilities = np.zeros((len(paths), len(card.class_names)), np.float32)
    decoded_ok = np.zeros(len(paths), bool)
    with ThreadPoolExecutor(threads) as pool:
        decoded = pool.map(lambda p: _decode(p, size), paths)  # decodes ahead, in order
        for start in range(0, len(paths), CHUNK):
            rows, images = [], []
            for i in range(start, min(start + CHUNK, len(paths))):
                image = next(decoded)
                if image is not None:
                    rows.append(i)
                    images.append(image)
            if rows:
                probabilities[rows] = predict_probabilities(runner, np.stack(images))
                decoded_ok[rows] = True
    labels, scores = label_predictions(probabilities, card.class_names)
    table = pa.table(
        {
            "path": paths,
            "label": [lab if ok else None for lab, ok in zip(labels, decoded_ok, strict=True)],
            "score": pa.array(np.where(decoded_ok, scores, np.nan), pa.float32()),
        }
    )
    pq.write_table(table, args.output)
    finished = time.perf_counter()
    result = {
        "benchmark": "local_pipeline",
        "images": len(paths),
        "runtime": type(runner).__name__,
        "threads": threads,
        "setup_seconds": round(ready - started, 2),  # model load (and conversion, if needed)
        "labeling_seconds": round(finished - ready, 2),
        "images_per_second_labeling": round(len(paths) / (finished - ready), 1),
        "errors": int((~decoded_ok).sum()),
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
