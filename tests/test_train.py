"""Training with Ray Train on a real local Ray: synchronization, artifacts, bad input, learning."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dogbread import train
from dogbread.config import TrainConfig
from dogbread.errors import DataError
from dogbread.model import ModelCard, load_model

from .conftest import SMALL, subprocess_env

pytestmark = pytest.mark.slow


def small_config(data: str, out: Path, **overrides) -> TrainConfig:
    values = dict(data=data, out=str(out), epochs=3, image_size=SMALL, batch_size=16, patience=5)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def tree_with_bad_files(tmp_path_factory: pytest.TempPathFactory) -> str:
    """150 synthetic images per class (enough for a test split that measures learning), plus
    three files that cannot be decoded and one that is not an image."""
    from dogbread.synth import write_synthetic_tree

    root = tmp_path_factory.mktemp("tree") / "data"
    write_synthetic_tree(root, per_class=150, seed=2)
    (root / "bread" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "random.jpg").write_bytes(bytes(range(256)) * 4)
    good = next((root / "dog").glob("*.jpg")).read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "dog" / "notes.txt").write_text("not an image")
    return str(root)


BROKEN = ("empty.jpg", "random.jpg", "truncated.jpg")


@pytest.fixture(scope="module")
def training_manifest(tree_with_bad_files: str, tmp_path_factory) -> str:
    """The tree's manifest, its training split trimmed to 16k + 2 rows: each of two workers then
    gets 8k + 1, so its last batch of 8 would hold a single image. So it was with the real photos
    (769 per worker, 16 per batch), where tf-keras crashed on that image."""
    from dogbread import data

    manifest = data.list_labeled_tree(tree_with_bad_files)
    rows = manifest.table.to_pylist()
    train_rows = sum(r["split"] == "train" for r in rows)
    readable = [i for i, r in enumerate(rows) if r["split"] == "train" and not _broken(r)]
    dropped = set(readable[: (train_rows - 2) % 16])
    kept = pa.Table.from_pylist(
        [r for i, r in enumerate(rows) if i not in dropped], data.MANIFEST_SCHEMA
    )
    path = tmp_path_factory.mktemp("manifest") / "manifest.parquet"
    data.write_manifest(data.Manifest(kept, manifest.class_names), str(path))
    assert (train_rows - len(dropped)) % 16 == 2
    return str(path)


def _broken(row: dict) -> bool:
    return row["relpath"].endswith(BROKEN)


@pytest.fixture(scope="module")
def two_worker_run(ray_local, training_manifest: str, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "two"
    # Batches of 8 per worker: the last of each worker's 8k + 1 rows would be a batch of one.
    metrics = train.run(small_config(training_manifest, out, workers=2, epochs=8, batch_size=8))
    return out, metrics


def test_two_workers_hold_identical_weights_after_every_epoch(two_worker_run):
    _, metrics = two_worker_run
    assert len(metrics["history"]) == 8
    for row in metrics["history"]:
        digests = row["worker_weight_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], row
    # ...and the weights do change: training happened.
    assert len({row["worker_weight_digests"][0] for row in metrics["history"]}) == 8


def _readable_training_images(manifest: str) -> int:
    rows = pq.read_table(manifest).to_pylist()
    return sum(r["split"] == "train" and not _broken(r) for r in rows)


def test_every_epoch_trains_on_each_workers_whole_shard(two_worker_run, training_manifest):
    _, metrics = two_worker_run
    rows = pq.read_table(training_manifest).to_pylist()
    train_rows = sum(r["split"] == "train" for r in rows)
    broken = sum(r["split"] == "train" and _broken(r) for r in rows)
    # Each worker trains on whole batches of 8 of its half of the rows and leaves out its last,
    # partial batch; unreadable rows stay in their batches with weight 0. (A tf.data.Dataset
    # handed to fit() as it is would be split again by the strategy: batches of 4, half of each
    # worker's rows per epoch.)
    trained_rows = 2 * 8 * (train_rows // 2 // 8)
    for row in metrics["history"]:
        assert row["unreadable_images"] == broken, row  # every epoch reads every row once
        assert trained_rows - broken <= row["train_images"] <= trained_rows, row


def test_run_dir_holds_model_card_metrics_curves_and_config(two_worker_run):
    out, metrics = two_worker_run
    model, card = load_model(str(out))
    assert isinstance(card, ModelCard)
    assert card.class_names == ("bread", "dog")
    assert card.image_size == SMALL and card.parameter_count == model.count_params()
    assert card.versions.keys() == {"dogbread", "tensorflow", "ray"}
    assert len(card.model_version) == 12 and len(card.data_fingerprint) == 16

    saved = json.loads((out / "metrics.json").read_text())
    test_rows = pq.read_table(out / "manifest.parquet").to_pylist()
    test_files = [r for r in test_rows if r["split"] == "test"]
    unreadable_in_test = sum(_broken(r) for r in test_files)
    assert saved["images"] == len(test_files) - unreadable_in_test
    assert sum(map(sum, saved["confusion_matrix"])) == saved["images"]
    assert {"accuracy", "precision", "recall", "per_class"} <= saved.keys()
    assert saved["model_version"] == card.model_version

    history = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in history] == list(range(1, 9))
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= history[0].keys()
    for png in ("curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["workers"] == 2 and resolved["image_size"] == SMALL
    assert isinstance(resolved["seed"], int)  # not given: drawn, and recorded to repeat the run
    assert [w["gpus"] for w in metrics["workers"]] == [0, 0]
    assert len({w["node"] for w in metrics["workers"]}) == 1  # one local node


def test_unreadable_training_images_are_skipped_and_counted(two_worker_run):
    out, metrics = two_worker_run
    # Three broken files in the tree; the .txt is not an image and never enters the manifest.
    assert sum(metrics["skipped_unreadable"].values()) == 3
    relpaths = [r["relpath"] for r in pq.read_table(out / "manifest.parquet").to_pylist()]
    assert "dog/notes.txt" not in relpaths and "dog/truncated.jpg" in relpaths


def test_best_epoch_weights_are_the_saved_ones(two_worker_run):
    _, metrics = two_worker_run
    val_losses = [row["val_loss"] for row in metrics["history"]]
    assert metrics["best_epoch"] == 1 + val_losses.index(min(val_losses))
    assert metrics["best_val_loss"] == pytest.approx(min(val_losses))


def test_two_workers_learn_as_well_as_one(ray_local, two_worker_run, training_manifest, tmp_path):
    _, two = two_worker_run
    # The two-worker run keeps its shards in memory (they are small); this one
    # reads its shard from Ray Data every epoch, so both input paths are held to learning.
    config = small_config(training_manifest, tmp_path / "one", workers=1, epochs=8, batch_size=8)
    one = train.run(dataclasses.replace(config, worker_cache_mib=0))
    every_image = _readable_training_images(training_manifest)
    assert [row["train_images"] for row in one["history"]] == [every_image] * 8
    rows = pq.read_table(training_manifest).to_pylist()
    broken = sum(r["split"] == "train" and _broken(r) for r in rows)
    assert [row["unreadable_images"] for row in one["history"]] == [broken] * 8
    # Batches of 8 on each worker: two workers take steps of 16 images at twice the learning rate
    # (the linear rule, after a warmup epoch), half as many steps: they should end up alike.
    assert one["history"][-1]["learning_rate"] == pytest.approx(1e-3)
    assert two["history"][-1]["learning_rate"] == pytest.approx(2e-3)
    assert one["accuracy"] >= 0.8 and two["accuracy"] >= 0.8, (one["accuracy"], two["accuracy"])
    assert abs(one["accuracy"] - two["accuracy"]) <= 0.12


def test_the_seed_sets_the_initial_weights():
    from dogbread.train_worker import seeded_model

    config = {"image_size": SMALL}
    first, again, other = (seeded_model(config, seed).get_weights() for seed in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    kernels = [(x, y) for x, y in zip(first, other, strict=True) if x.ndim > 1]  # biases: 0
    assert kernels and not any(np.allclose(x, y, atol=1e-3) for x, y in kernels)


def test_each_layer_and_epoch_draws_a_stream_of_its_own():
    """Dropout's and augmentation's generators, reseeded per epoch: no stream may be another's
    shifted (reset_from_seed(n + 1) replays reset_from_seed(n) one block on), and a repeated
    (seed, epoch) repeats exactly, which resume relies on."""
    import tensorflow as tf

    from dogbread.train_worker import _random_generators, reseed_generators, seeded_model

    generators = _random_generators(seeded_model({"image_size": SMALL, "augment": True}, 0))
    assert len(generators) >= 2  # augmentation layers and Dropout

    def draws(seed: int, epoch: int) -> list[np.ndarray]:
        reseed_generators(generators, seed, epoch)
        return [g.uniform_full_int([4096], tf.int64).numpy() for g in generators]

    first = draws(0, 1)
    assert all(np.array_equal(x, y) for x, y in zip(draws(0, 1), first, strict=True))
    pooled = np.concatenate(first + draws(0, 2) + draws(1, 1))
    assert len(np.unique(pooled)) == len(pooled)  # 64-bit draws: any repeat is a shared stream


def test_a_finished_run_dir_is_not_overwritten(two_worker_run, tree_with_bad_files):
    out, _ = two_worker_run
    before = (out / "model.keras").read_bytes()
    with pytest.raises(DataError, match="--resume"):
        train.run(small_config(tree_with_bad_files, out))
    assert (out / "model.keras").read_bytes() == before


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no images found"),
        ({"bread": 3}, "only one class"),
        ({"bread": 3, "dog": 0}, "no images"),
    ],
)
def test_unusable_trees_fail_before_ray_starts(tmp_path, layout, message):
    from dogbread.synth import write_synthetic_tree

    root = tmp_path / "data"
    root.mkdir()
    for name, count in layout.items():
        (root / name).mkdir()
        if count:
            write_synthetic_tree(tmp_path / "src", count)
            for f in (tmp_path / "src" / "bread").iterdir():
                shutil.copy(f, root / name / f.name)
    with pytest.raises(DataError, match=message):
        train.run(small_config(str(root), tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_more_workers_than_a_local_ray_has_fail_at_once(tree_with_bad_files, tmp_path):
    # Its own process: only a Ray that dogbread starts itself is checked (ray_local is joined).
    # Ray Train would otherwise wait for the workers forever.
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dogbread", "train", "--data", tree_with_bad_files]
    command += ["--out", str(out), "--workers", "4096", "--batch-size", "4096"]
    done = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    error = done.stderr.splitlines()[-1]
    assert error.startswith("dogbread: error: 4096 workers need a CPU each, and the local Ray")
    assert not (out / "config.yaml").exists()  # so the same --out can be used once it is fixed


def test_evaluate_reproduces_the_run_metrics_on_its_test_split(two_worker_run):
    from dogbread import evaluate

    out, metrics = two_worker_run
    again = evaluate.run(str(out), str(out / "manifest.parquet"), split="test")
    assert again["confusion_matrix"] == metrics["confusion_matrix"]
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    assert again["skipped_unreadable"] == metrics["skipped_unreadable"]["test"]

    # The actors' summed counts are what scoring each test image here, one by one, gives.
    from dogbread.images import ImageDecodeError, decode_image
    from dogbread.model import predict_probabilities

    model, card = load_model(str(out))
    truth, predicted = [], []
    for row in pq.read_table(out / "manifest.parquet").to_pylist():
        try:
            if row["split"] != "test":
                continue
            image = decode_image(Path(row["path"]).read_bytes(), card.image_size)
        except ImageDecodeError:
            continue
        truth.append(card.class_names.index(row["label"]))
        predicted.append(int(np.argmax(predict_probabilities(model, image[np.newaxis]))))
    expected = evaluate.classification_metrics(np.array(truth), predicted, card.class_names)
    assert metrics["confusion_matrix"] == expected["confusion_matrix"]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_rate_scales_with_the_workers_after_a_linear_warmup(schedule):
    """--batch-size is per worker and --learning-rate is one worker's rate: 4 workers train at 4x
    it, reached linearly over --warmup-epochs; with cosine, the decay follows the warmup."""
    from dogbread import data
    from dogbread.model import build_model

    manifest = data.Manifest(pa.table({"label": ["bread", "dog"]}), ("bread", "dog"))
    config = TrainConfig(data="d", out="o", workers=4, batch_size=8, epochs=3, lr_schedule=schedule)
    model_config = train._model_config(config, manifest, train_images=4 * 8 * 10)  # 10 steps
    assert (model_config.learning_rate, model_config.warmup_from) == (4e-3, 1e-3)
    assert model_config.warmup_steps == 10
    import tf_keras as keras

    saved = build_model(model_config).optimizer.get_config()["learning_rate"]  # as saved
    rate = keras.optimizers.schedules.deserialize(saved)
    at = {step: float(rate(step)) for step in (0, 5, 10, 20, 30)}
    assert at[0] == pytest.approx(1e-3) and at[5] == pytest.approx(2.5e-3)
    assert at[10] == pytest.approx(4e-3)
    if schedule == "constant":
        assert at[20] == at[30] == pytest.approx(4e-3)
    else:
        assert at[20] == pytest.approx(2e-3) and at[30] == pytest.approx(0, abs=1e-9)
    one_worker = train._model_config(
        dataclasses.replace(config, workers=1), manifest, train_images=80
    )
    assert (one_worker.learning_rate, one_worker.warmup_steps) == (1e-3, 0)
