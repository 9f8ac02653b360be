"""The training loop that runs on every Ray Train worker (dogbread.train starts them).

One fit() and one input pipeline for the whole run, and a Keras callback ends each epoch (validation
over all workers, the weight digests, the best weights, a checkpoint reported to Ray Train, early
stopping). A fit() per epoch made a tf.data iterator per epoch, and tearing one down often waited
for its autotuning thread to wake up on its own: 10.24 s, sometimes 40.96 s (autotuning periods
double from 10 ms), of idle CPU inside a 10 s epoch (bench/README.md). What each worker reads, and
how, is in dogbread/train_data.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

from dogbread import train_data

CURRENT_WEIGHTS, BEST_WEIGHTS, STATE = "current.weights.h5", "best.weights.h5", "state.json"
# Test hook: the worker of the last rank exits hard once (or, with FAULT_HANG_ENV set, waits
# until its node is removed), after training in this epoch and before its checkpoint; the marker
# file records that it did, and on which Ray node.
FAULT_EPOCH_ENV, FAULT_MARKER_ENV = "DOGBREAD_FAULT_EXIT_AT_EPOCH", "DOGBREAD_FAULT_MARKER"
FAULT_HANG_ENV = "DOGBREAD_FAULT_HANG"


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: dogbread.train._fit gives it its loop_config."""
    with tempfile.TemporaryDirectory(prefix="dogbread-train-") as work:
        _train_epochs(loop_config, work)


def _train_epochs(loop_config: dict[str, Any], work: str) -> None:
    """The epochs of one worker; `work` holds its best weights and TensorBoard logs."""
    import ray
    import ray.train
    import tensorflow as tf
    import tf_keras

    context = ray.train.get_context()
    rank = context.get_world_rank()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = seeded_model(loop_config["model"], loop_config["seed"])
        trainer = _trainer(model, loop_config)

    state: dict[str, Any] = {
        "epoch": 0,
        "best_epoch": 0,
        "best_val_loss": math.inf,
        "history": [],
        "resumed_after_epochs": [],
    }
    best_path = os.path.join(work, BEST_WEIGHTS)
    tensorboard = os.path.join(work, "tensorboard")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = _restore(checkpoint, strategy, model, work)
        print(f"[rank {rank}] resumed from the checkpoint of epoch {state['epoch']}", flush=True)
    # Where the workers run: (Ray node id, GPUs Ray assigned) per worker, for the run's record.
    # The node id, not Train's node rank: nodes that share an IP share a node rank.
    node_id = ray.get_runtime_context().get_node_id()
    placement = [int(node_id[:12], 16), len(ray.get_gpu_ids())]  # 48 bits: exact in float64
    state["workers"] = [
        {"node": f"{int(node):012x}", "gpus": int(gpus)}
        for node, gpus in _gather(strategy, context, placement)
    ]

    # Validation's model call, traced (per input shape: the last batch may be smaller) rather
    # than eager: 0.8 s instead of 1.25 s per epoch for the real photos' 333 val images.
    forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    workers = context.get_world_size()
    first = state["epoch"] + 1
    if first > loop_config["epochs"]:  # resumed from the last epoch: nothing to read or train
        return
    # The optimizer's step drives the learning-rate schedule: a resumed run goes on from it.
    if state["epoch"] and not int(model.optimizer.iterations.numpy()):
        raise RuntimeError("the checkpoint's optimizer state was not restored")
    writer = tf.summary.create_file_writer(tensorboard) if rank == 0 else None
    train, val, plan = _sources(loop_config, workers, rank, first)
    dataset = strategy.distribute_datasets_from_function(lambda _: _worker_dataset(train, plan))
    val_rows = train_data.validation_rows(val.table.num_rows, workers, rank)
    size = plan.batch_size
    val_whole = val.read_whole(val_rows, size) if plan.in_memory else None

    def val_batches() -> Any:
        if val_whole is None:
            return val.batches(val_rows, size)
        return (tuple(a[i : i + size] for a in val_whole) for i in range(0, len(val_rows), size))

    started: dict[str, float] = {}
    generators = _random_generators(model)

    def begin_epoch(index: int, logs: dict[str, float]) -> None:
        started.update(epoch=time.perf_counter())
        # Dropout's and augmentation's draws: a function of (seed, epoch), as the data order is.
        reseed_generators(generators, loop_config["seed"], index + 1)

    def end_epoch(index: int, logs: dict[str, float]) -> None:
        epoch = index + 1  # Keras counts epochs from 0
        _maybe_inject_fault(epoch, rank, workers)
        # Both the training metrics (reduced by the strategy) and the validation metrics (summed
        # by _validate) are the same on every worker, so all take the same early-stopping
        # decision and none is left waiting alone in a collective.
        metrics = {k: float(v) for k, v in logs.items()}
        metrics["train_images"] = _trained_images(trainer)
        unreadable = _gather(strategy, context, [plan.unreadable.pop(epoch)])
        metrics["unreadable_images"] = int(sum(row[0] for row in unreadable))
        metrics["learning_rate"] = float(model.optimizer.learning_rate.numpy())  # at its last step
        metrics.update(_validate(strategy, context, model, forward, val_batches()))
        metrics.update(epoch=epoch, seconds=round(time.perf_counter() - started["epoch"], 3))
        # Evidence that data parallelism really synchronizes: every worker's weight digest,
        # gathered through the same collective that all-reduces the gradients.
        metrics["worker_weight_digests"] = _weight_digests(strategy, context, model)
        state["history"].append(metrics)
        state["epoch"] = epoch
        if metrics["val_loss"] < state["best_val_loss"]:
            state.update(best_epoch=epoch, best_val_loss=metrics["val_loss"])
            model.save_weights(best_path)
        if writer is not None:
            with writer.as_default(step=epoch):
                for key, value in metrics.items():
                    if isinstance(value, float):
                        tf.summary.scalar(key, value)
            writer.flush()
        print(f"[rank {rank}] epoch {epoch}: {_format_epoch(metrics)}", flush=True)
        with tempfile.TemporaryDirectory() as directory:
            # Every worker saves (saving may need all replicas); only rank 0's copy is kept.
            model.save_weights(os.path.join(directory, CURRENT_WEIGHTS))
            shutil.copy(best_path, os.path.join(directory, BEST_WEIGHTS))
            with open(os.path.join(directory, STATE), "w") as f:
                json.dump(state, f)
            if rank == 0:
                shutil.copytree(tensorboard, os.path.join(directory, "tensorboard"))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None,
                checkpoint_dir_name=f"epoch_{epoch:04d}",
            )
        if epoch - state["best_epoch"] >= loop_config["patience"]:
            print(
                f"[rank {rank}] early stop: no better val_loss since epoch {state['best_epoch']}",
                flush=True,
            )
            trainer.stop_training = True

    trainer.fit(
        dataset,
        epochs=loop_config["epochs"],
        initial_epoch=first - 1,
        steps_per_epoch=plan.steps,
        verbose=0,
        callbacks=[
            tf_keras.callbacks.LambdaCallback(
                on_epoch_begin=begin_epoch,
                on_epoch_end=end_epoch,
            )
        ],
    )


