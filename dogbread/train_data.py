"""What each Ray Train worker trains and validates on: its own rows of the manifest, read and
decoded by Ray Data as the epoch goes, or once when they fit in the worker's memory.

Nothing that grows with the images lives in the driver or stays in the object store. The driver
puts each split's path table (path, label: ~100 bytes an image) in the object store once. Each
worker picks its rows and runs a Ray Data pipeline of its own: tasks of half a CPU, anywhere in the
cluster, read and decode them; Ray Data's backpressure bounds the decoded blocks in flight; the
worker takes them as batches, in the order it asked for them.

- Shuffled per epoch at the image level: a permutation of the whole split drawn from (seed,
  epoch); worker r of N takes its positions r, r+N, ... Every image is read by one worker each
  epoch (by another the next), and every worker takes the same number of steps (each step is a
  collective), planned from the manifest (train_worker.epoch_steps).
- An image that turns out unreadable only when decoded stays in its batch as a black image of
  weight 0 (data.decoded_dataset's keep_unreadable), so the planned steps hold on every worker;
  the loss and metrics leave it out, and each epoch counts it.
- Rows come in the order asked (preserve_order), and each epoch's order is a function of (seed,
  epoch) alone: a run's order repeats exactly, resumed or not, streamed or in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dogbread import data
from dogbread.errors import DataError

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # images (uint8), labels, weights (0: unreadable)


@dataclass(frozen=True)
class EpochPlan:
    """One worker's epochs: which, how many steps of which batch, and where it is in the run."""

    first: int
    last: int
    steps: int
    batch_size: int
    workers: int
    rank: int
    seed: int
    in_memory: bool  # its rows are read once and kept in memory
    # epoch: this worker's unreadable rows, set as they are read (the only mutable part)
    unreadable: dict[int, int] = field(default_factory=dict)

    @property
    def epochs(self) -> range:
        return range(self.first, self.last + 1)

    def rows(self, total: int, epoch: int) -> np.ndarray:
        """This worker's rows of `total` in `epoch`: every `workers`-th entry of a permutation
        of all of them drawn from (seed, epoch). Each image is read by one worker each epoch; the
        workers' counts differ by at most one, which the partial batches they drop absorb
        (train_worker.epoch_steps)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(total)
        return order[self.rank :: self.workers]


@dataclass(frozen=True)
class SplitSource:
    """One split as a worker reads it: the path table and how to decode it."""

    table: pa.Table  # path, label
    class_names: tuple[str, ...]
    image_size: int
    s3_endpoint: str | None

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
        """The images of `rows` (positions in the table), decoded by Ray Data, in that order."""
        dataset = data.decoded_dataset(
            self.table.take(pa.array(rows)),
            self.class_names,
            self.image_size,
            self.s3_endpoint,
            keep_unreadable=True,
        )
        dataset.context.execution_options.preserve_order = True  # the order asked for
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield batch["image"], batch["label"], batch["weight"]

    def read_whole(self, rows: np.ndarray, batch_size: int) -> Batch:
        """The images of `rows` copied into this process's memory as they come. Batches from Ray
        Data may be views of the object store, and keeping them pinned every block read there:
        the whole split, whatever the backpressure (bench/train_memory.py)."""
        size = self.image_size
        images = np.empty((len(rows), size, size, 3), np.uint8)
        labels, weights = np.empty(len(rows), np.int64), np.empty(len(rows), np.float32)
        start = 0
        for batch in self.batches(rows, batch_size):
            end = start + len(batch[1])
            images[start:end], labels[start:end], weights[start:end] = batch
            start = end
        return images, labels, weights


def streamed_batches(source: SplitSource, plan: EpochPlan) -> Iterator[Batch]:
    """The plan's epochs, plan.steps batches of plan.batch_size each, read and decoded as they
    go. plan.unreadable[epoch] is set to the epoch's unreadable rows before its last batch is
    handed over: a batch is read ahead, so the remainder that makes no full batch has been read
    (and counted) by then."""
    drop_last = plan.workers > 1  # see train_worker.epoch_steps
    for epoch in plan.epochs:
        ready: list[Batch] = []
        unreadable = handed = 0
        for batch in source.batches(plan.rows(source.table.num_rows, epoch), plan.batch_size):
            unreadable += int(np.sum(batch[2] == 0))
            full = len(batch[1]) == plan.batch_size
            if handed + len(ready) < plan.steps and (full or not drop_last):
                ready.append(batch)
            if len(ready) == 2:  # one batch ahead
                yield ready.pop(0)
                handed += 1
        plan.unreadable[epoch] = unreadable
        yield from ready
        handed += len(ready)
        if handed < plan.steps:
            raise DataError(f"epoch {epoch}: {handed} batches for this worker, {plan.steps} due")


def in_memory_batches(source: SplitSource, plan: EpochPlan) -> Any:
    """The same epochs from this worker's rows (those of epoch 0) read once into memory, as
    tf.data's cache() would: shuffled indices, batched, gathered from the arrays, and each epoch's
    order a function of (seed, epoch) alone. Epochs then cost no reads or decoding on the CPUs that
    train. Sets plan.unreadable for every epoch up front."""
    import tensorflow as tf

    rows = plan.rows(source.table.num_rows, 0)
    columns = source.read_whole(rows, plan.batch_size)
    plan.unreadable.update(dict.fromkeys(plan.epochs, int(np.sum(columns[2] == 0))))
    whole = tf.data.Dataset.from_tensors(tuple(tf.constant(c) for c in columns)).repeat()

    def epoch_batches(epoch: Any) -> Any:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(rows)), tf.stack([tf.constant(plan.seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order).batch(plan.batch_size).take(plan.steps)

    indices = tf.data.Dataset.range(plan.first, plan.last + 1).flat_map(epoch_batches)
    gathered = tf.data.Dataset.zip(indices, whole).map(
        lambda picks, arrays: tuple(tf.gather(a, picks) for a in arrays),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return gathered.prefetch(tf.data.AUTOTUNE)


def validation_rows(rows: int, workers: int, rank: int) -> np.ndarray:
    """Worker `rank`'s share of the validation split: every row on one worker."""
    return np.arange(rank, rows, workers)
