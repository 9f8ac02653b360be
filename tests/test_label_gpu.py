"""`dogbread label --gpu`: each actor takes a GPU, loads the Keras model and runs one call at a
time. Here the GPU is faked (Ray schedules on it, TensorFlow runs on the CPU), which is enough to
run that whole path; the labels must match the CPU path's (LiteRT)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from dogbread import label
from dogbread.config import LabelConfig

from .conftest import subprocess_env


def test_gpu_actors_label_every_image_as_the_cpu_path_does(
    ray_local_gpu, synthetic_tree, small_model_dir, tmp_path
):
    rows = {}
    for use_gpu in (False, True):
        out = tmp_path / f"use-gpu-{use_gpu}"
        config = LabelConfig(
            model=small_model_dir,
            input=synthetic_tree,
            output=str(out),
            batch_size=16,
            use_gpu=use_gpu,
        )
        summary = label.run(config)
        assert summary["labeled"] == summary["images"] == 120 and summary["errors"] == {}
        rows[use_gpu] = {r["path"]: r for r in label.read_labels(str(out)).to_pylist()}
    assert rows[True].keys() == rows[False].keys()
    for path, row in rows[True].items():
        probabilities = np.array(row["probabilities"])
        np.testing.assert_allclose(probabilities, rows[False][path]["probabilities"], atol=1e-4)
        assert row["label"] == ("bread", "dog")[int(np.argmax(probabilities))]


def test_gpu_on_a_local_ray_without_one_fails_at_once(synthetic_tree, small_model_dir, tmp_path):
    # Its own process, so that dogbread starts the Ray itself: one it joins may still grow GPUs.
    command = [sys.executable, "-m", "dogbread", "label", "--model", small_model_dir, "--gpu"]
    command += ["--input", synthetic_tree, "--output", str(tmp_path / "out")]
    done = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    error = done.stderr.splitlines()[-1]
    assert error == "dogbread: error: --gpu needs a GPU, and the local Ray has none: drop --gpu"
