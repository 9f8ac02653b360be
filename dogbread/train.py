"""`dogbread train`: data-parallel training of the CNN with Ray Train, then evaluation.

Route: tf-keras (Keras 2) under tf.distribute.MultiWorkerMirroredStrategy inside Ray's
TensorflowTrainer. Keras 3 fails under that strategy (ray-project/ray#47464,
keras-team/keras#20585); tf-keras is what Ray's own TensorFlow examples use. Gradients are
all-reduced every step, so every worker holds the same weights (tests/test_train.py checks).

Batch size and learning rate: `batch_size` is each worker's batch, so a step of N workers sees
N * batch_size images and all-reduces the gradients once for them (with a global batch split N
ways, 8 GPU workers trained on 4 images a step each). `learning_rate` is the rate for one worker's
batch; N workers train at N times it (the linear scaling rule), reached by a linear warmup over
`warmup_epochs` (Goyal et al. 2017, "Accurate, Large Minibatch SGD").

Each worker reads and decodes its own images as the epochs go, in Ray Data tasks anywhere in the
cluster, or once when they fit in its memory (dogbread/train_data.py); nothing that grows with the
images stays in the driver or the object store, and the test split is scored by Ray Data actors
that return only confusion counts (dogbread/evaluate.py). Each epoch ends with a checkpoint
(current weights with Adam's moments and step, the best weights so far, the early-stopping state);
a failed worker is restarted by Ray Train (FailureConfig) and training continues from the last
checkpoint, as does `--resume RUN_DIR`. What each worker runs is in dogbread/train_worker.py.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import secrets
import tempfile
import threading
from typing import Any

import numpy as np

from dogbread import console, data, distill, evaluate, storage
from dogbread.config import CONFIG_FILENAME, TrainConfig, dump_config, load_config
from dogbread.errors import ConfigError, DataError
from dogbread.train_worker import BEST_WEIGHTS, STATE, epoch_steps, train_loop

log = logging.getLogger(__name__)

# dogbread.model (and so TensorFlow) is imported inside the functions that need it, so that a bad
# config or a missing input fails in a fraction of a second, before TensorFlow loads.
MANIFEST_FILENAME = "manifest.parquet"
EPOCH_POLL_S = 1.0  # how often the driver looks for a new epoch's checkpoint


def run(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate on the test split, and write every artifact into config.out."""
    if config.seed is None:  # drawn here, so that the config.yaml written below repeats the run
        config = dataclasses.replace(config, seed=secrets.randbelow(2**31))
    manifest = data.load_labeled(
        config.data, config.val_fraction, config.test_fraction, config.s3_endpoint
    )
    for split in ("train", "val"):
        present = set(manifest.split(split)["label"].to_pylist())
        if present != set(manifest.class_names):
            missing = ", ".join(sorted(set(manifest.class_names) - present)) or "all"
            raise DataError(f"the {split} split has no images of class(es): {missing}")
    start = distill.starting_point(config, manifest.class_names)
    out = config.out
    if not resume and storage.exists(storage.join(out, CONFIG_FILENAME), config.s3_endpoint):
        raise DataError(f"{out} already holds a run: continue it with --resume {out}")
    storage.check_writable(out, config.s3_endpoint)

    from dogbread.runtime import ensure_ray

    started = ensure_ray()
    try:
        if started == "local":
            _check_local_ray_fits(config)
        storage.write_text(
            storage.join(out, CONFIG_FILENAME), dump_config(config), config.s3_endpoint
        )
        data.write_manifest(manifest, storage.join(out, MANIFEST_FILENAME), config.s3_endpoint)
        return _train_and_evaluate(config, manifest, start)
    finally:
        if started:
            import ray

            ray.shutdown()