def _trainer(model: Any, loop_config: dict[str, Any]) -> Any:
    """What fit() runs: the model itself, or a dogbread.distill trainer of it when a teacher or
    a frozen backbone takes part. Loads the backbone's pretrained weights and the teacher (both
    sent by the driver through the object store: workers need not reach the driver's files)."""
    import ray

    from dogbread.backbone import load_weights
    from dogbread.distill import student_trainer
    from dogbread.model import model_from_bytes

    if loop_config["backbone_weights"]:  # a resumed run then loads its checkpoint over them
        name, weights = loop_config["backbone_weights"]
        load_weights(model, ray.get(weights), name)
    freeze_steps = loop_config["model"]["freeze_steps"]
    if loop_config["teacher"] is None and not freeze_steps:
        return model
    teacher = None
    if loop_config["teacher"] is not None:
        teacher = model_from_bytes(ray.get(loop_config["teacher"]), "the teacher")
    temperature, weight = loop_config["distill"]
    return student_trainer(model, teacher, temperature, weight, freeze_steps)


def _restore(checkpoint: Any, strategy: Any, model: Any, work: str) -> dict[str, Any]:
    """Load a checkpoint into the model (weights, Adam's moments and step) and `work` (the best
    weights, TensorBoard logs); return its training state."""
    with checkpoint.as_directory() as directory:
        # The weights file holds Adam's moments and step too, but load_weights skips them for
        # an optimizer not built yet ("Skipping variable loading for optimizer").
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(directory, CURRENT_WEIGHTS))
        shutil.copy(os.path.join(directory, BEST_WEIGHTS), os.path.join(work, BEST_WEIGHTS))
        with open(os.path.join(directory, STATE)) as f:
            state = json.load(f)
        if os.path.isdir(os.path.join(directory, "tensorboard")):
            shutil.copytree(
                os.path.join(directory, "tensorboard"), os.path.join(work, "tensorboard")
            )
    state["resumed_after_epochs"].append(state["epoch"])
    return state


