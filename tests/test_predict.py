"""Tests for `dogbread predict` (dogbread.predict.run, plus one real subprocess for exit codes)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dogbread.errors import ModelError
from dogbread.images import decode_image
from dogbread.model import load_model, predict_probabilities
from dogbread.predict import run
from dogbread.synth import write_synthetic_tree

PROJECT = Path(__file__).resolve().parents[1]


def line_pattern(path: str) -> str:
    """The spec'd text line for a classified image."""
    return r"^\d{1,3}\.\d\d% (bread|dog)  " + re.escape(path) + "$"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("predict")
    write_synthetic_tree(root, per_class=1, seed=5)
    broken = root / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg at all")
    return {
        "bread": str(root / "bread" / "bread_00000.jpg"),
        "dog": str(root / "dog" / "dog_00000.jpg"),
        "broken": str(broken),
        "missing": str(root / "missing.jpg"),
    }


def predict(model_dir: str, paths: list[str], as_json: bool = False) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = run(model_dir, paths, as_json=as_json, out=out)
    return code, out.getvalue().splitlines()


def expected_probabilities(model_dir: str, path: str) -> np.ndarray:
    model, card = load_model(model_dir)
    image = decode_image(Path(path).read_bytes(), card.image_size)
    return predict_probabilities(model, image[np.newaxis])[0]


def test_one_line_per_image_in_order_and_an_error_line(small_model_dir, images):
    paths = [images["dog"], images["bread"], images["broken"]]
    code, lines = predict(small_model_dir, paths)
    assert code == 1
    assert len(lines) == 3
    for line, path in zip(lines[:2], paths[:2], strict=True):
        assert re.match(line_pattern(path), line), line
    assert lines[2].startswith("error ")
    assert images["broken"] in lines[2]
    assert "not_an_image" in lines[2]


def test_printed_score_and_label_are_the_models(small_model_dir, images):
    _, (line,) = predict(small_model_dir, [images["bread"]])
    probabilities = expected_probabilities(small_model_dir, images["bread"])
    best = int(np.argmax(probabilities))
    label = ("bread", "dog")[best]
    assert line == f"{probabilities[best] * 100:.2f}% {label}  {images['bread']}"
    assert float(line.split("%")[0]) >= 50.0


def test_only_good_images_return_0(small_model_dir, images):
    code, lines = predict(small_model_dir, [images["bread"], images["dog"], images["bread"]])
    assert code == 0
    assert len(lines) == 3
    assert lines[0] == lines[2]  # the same image gives the same line
    assert all(not line.startswith("error") for line in lines)


def test_a_missing_file_is_an_error_line_not_an_exception(small_model_dir, images):
    code, lines = predict(small_model_dir, [images["missing"], images["dog"]])
    assert code == 1
    assert lines[0].startswith("error ") and images["missing"] in lines[0]
    assert re.match(line_pattern(images["dog"]), lines[1])


def test_json_lines(small_model_dir, images):
    paths = [images["bread"], images["broken"], images["dog"]]
    code, lines = predict(small_model_dir, paths, as_json=True)
    assert code == 1
    rows = [json.loads(line) for line in lines]
    assert [row["path"] for row in rows] == paths
    for row in (rows[0], rows[2]):
        assert set(row) == {"path", "label", "score", "probabilities", "error"}
        assert row["error"] is None
        assert set(row["probabilities"]) == {"bread", "dog"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["score"] == max(row["probabilities"].values())
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert 0.5 <= row["score"] <= 1.0
    broken = rows[1]
    assert broken["label"] is None and broken["score"] is None
    assert broken["error"].startswith("not_an_image")
    # The JSON and the text output agree on the numbers.
    text = predict(small_model_dir, [images["bread"]])[1][0]
    assert text.startswith(f"{rows[0]['score'] * 100:.2f}% {rows[0]['label']}  ")


def test_json_error_rows_have_the_same_keys(small_model_dir, images):
    _, lines = predict(small_model_dir, [images["dog"], images["broken"]], as_json=True)
    good, bad = (json.loads(line) for line in lines)
    assert set(bad) == set(good)
    assert bad["probabilities"] is None


def test_a_missing_model_raises_model_error(tmp_path, images):
    with pytest.raises(ModelError, match="no model at"):
        predict(str(tmp_path / "no-model"), [images["dog"]])


def test_cli_predict_exit_codes_and_output(small_model_dir, images):
    paths = [images["bread"], images["dog"], images["broken"]]
    result = subprocess.run(
        [sys.executable, "-m", "dogbread", "predict", "--model", small_model_dir, *paths],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert re.match(line_pattern(images["bread"]), lines[0]), lines[0]
    assert re.match(line_pattern(images["dog"]), lines[1]), lines[1]
    assert lines[2].startswith("error ") and images["broken"] in lines[2]
    # The same lines as the in-process function prints.
    assert lines == predict(small_model_dir, paths)[1]


@pytest.fixture(scope="module")
def litert_model_dir(tmp_path_factory) -> str:
    """The small seed CNN saved as `dogbread train` saves it: with its LiteRT conversion."""
    from dogbread.model import ModelCard, ModelConfig, build_model, save_model

    directory = str(tmp_path_factory.mktemp("model-litert"))
    model = build_model(ModelConfig(image_size=64))
    save_model(model, ModelCard(("bread", "dog"), 64, 0), directory, litert=True)
    assert Path(directory, "model.tflite").exists()
    return directory


def test_a_run_dir_with_its_litert_conversion_predicts_without_tensorflow(litert_model_dir, images):
    paths = [images["bread"], images["dog"], images["broken"]]
    script = (
        "import sys\n"
        "from dogbread.predict import run\n"
        f"code = run({litert_model_dir!r}, {paths!r}, as_json=True)\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr[-3000:]  # the broken image
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["path"] for row in rows] == paths and rows[2]["error"].startswith("not_an_image")
    for row, path in zip(rows[:2], paths[:2], strict=True):  # LiteRT's scores are Keras's
        keras = expected_probabilities(litert_model_dir, path)
        np.testing.assert_allclose(list(row["probabilities"].values()), keras, atol=1e-4)