def _check_local_ray_fits(config: TrainConfig) -> None:
    """A local Ray has no autoscaler: Ray Train would wait forever (retrying every 60 s) for
    workers it cannot place. A joined cluster may still grow, so it is not checked."""
    import ray

    resources = ray.cluster_resources()
    # Each worker takes a GPU with --gpu, and half a CPU to one (_cpus_per_worker): more workers
    # than CPUs would leave no CPU to decode images with.
    for kind in ("GPU", "CPU") if config.use_gpu else ("CPU",):
        have = int(resources.get(kind, 0))
        if have == 0:  # only GPUs can be missing altogether
            raise ConfigError(
                "--gpu needs a GPU for each worker, and the local Ray has none: drop --gpu, or "
                "train on a GPU cluster (dogbread submit)"
            )
        if config.workers > have:
            raise ConfigError(
                f"{config.workers} workers need a {kind} each, and the local Ray has {have}: use "
                f"--workers {have} or fewer, or train on a cluster (dogbread submit)"
            )


def resume(run_dir: str, s3_endpoint: str | None = None) -> dict[str, Any]:
    """Continue a stopped run from its last checkpoint, with the config it was started with."""
    config_uri = storage.join(run_dir, CONFIG_FILENAME)
    if not storage.exists(config_uri, s3_endpoint):
        raise DataError(f"no run to resume in {run_dir} (no {CONFIG_FILENAME})")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as tmp:
        tmp.write(storage.read_text(config_uri, s3_endpoint))
        tmp.flush()
        config = load_config(TrainConfig, tmp.name)
    return run(config, resume=True)


def _train_and_evaluate(
    config: TrainConfig, manifest: data.Manifest, start: distill.StartingPoint
) -> dict[str, Any]:
    from dogbread.model import build_model

    splits = {split: manifest.split(split) for split in data.SPLITS}  # each filtered once
    rows = {split: table.num_rows for split, table in splits.items()}
    # A full global batch: several workers each drop their last, partial batch (see drop_last).
    needed = config.batch_size * config.workers if config.workers > 1 else 1
    if rows["train"] < needed:
        raise DataError(f"only {rows['train']} training images, {needed} needed")

    checkpoint = _fit(config, manifest, splits, start)
    model = build_model(_model_config(config, manifest))
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE)) as f:
            state = json.load(f)
        model.load_weights(os.path.join(directory, BEST_WEIGHTS))
        test = data.decoded_dataset(
            splits["test"], manifest.class_names, config.image_size, config.s3_endpoint
        )
        metrics = evaluate.evaluate_decoded(model, test, manifest.class_names, rows["test"])
        last = state["history"][-1]
        skipped = {
            "train": last.get("unreadable_images", 0),
            "val": rows["val"] - last.get("val_images", rows["val"]),
            "test": metrics["skipped_unreadable"],
        }
        if sum(skipped.values()):
            log.warning(  # the decoding tasks name each one, in Ray's worker logs (-v: here)
                "skipped %s unreadable images (train/val/test); Ray's worker logs name each one",
                skipped,
            )
        metrics.update(
            skipped_unreadable=skipped,
            best_epoch=state["best_epoch"],
            epochs_run=state["epoch"],
            best_val_loss=state["best_val_loss"],
            resumed_after_epochs=state["resumed_after_epochs"],
            workers=state["workers"],
            history=state["history"],
        )
        print(evaluate.format_metrics(metrics))
        tensorboard = os.path.join(directory, "tensorboard")
        int8 = _int8_conversion(config, manifest.class_names, splits, model)
        _write_artifacts(
            config, manifest, model, metrics, state["history"], tensorboard, start, int8
        )
    return metrics


def _model_config(config: TrainConfig, manifest: data.Manifest, train_images: int = 0) -> Any:
    """The model and its optimizer's schedule for `train_images` training images: the
    learning rate scaled linearly with the global batch (N workers: N times the rate), reached
    by a linear warmup over `warmup_epochs` (Goyal et al. 2017), then constant or cosine."""
    from dogbread.model import ModelConfig

    steps = epoch_steps(train_images, config.workers, config.batch_size)
    warmup = steps * config.warmup_epochs if config.workers > 1 else 0
    return ModelConfig(
        image_size=config.image_size,
        num_classes=len(manifest.class_names),
        augment=config.augment,
        learning_rate=config.learning_rate * config.workers,
        architecture=config.architecture,
        decay_steps=max(config.epochs * steps - warmup, 1) if config.lr_schedule == "cosine" else 0,
        warmup_steps=warmup,
        warmup_from=config.learning_rate,
        freeze_steps=steps * config.freeze_epochs,
    )