def _sources(
    loop_config: dict[str, Any], workers: int, rank: int, first: int
) -> tuple[train_data.SplitSource, train_data.SplitSource, train_data.EpochPlan]:
    """The train and val splits as this worker reads them, and the plan of its epochs."""
    import ray

    model_config = loop_config["model"]
    train, val = (
        train_data.SplitSource(
            ray.get(loop_config[f"{split}_table"]),
            tuple(loop_config["class_names"]),
            model_config["image_size"],
            loop_config["s3_endpoint"],
        )
        for split in ("train", "val")
    )
    batch_size, rows = loop_config["batch_size"], train.table.num_rows
    # A worker whose rows fit in `worker_cache_mib` reads them once and keeps them in memory.
    shard_rows = (rows + val.table.num_rows) // workers
    plan = train_data.EpochPlan(
        first=first,
        last=loop_config["epochs"],
        # At least 1: dogbread.train refuses fewer images than one global batch.
        steps=epoch_steps(rows, workers, batch_size),
        batch_size=batch_size,
        workers=workers,
        rank=rank,
        seed=loop_config["seed"],
        in_memory=shard_rows * 3 * model_config["image_size"] ** 2
        <= loop_config["worker_cache_mib"] << 20,
    )
    return train, val, plan


def _worker_dataset(train: train_data.SplitSource, plan: train_data.EpochPlan) -> Any:
    """This worker's batches for every remaining epoch, as one tf.data pipeline.

    Each worker's batches are its replica's batches (distribute_datasets_from_function). A plain
    tf.data.Dataset passed to fit() would be taken for global batches: the strategy splits every
    batch into one piece per worker and, with the worker already holding its own rows, trains on
    all the pieces, so each step saw batch_size / workers images (2 workers: half an epoch).
    """
    import tensorflow as tf

    if plan.in_memory:
        return train_data.in_memory_batches(train, plan)
    size = train.image_size
    return tf.data.Dataset.from_generator(
        lambda: train_data.streamed_batches(train, plan),
        output_signature=(
            tf.TensorSpec((None, size, size, 3), tf.uint8),
            tf.TensorSpec((None,), tf.int64),
            tf.TensorSpec((None,), tf.float32),
        ),
    )


def epoch_steps(train_images: int, workers: int, batch_size: int) -> int:
    """Each worker's steps per epoch. Each trains on n // workers rows (EpochPlan.rows),
    and several workers drop their last, partial batch: tf-keras under the strategy crashed on a
    one-image batch ("input depth must be evenly divisible by filter depth": 769 photos per
    worker, 16 per batch)."""
    rows = train_images // workers
    return rows // batch_size if workers > 1 else math.ceil(rows / batch_size)


def seeded_model(model_config: dict[str, Any], seed: int) -> Any:
    """build_model with its initial weights, dropout and augmentation drawn from `seed`.

    Every worker gets the same seed, so the same initial weights. A one-worker run repeats
    exactly, resumed or not, in memory or streamed (each epoch's order and random draws depend on
    the seed and the epoch alone); all-reduced sums of several workers may vary in the last bits.
    """
    import tf_keras

    from dogbread.model import ModelConfig, build_model

    tf_keras.utils.set_random_seed(seed)
    return build_model(ModelConfig(**model_config))


def _gather(strategy: Any, context: Any, values: list[float]) -> list[list[float]]:
    """Every worker's `values`, in rank order, through a real collective.

    Each worker fills its own row of a zero matrix and the rows are SUM-all-reduced, the same
    operation that averages the gradients; every worker gets the same result. float64 holds
    ints below 2**53 exactly.
    """
    import numpy as np
    import tensorflow as tf

    rows = np.zeros((context.get_world_size(), len(values)), np.float64)
    rows[context.get_world_rank()] = values
    gathered = strategy.reduce(
        tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(rows)), axis=None
    )
    return gathered.numpy().tolist()


