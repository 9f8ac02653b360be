"""Tests for `dogbread ensemble`: one model dir averaging the probabilities of several runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dogbread import ensemble, label, report
from dogbread.cli import main
from dogbread.config import EnsembleConfig, LabelConfig
from dogbread.errors import DataError, ModelError
from dogbread.images import decode_image
from dogbread.model import (
    ModelCard,
    ModelConfig,
    build_model,
    load_litert,
    load_model,
    predict_probabilities,
    save_model,
)
from tests.conftest import SMALL


def member(bias: float, num_classes: int = 2, image_size: int = SMALL):
    """An untrained CNN whose output layer is pushed by `bias`, so members clearly disagree."""
    model = build_model(ModelConfig(image_size=image_size, num_classes=num_classes))
    kernel, biases = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel, biases + np.linspace(bias, -bias, len(biases))])
    return model


def save_member(model, directory: Path, classes=("bread", "dog"), fingerprint="f00d") -> str:
    card = ModelCard(classes, model.input_shape[1], 0, data_fingerprint=fingerprint)
    save_model(model, card, str(directory), litert=True)
    return str(directory)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("members")
    return [save_member(member(b), root / f"run-{i}") for i, b in enumerate((1.5, -0.5, 0.2))]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from dogbread.synth import write_synthetic_tree

    root = tmp_path_factory.mktemp("ensemble-images")
    write_synthetic_tree(root, per_class=3, seed=7)
    return sorted(root.rglob("*.jpg"))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_average_models_outputs_the_mean_and_leaves_the_members_alone(num_classes):
    models = [member(b, num_classes) for b in (2.0, -1.0)]
    before = [[w.copy() for w in m.get_weights()] for m in models]
    averaged = ensemble.average_models(models)
    batch = np.random.default_rng(0).integers(0, 256, (4, SMALL, SMALL, 3), dtype=np.uint8)

    outputs = [m(batch, training=False).numpy() for m in models]
    assert np.abs(outputs[0] - outputs[1]).max() > 0.1  # the members do disagree
    got = averaged(batch, training=False).numpy()
    assert got.shape == (4, 1 if num_classes == 2 else num_classes)
    np.testing.assert_allclose(got, np.mean(outputs, axis=0), atol=1e-6)
    assert averaged.count_params() == sum(m.count_params() for m in models)
    for model, weights in zip(models, before, strict=True):
        for now, then in zip(model.get_weights(), weights, strict=True):
            np.testing.assert_array_equal(now, then)


def test_average_models_refuses_members_of_different_shapes():
    with pytest.raises(ModelError, match="differ in input or output shape"):
        ensemble.average_models([member(0.0), member(0.0, image_size=2 * SMALL)])


def test_the_ensemble_is_a_model_dir_that_predict_and_label_use(members, images, tmp_path):
    before = {m: digest(Path(m)) for m in members}
    out = tmp_path / "ensemble"
    card = ensemble.run(EnsembleConfig(members=tuple(members), out=str(out)))

    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "model.keras",
        "model.tflite",
        "model_card.json",
    ]
    cards = [load_model(m)[1] for m in members]
    assert card.members == tuple(c.model_version for c in cards)
    assert card.class_names == ("bread", "dog") and card.image_size == SMALL
    assert card.data_fingerprint == "f00d"
    assert card.parameter_count == sum(c.parameter_count for c in cards)
    assert ModelCard.from_json((out / "model_card.json").read_text()) == card
    assert yaml.safe_load((out / "config.yaml").read_text()) == {
        "members": members,
        "out": str(out),
        "s3_endpoint": None,
    }
    assert {m: digest(Path(m)) for m in members} == before  # the runs are only read
    with pytest.raises(DataError, match=f"an ensemble of {len(members)} runs.*`dogbread evaluate`"):
        report.write_report(str(out))

    # Keras (safe mode) and the LiteRT conversion that label runs give the members' mean.
    model, loaded_card = load_model(str(out))
    assert loaded_card == card
    litert, _ = load_litert(str(out))
    batch = np.stack([decode_image(p.read_bytes(), SMALL) for p in images])
    expected = np.mean([predict_probabilities(load_model(m)[0], batch) for m in members], axis=0)
    np.testing.assert_allclose(predict_probabilities(model, batch), expected, atol=1e-5)
    np.testing.assert_allclose(predict_probabilities(litert, batch), expected, atol=1e-5)

    labeled = tmp_path / "labels"
    label.run(LabelConfig(model=str(out), input=str(images[0].parents[1]), output=str(labeled)))
    rows = {r["path"]: r for r in label.read_labels(str(labeled)).to_pylist()}
    assert sorted(rows) == sorted(str(p) for p in images)
    for path, probabilities in zip(images, expected, strict=True):
        row = rows[str(path)]
        assert row["error"] is None and row["model_version"] == card.model_version
        assert row["label"] == ("bread", "dog")[int(np.argmax(probabilities))]
        np.testing.assert_allclose(row["probabilities"], probabilities, atol=1e-5)


def test_members_must_agree_and_an_existing_model_is_not_overwritten(members, tmp_path):
    cats = save_member(member(0.3), tmp_path / "cats", classes=("cat", "dog"))
    big = save_member(member(0.3, image_size=2 * SMALL), tmp_path / "big")
    cases = {
        (members[0], cats): "has classes cat, dog, .* has bread, dog",
        (members[0], big): f"takes {2 * SMALL} px images, .* {SMALL} px",
        (members[0], members[0]): "the same model is a member twice",
    }
    for pair, message in cases.items():
        out = tmp_path / "out"
        with pytest.raises(ModelError, match=message):
            ensemble.run(EnsembleConfig(members=pair, out=str(out)))
        assert not out.exists()

    occupied = tmp_path / "occupied"
    save_member(member(0.0), occupied)
    kept = digest(occupied)
    with pytest.raises(ModelError, match="already holds a model"):
        ensemble.run(EnsembleConfig(members=tuple(members[:2]), out=str(occupied)))
    assert digest(occupied) == kept


def test_cli_builds_from_comma_separated_members_and_explains_one_member(members, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["ensemble", "--members", ",".join(members[:2]), "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert len(card["members"]) == 2
    capsys.readouterr()

    assert main(["ensemble", "--members", members[0], "--out", str(tmp_path / "one")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dogbread: error: an ensemble needs at least two members"
    assert not (tmp_path / "one").exists()


def test_members_and_ensemble_on_s3(s3_server, tmp_path):
    client = s3_server.client()
    client.create_bucket(Bucket="runs")
    endpoint = s3_server.endpoint
    members = []
    for i, bias in enumerate((1.0, -1.0)):
        model = member(bias)
        uri = f"s3://runs/run-{i}"
        save_model(model, ModelCard(("bread", "dog"), SMALL, 0), uri, endpoint, litert=True)
        members.append(uri)

    card = ensemble.run(EnsembleConfig(tuple(members), "s3://runs/ensemble", endpoint))
    listed = client.list_objects_v2(Bucket="runs", Prefix="ensemble/")["Contents"]
    keys = {o["Key"] for o in listed if not o["Key"].endswith("/")}  # not the folder marker
    files = ("config.yaml", "model.keras", "model.tflite", "model_card.json")
    assert keys == {f"ensemble/{name}" for name in files}
    config = client.get_object(Bucket="runs", Key="ensemble/config.yaml")["Body"].read().decode()
    assert s3_server.secret_key not in config and "s3://runs/run-1" in config
    model, loaded = load_model("s3://runs/ensemble", endpoint)
    assert loaded.members == card.members and len(card.members) == 2
    assert model.count_params() == card.parameter_count


def test_a_missing_member_fails_in_one_line_before_tensorflow_loads(tmp_path):
    probe = (
        "import sys; from dogbread.cli import main; "
        f"code = main(['ensemble', '--members', '{tmp_path}/a,{tmp_path}/b', '--out', "
        f"'{tmp_path}/out']); "
        "assert not [m for m in sys.modules if m.startswith(('tensorflow', 'tf_keras'))]; "
        "sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"dogbread: error: no model at {tmp_path}/a (expected a run dir with model.keras)"
    )
    assert not (tmp_path / "out").exists()


def test_help_says_members_are_comma_separated():
    done = subprocess.run(
        [sys.executable, "-m", "dogbread", "ensemble", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "--members MEMBERS     comma-separated" in done.stdout