def _fit(
    config: TrainConfig,
    manifest: data.Manifest,
    splits: dict[str, Any],
    start: distill.StartingPoint,
) -> Any:
    """Run the TensorflowTrainer on the manifest's `splits` (tables); returns the last checkpoint
    (state, current and best weights).

    The workers get the train and val path tables through the object store (put once, ~100
    bytes an image), and read and decode their images themselves (dogbread/train_data.py); the
    teacher and the backbone's weights come the same way."""
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    # Ray Train's controller notices that the workers are done only at its next poll, every 2 s
    # by default; the wait after the last epoch was ~5 s per run. Ray Train passes this variable
    # on to its controller, so a user's own setting still wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    fs, path = storage.resolve(config.out, config.s3_endpoint)
    train_images = splits["train"].num_rows
    checkpoints = "checkpoints"  # the run's name in Ray Train: its folder under the storage path
    trainer = TensorflowTrainer(
        train_loop,
        train_loop_config={
            "model": dataclasses.asdict(_model_config(config, manifest, train_images)),
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "patience": config.patience,
            "seed": config.seed,
            "train_table": ray.put(splits["train"].select(["path", "label"])),
            "val_table": ray.put(splits["val"].select(["path", "label"])),
            "class_names": manifest.class_names,
            "s3_endpoint": config.s3_endpoint,
            "worker_cache_mib": config.worker_cache_mib,
            "teacher": ray.put(start.teacher) if start.teacher else None,
            "distill": (config.distill_temperature, config.distill_weight),
            "backbone_weights": (config.backbone_weights, ray.put(start.backbone_weights))
            if start.backbone_weights
            else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": _cpus_per_worker(config.workers)}
            | ({"GPU": 1} if config.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            # The same name and storage on --resume is what makes Ray Train restore the run.
            name=checkpoints,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    workers = f"{config.workers} worker{'s' if config.workers > 1 else ''}"
    print(
        f"training on {train_images} images with {workers}, up to {config.epochs} epochs",
        file=console.terminal(),
        flush=True,
    )
    with EpochLines(config.epochs, fs, storage.join(path, checkpoints)):
        return trainer.fit().checkpoint


def _cpus_per_worker(workers: int) -> float:
    """A training worker's CPU reservation: Ray Train's 1, unless that leaves the cluster no CPU
    to decode images with (2 workers on a 2-core machine): the workers then share all CPUs but
    one, at least half a CPU each. TensorFlow uses every core of its node whatever is reserved."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    return 1.0 if cpus - workers >= 1 else max(0.5, (cpus - 1) / workers)


class EpochLines:
    """The driver's line per epoch: "epoch k/N  loss  val_accuracy  ETA". The workers' own lines
    stay in Ray's logs; the driver reads each epoch's checkpoint state as Ray Train stores it
    (local or S3), once a second in a thread, so it works wherever the workers run and needs no
    actor. The last check runs after fit() returns, when the last checkpoint is stored."""

    def __init__(self, epochs: int, fs: Any, checkpoints: str) -> None:
        self.epochs, self.fs, self.checkpoints = epochs, fs, checkpoints
        self.shown = self._latest_state().get("epoch", 0)  # a resumed run goes on from there
        self.seconds: list[float] = []  # of this run's epochs, for the ETA
        self.line = console.ProgressLine(every_s=0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="epoch-lines", daemon=True)

    def __enter__(self) -> EpochLines:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        state = self._latest_state() if exc[0] is None else {}
        self.show(state.get("history", []))
        self.line.close()
        if 0 < state.get("epoch", self.epochs) < self.epochs:  # early stopping ended the run
            print(
                f"early stop after epoch {state['epoch']}: no better val_loss since epoch "
                f"{state['best_epoch']}, whose weights are kept",
                file=console.terminal(),
                flush=True,
            )

    def _watch(self) -> None:
        while not self.stop.wait(EPOCH_POLL_S):
            self.show(self._latest_state().get("history", []))

    def show(self, history: list[dict[str, Any]]) -> None:
        for metrics in history:
            if metrics["epoch"] <= self.shown:
                continue
            self.shown = metrics["epoch"]
            self.seconds.append(metrics["seconds"])
            left = np.mean(self.seconds) * (self.epochs - self.shown)
            self.line.update(
                f"epoch {self.shown}/{self.epochs}  loss {metrics['loss']:.4f}  "
                f"val_accuracy {metrics['val_accuracy']:.4f}  {console.eta(left)}",
                force=True,
            )

    def _latest_state(self) -> dict[str, Any]:
        """The state of the last stored checkpoint ({} before the first, or while one is
        half-written: the next look reads it whole)."""
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.checkpoints, allow_not_found=True))
            epochs = [i.base_name for i in infos if i.base_name.startswith("epoch_")]
            if not epochs:
                return {}
            with self.fs.open_input_stream(f"{self.checkpoints}/{max(epochs)}/{STATE}") as f:
                return json.loads(f.read())
        except (OSError, ValueError):  # not there yet, or half-written
            return {}


def _int8_conversion(
    config: TrainConfig, class_names: tuple[str, ...], splits: dict[str, Any], model: Any
) -> tuple[Any, dict[str, Any]]:
    """The model's int8 LiteRT quantization, calibrated on training images, and its card entry:
    its val accuracy beside the float conversion's, and whether it serves (dogbread.quantize).
    None where no float conversion serves either (TensorFlow on a GPU driver)."""
    from dogbread import quantize
    from dogbread.litert import LiteRTModel, inference_model

    if not isinstance(inference_model(model), LiteRTModel):
        return None, {}
    reading = (class_names, config.image_size, config.s3_endpoint)
    calibration = quantize.sample_images(splits["train"], *reading)
    val_batches = quantize.sample_batches(splits["val"], *reading)
    return quantize.int8_conversion(model, calibration, val_batches)


def _write_artifacts(
    config: TrainConfig,
    manifest: data.Manifest,
    model: Any,
    metrics: dict[str, Any],
    history: list[dict[str, float]],
    tensorboard_dir: str,
    start: distill.StartingPoint,
    int8: tuple[Any, dict[str, Any]],
) -> None:
    from dogbread.model import MODEL_FILENAME, ModelCard, save_model

    out, endpoint = config.out, config.s3_endpoint
    fingerprint = hashlib.sha256()
    for row in manifest.table.select(["relpath", "label", "split"]).to_pylist():
        fingerprint.update(json.dumps(row, sort_keys=True).encode())
    card = ModelCard(
        class_names=manifest.class_names,
        image_size=config.image_size,
        parameter_count=model.count_params(),
        data_fingerprint=fingerprint.hexdigest()[:16],
        metrics={k: metrics[k] for k in ("accuracy", "precision", "recall", "images")},
        architecture=config.architecture,
        teacher=start.teacher_version,
        backbone_weights=config.backbone_weights or "",
        backbone_weights_sha256=start.backbone_sha256,
    )
    card = save_model(model, card, out, endpoint, litert=True, int8=int8[0], int8_card=int8[1])
    metrics["model_version"] = card.model_version
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(metrics, indent=2), endpoint)
    buffer = io.StringIO()
    fields = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    storage.write_text(storage.join(out, "history.csv"), buffer.getvalue(), endpoint)
    evaluate.plot_curves(history, storage.join(out, "curves.png"), endpoint)
    evaluate.plot_confusion(metrics, storage.join(out, "confusion_matrix.png"), endpoint)
    if os.path.isdir(tensorboard_dir):
        fs, path = storage.resolve(storage.join(out, "tensorboard"), endpoint)
        import pyarrow.fs as pafs

        fs.create_dir(path, recursive=True)
        pafs.copy_files(tensorboard_dir, path, destination_filesystem=fs)
    from dogbread.report import try_write_report

    try_write_report(out, endpoint)  # last: it reads the artifacts written above
    log.info("run written to %s (model %s)", out, card.model_version)
    print(f"model written to {storage.join(out, MODEL_FILENAME)}")
