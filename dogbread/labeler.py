"""The labeling actor: reads, decodes and labels a batch of paths, and keeps it as a batch file.

`dogbread label` (label.py) runs a pool of these actors over blocks of paths, each tagged with its
shard; output.py commits a shard once all its batches are kept.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from dogbread import storage
from dogbread.images import DEFAULT_MAX_BYTES, ImageDecodeError, decode_image
from dogbread.output import OUTPUT_SCHEMA, Output, write_batch

INFERENCE_CHUNK = 32  # images per model call: decoding the next chunk overlaps this one
S3_READ_THREADS = 16  # object reads wait on the network: a batch's reads overlap


class Labeler:
    """Reads, decodes and labels a batch of paths, and keeps it as one batch file per shard.

    Decoding runs here, in threads, rather than in Ray tasks of its own: pixels never go through
    the object store (memory stays flat whatever the number of images, and no CPU is spent
    copying them), and the threads decode the next chunk while the model runs on this one.
    Given a LiteRTModel, the actor never imports TensorFlow: it starts in a second, not ten.
    Two calls may run at once (see label._label): the pool and the model are safe to share.
    """

    def __init__(
        self,
        model_file: tuple[pafs.FileSystem, str],
        card_json: str,
        inference: Any,
        in_fs: pafs.FileSystem,
        threshold: float | None,
        out: Output,
    ) -> None:
        from dogbread.model import ModelCard

        self.card = ModelCard.from_json(card_json)
        threads = len(os.sched_getaffinity(0))
        if inference is None:
            self.model, self.card = _load_model_file(model_file, card_json)
        else:
            self.model = inference.with_threads(threads)
        # Object reads wait on the network, local reads and decoding on the CPU.
        self.pool = ThreadPoolExecutor(
            S3_READ_THREADS if isinstance(in_fs, pafs.S3FileSystem) else threads
        )
        self.in_fs, self.threshold, self.out = in_fs, threshold, out

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        from dogbread.model import label_predictions, predict_probabilities

        paths = batch["path"].to_pylist()
        size, n = self.card.image_size, len(paths)
        # In input order; the pool decodes ahead while the model runs on the chunk before.
        decoded = self.pool.map(lambda path: _read_and_decode(self.in_fs, path, size), paths)
        errors: list[str | None] = [None] * n
        probs = np.zeros((n, len(self.card.class_names)), np.float32)
        for start in range(0, n, INFERENCE_CHUNK):
            rows, images = [], []
            for i in range(start, min(start + INFERENCE_CHUNK, n)):
                result = next(decoded)
                if isinstance(result, str):
                    errors[i] = result
                else:
                    rows.append(i)
                    images.append(result)
            if rows:
                probs[rows] = predict_probabilities(self.model, np.stack(images))
        ok = np.flatnonzero([e is None for e in errors])
        ok_labels, ok_scores = label_predictions(probs[ok], self.card.class_names, self.threshold)
        labels, scores, probabilities = [None] * n, [None] * n, [None] * n
        for j, i in enumerate(ok):
            labels[i], scores[i], probabilities[i] = ok_labels[j], ok_scores[j], probs[i]
        version, now = [self.card.model_version] * n, [dt.datetime.now(dt.UTC)] * n
        columns = [paths, labels, scores, probabilities, version, errors, now]
        table = pa.Table.from_arrays(
            [pa.array(c, f.type) for c, f in zip(columns, OUTPUT_SCHEMA, strict=True)],
            schema=OUTPUT_SCHEMA,
        )
        shards = batch["shard"].combine_chunks()
        counts = pc.value_counts(shards)  # a block may hold the end of one shard, then another
        for shard in counts.field("values").to_pylist():
            write_batch(self.out, shard, table.filter(pc.equal(shards, shard)))
        return {
            "shard": counts.field("values").to_numpy(),
            "rows": counts.field("counts").to_numpy(),
        }


def _load_model_file(model_file: tuple[pafs.FileSystem, str], card_json: str) -> tuple[Any, Any]:
    from dogbread.model import CARD_FILENAME, MODEL_FILENAME, load_model

    # The driver's filesystem arrives pickled with its credentials, so an actor can read the
    # model whatever its own environment; load_model then checks it as the driver did.
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, MODEL_FILENAME), "wb") as out:
            out.write(storage.read_bytes(*model_file))
        with open(os.path.join(tmp, CARD_FILENAME), "w") as out:
            out.write(card_json)
        return load_model(tmp)


def _read_and_decode(fs: pafs.FileSystem, uri: str, size: int) -> np.ndarray | str:
    """The file's pixels, or its error ("<reason>: <detail>")."""
    content = read_file(fs, uri)
    if isinstance(content, str):
        return content
    try:
        return decode_image(content, size)
    except ImageDecodeError as exc:
        return str(exc)


def read_file(fs: pafs.FileSystem, uri: str) -> bytes | str:
    """The file's bytes, or its error."""
    try:
        with fs.open_input_file(uri.removeprefix("s3://")) as f:
            if f.size() > DEFAULT_MAX_BYTES:  # refused before a huge file is read into memory
                return f"too_large: {f.size()} bytes, limit is {DEFAULT_MAX_BYTES}"
            return f.read()
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable: {storage.first_line(exc)}"
