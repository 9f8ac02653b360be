"""The seed notebook's way of labeling, the baseline: one image at a time through model.predict.

For each image: Keras' load_img with target_size (a full decode, then a resize), img_to_array,
a batch of one, model.predict. Throughput is that of the loop; loading the model is not counted.
Prints one JSON object.

    python bench/seed_loop.py --model DIR --input MANIFEST.csv [--limit N]
"""

from __future__ import annotations

import time

import common
import numpy as np
import pyarrow.csv as pacsv
import tf_keras as keras

from dogbread.model import MODEL_FILENAME


def main(argv: list[str] | None = None) -> dict:
    parser = common.model_and_input_parser(__doc__)
    parser.add_argument("--limit", type=int, help="only the first N images (the loop is slow)")
    args = parser.parse_args(argv)

    model = keras.models.load_model(f"{args.model}/{MODEL_FILENAME}")
    size = model.input_shape[1]
    paths = pacsv.read_csv(args.input)["path"].to_pylist()[: args.limit]
    started = time.perf_counter()
    for path in paths:
        image = keras.utils.load_img(path, target_size=(size, size))
        batch = np.expand_dims(keras.utils.img_to_array(image), 0)
        model.predict(batch, verbose=0)
    seconds = time.perf_counter() - started
    result = {
        "benchmark": "seed_loop",
        "images": len(paths),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(paths) / seconds, 2),
    }
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
