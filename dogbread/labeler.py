"""The labeling stages: the actor that labels a batch and keeps it as a batch file, and the
decoding task that feeds it pixels when decoding runs apart from it.

`dogbread label` (label.py) runs them over blocks of paths, each tagged with its shard, in one of
two plans: "fused", the actor reads and decodes its batch itself; "split", `decode_block` tasks
read and decode on any node's CPUs and the actor receives pixels. output.py commits a shard once
all its batches are kept.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import math
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from dogbread import storage
from dogbread.errors import first_line
from dogbread.images import DEFAULT_MAX_BYTES, ImageDecodeError, decode_image
from dogbread.output import OUTPUT_SCHEMA, Output, write_batch

INFERENCE_CHUNK = 32  # images per model call: decoding the next chunk overlaps this one
S3_READ_THREADS = 16  # object reads wait on the network: a batch's reads overlap


class Labeler:
    """Reads, decodes and labels a batch of paths, and keeps it as one batch file per shard.

    A batch of paths (the fused plan) is read and decoded here, in threads: pixels never go
    through the object store, and the threads decode the next chunk while the model runs on this
    one. A batch that holds `pixels` (the split plan, from decode_block) is only labeled.
    The actor runs as many threads as the CPUs it reserves (`cpus`), so Ray's accounting holds.
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
        cpus: float,
    ) -> None:
        import ray

        from dogbread.model import ModelCard

        self.card = ModelCard.from_json(card_json)
        threads = max(1, math.ceil(cpus))  # not os.sched_getaffinity: a pod sees the host's cores
        if inference is None:
            self.model, self.card = _load_model_file(model_file, card_json)
        else:
            self.model = inference.with_threads(threads)
        # Object reads wait on the network, local reads and decoding on the CPU.
        self.pool = ThreadPoolExecutor(
            S3_READ_THREADS if isinstance(in_fs, pafs.S3FileSystem) else threads
        )
        self.in_fs, self.threshold, self.out = in_fs, threshold, out
        # Where it runs, for the summary; a Labeler in the driver (label.py) runs before Ray does.
        context = ray.get_runtime_context() if ray.is_initialized() else None
        self.node = context.get_node_id() if context else "driver"
        self.actor = (context.get_actor_id() if context else None) or "driver"

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        paths = batch["path"].to_pylist()
        split = "pixels" in batch.column_names  # decoded by decode_block (the split plan)
        if split:
            decoded = _decoded_images(batch, self.card.image_size)
        else:  # in input order; the pool decodes ahead while the model runs on the chunk before
            size = self.card.image_size
            decoded = self.pool.map(lambda path: _read_and_decode(self.in_fs, path, size), paths)
        table = self._labeled(paths, decoded)
        shards = batch["shard"].combine_chunks()
        for shard in pc.unique(shards).to_pylist():  # a block may end one shard, start the next
            write_batch(self.out, shard, table.filter(pc.equal(shards, shard)))
        # Which nodes decoded and labeled these rows, for the summary: where the work ran.
        decoded_on = batch["decoded_on"].to_pylist() if split else [self.node] * len(paths)
        done = collections.Counter(zip(shards.to_pylist(), decoded_on, strict=True))
        return {
            "shard": np.array([shard for shard, _ in done]),
            "rows": np.array(list(done.values())),
            "decoded_on": np.array([node for _, node in done]),
            "labeled_on": np.array([self.node] * len(done)),
            "actor": np.array([self.actor] * len(done)),
        }

    def _labeled(self, paths: list[str], decoded: Iterator[np.ndarray | str]) -> pa.Table:
        """The output rows of `paths`, given their images (or errors) in order."""
        from dogbread.model import label_predictions, predict_probabilities

        n = len(paths)
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
        return pa.Table.from_arrays(
            [pa.array(c, f.type) for c, f in zip(columns, OUTPUT_SCHEMA, strict=True)],
            schema=OUTPUT_SCHEMA,
        )


PIXELS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("shard", pa.int64()),
        ("pixels", pa.binary()),
        ("error", pa.string()),
        ("decoded_on", pa.string()),  # the Ray node id
    ]
)


def decode_block(batch: pa.Table, in_fs: pafs.FileSystem, image_size: int) -> pa.Table:
    """The split plan's decoding stage, a Ray Data task of one CPU: a block of paths in, the same
    rows out with their pixels (image_size² x 3 bytes, RGB) or their error.

    Decoding runs on the task's one thread; object reads, which wait on the network, overlap in
    threads. These blocks are what crosses the object store to the labeling actors: ~192 KiB an
    image at 256 px, bounded by Ray Data's backpressure.
    """
    paths = batch["path"].to_pylist()
    if isinstance(in_fs, pafs.S3FileSystem):
        contents = _read_pool().map(functools.partial(read_file, in_fs), paths)
    else:
        contents = (read_file(in_fs, path) for path in paths)
    pixels: list[bytes | None] = []
    errors: list[str | None] = []
    for content in contents:
        decoded = content if isinstance(content, str) else _decode(content, image_size)
        pixels.append(None if isinstance(decoded, str) else decoded.tobytes())
        errors.append(decoded if isinstance(decoded, str) else None)
    columns = [batch["path"], batch["shard"], pa.array(pixels, pa.binary()), pa.array(errors)]
    node = pa.array([_node_id()] * len(paths), pa.string())
    return pa.Table.from_arrays([*columns, node], schema=PIXELS_SCHEMA)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


@functools.cache
def _read_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(S3_READ_THREADS)  # one per worker process, kept between tasks


def _decoded_images(batch: pa.Table, size: int) -> Iterator[np.ndarray | str]:
    """decode_block's rows back as images (or their errors), in order."""
    for pixels, error in zip(batch["pixels"].to_pylist(), batch["error"].to_pylist(), strict=True):
        yield error if pixels is None else np.frombuffer(pixels, np.uint8).reshape(size, size, 3)


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
    return content if isinstance(content, str) else _decode(content, size)


def _decode(content: bytes, size: int) -> np.ndarray | str:
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
        return f"unreadable: {first_line(exc)}"
