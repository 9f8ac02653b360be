"""The benchmarks run and print what bench/README.md's table is made of (at a tiny size: CI does
not measure anything, it only keeps the scripts working); and the LiteRT runtime they measure
reproduces Keras, or steps aside."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[1]
REAL_PHOTOS = PROJECT.parent / "shared" / "data" / "dogbread-real" / "manifest.csv"


def run_all_smoke(tmp_path: Path, *args: str, **env: str) -> tuple[dict, str]:
    """`bench/run_all.py --smoke *args` into tmp_path: (its results.json, the refreshed table's
    README). Extra `env` goes to the benchmarks."""
    readme = tmp_path / "README.md"
    shutil.copy(PROJECT / "bench" / "README.md", readme)
    results = tmp_path / "results.json"
    command = [sys.executable, "bench/run_all.py", "--smoke", *args]
    command += ["--results", str(results), "--readme", str(readme)]
    # A cache of its own: the images are drawn for this test, not taken from an earlier run.
    # Short and outside pytest's tmp dirs: Ray's socket paths under it must fit in 107 bytes.
    cache = tempfile.mkdtemp(prefix="db-bench-", dir="/tmp")
    try:
        subprocess.run(
            command,
            cwd=PROJECT,
            env={**os.environ, "DOGBREAD_BENCH_CACHE": cache, **env},
            check=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return json.loads(results.read_text()), readme.read_text()


@pytest.mark.slow
def test_run_all_smoke_writes_the_json_and_the_table(tmp_path):
    # Not --accuracy: accuracy.py has a test of its own below, which xdist can run beside this.
    combined, text = run_all_smoke(tmp_path)
    assert combined["smoke"] is True
    found = combined["results"]
    throughput = found["label_throughput"]
    assert throughput["machine"]["cpus"] >= 1 and len(throughput["machine"]["load_average"]) == 3
    assert "large" not in throughput  # --large-images 0: the same code on bigger files
    small = throughput["small"]
    assert small["images"] == 40
    assert small["a_seed_loop"]["images_per_second"] > 0
    assert small["b_local_pipeline"]["images_per_second_wall"] > 0
    assert small["b_local_pipeline"]["errors"] == 0
    c = small["c_dogbread_label"]
    assert c["summary"]["labeled"] == 40 and c["summary"]["errors"] == {}
    assert c["images_per_second_wall"] > 0 and c["first_batch_seconds"] > 0
    # Ratios are rounded for the table: at smoke size they may round to 0.0.
    assert small["c_over_a"] >= 0 and small["c_over_b_wall"] >= 0
    # (d) the split plan beside (c), the default: fused on this one machine without --gpu.
    assert c["plan"]["decode"] == "fused"
    d = small["d_label_split"]
    assert d["plan"] == {"decode": "split", "actor_cpus": 1.0, "actors": 1, "labeled_in_driver": 0}
    assert d["summary"]["labeled"] == 40 and d["summary"]["errors"] == {}
    assert d["images_per_second_wall"] > 0
    # Its one batch may be committed (and its kept file deleted) before the poll sees it.
    assert d["first_batch_seconds"] is None or d["first_batch_seconds"] > 0
    assert len(small["runs"]["d"]) == len(small["runs"]["c"]) == 1
    assert small["split_over_fused_wall"] >= 0
    # None when a run kept a single batch, as 40 images are (batches of 128): no steady rate.
    assert small["split_over_fused_steady"] is None or small["split_over_fused_steady"] > 0
    assert "d/c (split/fused)" in text
    memory = found["label_memory"]
    assert set(memory["runs"]) == {"40", "80"}
    assert all(
        r["peak_rss_mib"] > 100 and r["peak_processes"] >= 3 for r in memory["runs"].values()
    )
    assert memory["rss_growth"] > 0 and memory["pss_growth"] > 0
    train_memory = found["train_memory"]  # --smoke: one run, so no growth
    (trained,) = train_memory["runs"].values()
    assert trained["driver_peak_rss_mib"] > 100 and trained["peak_processes"] >= 3
    assert trained["object_store_peak_mib"] > 0 and trained["object_store_capacity_mib"] > 0
    assert trained["peak_pss_mib"] <= trained["peak_rss_mib"]
    assert train_memory["object_store_growth"] is None and train_memory["tree_pss_growth"] is None
    assert "(**n/a**)" in text and "Nonex" not in text
    startup = found["startup"]
    assert 0 < startup["first_batch_seconds"] <= startup["wall_seconds"]
    predict = startup["predict"]
    assert len(predict["runs"]["litert"]) == len(predict["runs"]["keras"]) >= 1
    assert predict["one_image_seconds_litert"] > 0 and predict["keras_over_litert"] > 0
    sizing = found["label_sizing"]  # 64 images of 256 px, 2 of 12 MP
    assert sizing["images"] == {"small_256": 64, "large_12mp": 2}
    for key in ("decode_per_core", "decode_block_per_core"):
        assert sizing[key]["small_256"] > sizing[key]["large_12mp"] > 0
    assert 196_608 < sizing["bytes_per_image_256"] < 197_000  # the pixels and the path
    assert set(sizing["litert_images_per_second"]) == set(sizing["litert_per_core"]) == {"1", "2"}
    assert sizing["litert_per_core"]["2"] == round(sizing["litert_images_per_second"]["2"] / 2, 1)
    assert all(rate > 0 for rate in sizing["litert_per_core"].values())
    assert [s["gpu_images_per_second"] for s in sizing["sizing"]] == [1000, 2000, 5000]
    for row in sizing["sizing"]:
        assert 1 <= row["cores_per_gpu_256"] <= row["cores_per_gpu_12mp"]
        assert row["object_store_mib_per_second"] > 0
    plan = found["label_plan"]  # --smoke: 20,000 keys in 4 files of an S3 Inventory, 4 shards
    (planned,) = plan["runs"].values()
    assert planned["ok"] and planned["exit_code"] == 0 and all(planned["checks"].values())
    assert (planned["keys"], planned["files"], planned["duplicates_expected"]) == (20_000, 4, 15)
    dry = planned["dry_run"]
    assert (dry["images"], dry["duplicate_paths"], dry["shards"]) == (19_985, 15, 4)
    assert (dry["to_label"], dry["already_done"], dry["planned_before"]) == (19_985, 0, False)
    assert 0 < dry["seconds"] <= planned["seconds"] and planned["cpu_seconds"] > 0
    # 20,000 keys are planned in the driver, without Ray: the driver is all the processes there
    # are (the full sizes plan in Ray tasks)
    assert 0 < planned["driver_peak_rss_mib"] <= planned["total_peak_rss_mib"]
    assert planned["peak_processes"] >= 1 and plan["ratios_largest_over_smallest"] is None
    assert plan["targets"]["no_error"] and isinstance(plan["targets_met"], bool)
    report = found["label_report"]  # --smoke: outputs of 2,000 and 20,000 rows
    assert [r["files"] for r in report["runs"].values()] == [2, 20]
    assert all(r["seconds"] > 0 and r["page_kib"] > 0 for r in report["runs"].values())
    train = found["train_overhead"]
    (only_round,) = train["rounds"]
    assert len(only_round["plain_keras"]["epoch_seconds"]) == 1
    assert len(only_round["dogbread_train"]["1"]["epoch_seconds"]) == 1
    assert train["overhead"]["1"] > 0 and len(train["overhead_by_round"]["1"]) == 1
    if REAL_PHOTOS.exists():
        assert train["data"].startswith("real photos")
    assert (
        "c/a" in text
        and "growth" in text
        and "--workers 1" in text
        and "planning an S3 Inventory" in text
        and "cores per GPU at" in text
        and combined["generated"] in text
    )


@pytest.mark.slow
@pytest.mark.skipif(not REAL_PHOTOS.exists(), reason="accuracy.py measures the real photos only")
def test_accuracy_smoke_trains_on_the_real_photos_and_reports_beside_the_notebook(
    tmp_path, monkeypatch
):
    # The run dirs (a mkdtemp each) land in tmp_path, not in /tmp. Only the ensemble's entry
    # runs: accuracy_residual's smoke is one run of the same recipe, which the members are.
    combined, text = run_all_smoke(tmp_path, "--only", "accuracy_ensemble", TMPDIR=str(tmp_path))
    ensembled = combined["results"]["accuracy_ensemble"]
    members = ensembled["members"]
    assert [m["seed"] for m in members] == [0, 1]
    for result in members:
        assert result["config"]["architecture"] == "residual"
        assert result["config"]["image_size"] == 64
        assert result["epochs_run"] == 1 and result["best_epoch"] == 1
    for result in (ensembled, *members):
        assert result["val_images"] == 16  # --limit 16: 16 val photos, the classes in turn
        assert all(0 <= result[k] <= 1 for k in ("accuracy", "precision", "recall"))
    assert ensembled["seed_notebook"] == {"accuracy": 0.967, "precision": 0.984, "recall": 0.936}
    assert ensembled["config"]["members"] == 2
    # A single run's row (accuracy_residual's): a member's result is what accuracy.py prints
    # for one run.
    monkeypatch.syspath_prepend(str(PROJECT / "bench"))
    import run_all

    single_row = run_all.table({"accuracy_residual": members[0]}).splitlines()[-1]
    assert "architecture residual" in single_row and "best epoch 1 of 1" in single_row
    assert "the members alone" not in single_row
    card = json.loads((Path(ensembled["run_dir"]) / "model_card.json").read_text())
    versions = [json.loads(Path(m["run_dir"], "metrics.json").read_text()) for m in members]
    assert card["members"] == [v["model_version"] for v in versions]
    assert "architecture residual" in text and "the members alone" in text
    # The student (--distill): the recipe, taught by the ensemble, beside it with its speed.
    student = ensembled["student"]
    assert student["seed"] == 2 and student["epochs_run"] == 1 and student["val_images"] == 16
    assert student["images_per_second"]["float"] > 0
    assert ensembled["images_per_second"]["float"] > 0
    assert ensembled["student_minus_ensemble"] == round(
        student["accuracy"] - ensembled["accuracy"], 4
    )
    student_card = json.loads((Path(student["run_dir"]) / "model_card.json").read_text())
    assert student_card["teacher"] == card["model_version"]
    assert "distilled from that ensemble" in text

    # Again into the same folder (what run_all ran, with --out): the members are not trained again.
    smoke = ["--architecture", "residual", "--augment", "--lr-schedule", "cosine"]
    smoke += ["--image-size", "64", "--epochs", "1", "--patience", "20", "--limit", "16"]
    again = subprocess.run(
        [sys.executable, "bench/accuracy.py", *smoke, "--members", "2", "--distill"]
        + ["--out", str(Path(ensembled["run_dir"]).parent)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert again.stderr.count("reusing the finished run") == 3  # the student too
    rerun = json.loads(again.stdout)
    assert rerun["members"] == members
    assert rerun["student"]["accuracy"] == student["accuracy"]
    assert rerun["accuracy"] == ensembled["accuracy"]


# --- the LiteRT runtime that labeling and predict run on (the benchmarks' fast path) ------------


@pytest.fixture(scope="module")
def seed_cnn():
    import tf_keras as keras

    from dogbread.model import build_model

    keras.utils.set_random_seed(2)
    return build_model()  # the default: the seed's network at 256x256


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> np.ndarray:
    """16 synthetic JPEGs decoded as labeling decodes them."""
    from dogbread.images import decode_image
    from dogbread.synth import write_synthetic_tree

    root = tmp_path_factory.mktemp("litert")
    write_synthetic_tree(root, per_class=8, seed=4)
    return np.stack([decode_image(p.read_bytes(), 256) for p in sorted(root.rglob("*.jpg"))])


def test_litert_reproduces_keras_on_a_batch(seed_cnn, photos):
    from dogbread.litert import LiteRTModel, inference_model
    from dogbread.model import predict_probabilities

    assert isinstance(inference_model(seed_cnn), LiteRTModel)  # the fast path is the one taken
    keras_outputs = seed_cnn(photos, training=False).numpy()
    probabilities = predict_probabilities(seed_cnn, photos)
    assert np.max(np.abs(probabilities[:, 1] - keras_outputs[:, 0])) <= 1e-4
    # One image at a time (predict) and in a batch (label) give the same scores.
    one = np.concatenate([predict_probabilities(seed_cnn, photos[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(one, probabilities[:4], atol=1e-6)


def test_a_litert_model_runs_without_tensorflow(seed_cnn, photos, tmp_path):
    from dogbread.litert import inference_model
    from dogbread.model import predict_probabilities

    (tmp_path / "model.pickle").write_bytes(pickle.dumps(inference_model(seed_cnn)))
    np.save(tmp_path / "photos.npy", photos[:3])
    script = (
        "import pickle, sys, numpy as np\n"
        "from dogbread.model import predict_probabilities\n"
        f"model = pickle.load(open({str(tmp_path / 'model.pickle')!r}, 'rb'))\n"
        f"p = predict_probabilities(model, np.load({str(tmp_path / 'photos.npy')!r}))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, p)\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=PROJECT, check=True, timeout=120)
    np.testing.assert_array_equal(
        np.load(tmp_path / "out.npy"), predict_probabilities(seed_cnn, photos[:3])
    )


def test_keras_runs_when_conversion_fails_or_differs(monkeypatch, caplog):
    import tensorflow as tf

    from dogbread import litert
    from dogbread.litert import inference_model
    from dogbread.model import ModelConfig, build_model, predict_probabilities

    pixels = np.random.default_rng(5).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    broken = build_model(ModelConfig(image_size=64))

    def fail(*args, **kwargs):
        raise RuntimeError("no converter today")

    with monkeypatch.context() as patch:
        patch.setattr(tf.lite.TFLiteConverter, "from_concrete_functions", fail)
        assert inference_model(broken) is broken
    assert "conversion failed (no converter today)" in caplog.text
    expected = broken(pixels, training=False).numpy()[:, 0]
    np.testing.assert_allclose(predict_probabilities(broken, pixels)[:, 1], expected, atol=1e-6)

    strict = build_model(ModelConfig(image_size=64))
    monkeypatch.setattr(litert, "LITERT_TOLERANCE", -1.0)  # no difference passes
    assert inference_model(strict) is strict
    assert "LiteRT differs from it by" in caplog.text


def test_a_model_trained_further_is_converted_again(photos):
    from dogbread.litert import inference_model
    from dogbread.model import ModelConfig, build_model, predict_probabilities

    model = build_model(ModelConfig(image_size=64))
    pixels = photos[:4, ::4, ::4]  # 64x64
    first = inference_model(model)
    predict_probabilities(model, pixels)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel, bias + 1.0])
    assert inference_model(model) is not first
    expected = model(pixels, training=False).numpy()[:, 0]
    np.testing.assert_allclose(predict_probabilities(model, pixels)[:, 1], expected, atol=1e-4)