def _validate(strategy: Any, context: Any, model: Any, forward: Any, batches: Any) -> dict:
    """Validation loss and accuracy over all workers' shards; `forward` is the model's traced
    inference call.

    Computed by hand rather than with fit(validation_data=...): tf-keras's distributed evaluate
    failed here on a worker whose last batch held a single image.
    """
    import numpy as np
    import tf_keras as keras

    per_sample_loss = keras.losses.get(model.loss)
    loss_sum = correct = count = 0.0
    for images, labels, weights in batches:  # this worker's batches; weight 0: unreadable
        probabilities = forward(images).numpy()
        if probabilities.shape[-1] == 1:  # sigmoid head
            targets = labels.reshape(-1, 1).astype(np.float32)
            predicted = (probabilities[:, 0] >= 0.5).astype(np.int64)
        else:
            targets, predicted = labels, np.argmax(probabilities, axis=1)
        losses = per_sample_loss(targets, probabilities).numpy()
        loss_sum += float(np.sum(losses * weights))
        correct += float(np.sum((predicted == labels) * weights))
        count += float(np.sum(weights))
    totals = np.sum(_gather(strategy, context, [loss_sum, correct, count]), axis=0)
    # Keras's val_loss includes the L2 penalties; so does ours, to stay comparable.
    regularization = float(sum(loss.numpy() for loss in model.losses))
    return {
        "val_loss": float(totals[0] / max(totals[2], 1) + regularization),
        "val_accuracy": float(totals[1] / max(totals[2], 1)),
        "val_images": int(totals[2]),  # the readable ones
    }


def _trained_images(trainer: Any) -> int:
    """Images trained on in this epoch by all workers: the count behind the accuracy metric,
    which Keras resets as each epoch begins and which the strategy sums over workers on read."""
    accuracy = next(metric for metric in trainer.metrics if metric.name == "accuracy")
    return int(accuracy.count.numpy())


def _weight_digests(strategy: Any, context: Any, model: Any) -> list[str]:
    """The md5 (first 96 bits) of every worker's weights: identical when they are in sync."""
    digest = hashlib.md5()
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    pieces = [int(digest.hexdigest()[i : i + 8], 16) for i in range(0, 24, 8)]
    rows = _gather(strategy, context, pieces)
    return ["".join(f"{int(v):08x}" for v in row) for row in rows]


def _format_epoch(metrics: dict[str, float]) -> str:
    keys = ("loss", "accuracy", "val_loss", "val_accuracy", "seconds")
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


def _random_generators(model: Any) -> list[Any]:
    """The tf.random.Generators of the model's random layers (Dropout with RNG_TYPE "stateful",
    the augmentation layers). Private tf-keras attributes: tests/test_train.py checks a resumed
    run against an uninterrupted one, which fails if they move."""
    found = []
    for layer in model._flatten_layers():
        generator = getattr(getattr(layer, "_random_generator", None), "_generator", None)
        if generator is not None:
            found.append(generator)
    return found


def reseed_generators(generators: list[Any], seed: int, epoch: int) -> None:
    """Gives each generator its own Philox key drawn from (seed, epoch, its index), counter 0.

    Not reset_from_seed(n): an integer seed becomes the counter with key 0, so seed n + 1 draws
    seed n's stream shifted by one block. Neighbouring layers and epochs then replayed each other's
    draws (the next epoch's dropout masks were this epoch's, 404 values on)."""
    import numpy as np

    for i, generator in enumerate(generators):
        key = np.random.SeedSequence([seed, epoch, i]).generate_state(1, np.uint64)[0]
        generator.reset_from_key_counter(int(key.astype(np.int64)), [0, 0])


def _maybe_inject_fault(epoch: int, rank: int, workers: int) -> None:
    marker = os.environ.get(FAULT_MARKER_ENV)
    if rank != workers - 1 or not marker or str(epoch) != os.environ.get(FAULT_EPOCH_ENV):
        return
    if not os.path.exists(marker):
        import ray

        with open(f"{marker}.partial", "w") as f:  # where it happened: a test may remove the node
            f.write(ray.get_runtime_context().get_node_id())
        os.replace(f"{marker}.partial", marker)
        if os.environ.get(FAULT_HANG_ENV):
            print(f"[rank {rank}] fault injection: waiting in epoch {epoch}", flush=True)
            time.sleep(600)  # the test removes this node long before
        print(f"[rank {rank}] fault injection: exiting in epoch {epoch}", flush=True)
        os._exit(1)
