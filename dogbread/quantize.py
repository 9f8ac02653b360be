"""Int8 LiteRT inference, served only where it is as accurate as the float conversion.

Post-training quantization (litert.quantize_int8) runs the seed CNN ~2.3x faster in XNNPACK, at
a cost in accuracy that depends on the model and its data. So it is measured on val images
against the float LiteRT conversion, and int8 serves (load_litert) only when it loses at most
INT8_MAX_ACCURACY_DROP of val accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from dogbread.litert import LiteRTModel, quantize_int8

if TYPE_CHECKING:
    import pyarrow as pa
    import tf_keras as keras

log = logging.getLogger(__name__)

INT8_MAX_ACCURACY_DROP = 0.003  # 0.3 points of val accuracy
CALIBRATION_IMAGES = 200  # training images the int8 value ranges are taken from
# Val images the two are compared on, at most (0.3 points are 15 of them), a batch at a time.
INT8_CHECK_IMAGES = 5000
SCORE_BATCH = 128  # images per call: a Keras model given thousands at once needs gigabytes


def int8_conversion(
    model: keras.Model,
    calibration_images: np.ndarray,
    val_batches: Iterable[tuple[np.ndarray, np.ndarray]],
) -> tuple[LiteRTModel | None, dict[str, Any]]:
    """(the model's int8 LiteRT quantization, the model card's litert_int8), or (None, {}) when
    it cannot be made. The card says both val accuracies on `val_batches` ((images, labels) as
    sample_batches gives them: scored as they come, never all held), of int8 and of the float
    conversion (inference_model: Keras where it has none), and whether int8 is served: never
    without val images.
    """
    int8 = quantize_int8(model, calibration_images)
    if int8 is None:
        return None, {}
    float_correct = int8_correct = n = 0
    for images, labels in val_batches:
        float_correct += _correct(model, images, labels)
        int8_correct += _correct(int8, images, labels)
        n += len(labels)
    # In counts, so that a drop of exactly 0.3 points is not lost to float rounding.
    served = n > 0 and float_correct - int8_correct <= INT8_MAX_ACCURACY_DROP * n + 1e-9
    card = {
        "float_val_accuracy": float_correct / n if n else None,
        "int8_val_accuracy": int8_correct / n if n else None,
        "val_images": n,
        "served": bool(served),
    }
    log.info(
        "int8 LiteRT %s: %s of %d val images right, the float conversion %s (at most %g fewer)",
        "serves" if served else "is not served",
        int8_correct,
        n,
        float_correct,
        INT8_MAX_ACCURACY_DROP * n,
    )
    return int8, card


def _correct(model: keras.Model | LiteRTModel, images: np.ndarray, labels: np.ndarray) -> int:
    """How many of `images` the model's most probable class gets right."""
    from dogbread.model import predict_probabilities

    right = 0
    for start in range(0, len(labels), SCORE_BATCH):
        probabilities = predict_probabilities(model, images[start : start + SCORE_BATCH])
        right += int(np.sum(probabilities.argmax(axis=1) == labels[start : start + SCORE_BATCH]))
    return right


def sample_images(
    table: pa.Table,
    class_names: tuple[str, ...],
    image_size: int,
    s3_endpoint: str | None = None,
    limit: int = CALIBRATION_IMAGES,
) -> np.ndarray:
    """Up to `limit` images of a manifest split, as sample_batches reads them, in one array."""
    batches = [
        images for images, _ in sample_batches(table, class_names, image_size, s3_endpoint, limit)
    ]
    empty = np.empty((0, image_size, image_size, 3), np.uint8)
    return np.concatenate(batches) if batches else empty


def sample_batches(
    table: pa.Table,
    class_names: tuple[str, ...],
    image_size: int,
    s3_endpoint: str | None = None,
    limit: int = INT8_CHECK_IMAGES,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images, class indices) batches of up to `limit` rows of a manifest split ("path",
    and "label" a class name), decoded in Ray Data tasks (data.decoded_dataset; Ray must be up).

    The rows are evenly spread over the split, not its first ones: a manifest lists a class
    after another. Unreadable files are left out (with a warning), so fewer may come back.
    """
    from dogbread import data

    count = min(limit, table.num_rows)
    if count == 0:
        return
    rows = np.linspace(0, table.num_rows, count, endpoint=False).astype(np.int64)
    dataset = data.decoded_dataset(table.take(rows), class_names, image_size, s3_endpoint)
    for batch in dataset.iter_batches(batch_size=SCORE_BATCH, batch_format="numpy"):
        # Copies: Ray Data's arrays may be views of the object store, pinned while referenced.
        yield batch["image"].copy(), batch["label"].astype(np.int64)
