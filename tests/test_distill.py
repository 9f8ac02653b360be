"""Distillation from a teacher, a pretrained backbone frozen then fine-tuned, and named recipes:
real TensorFlow, a real local Ray, synthetic images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from dogbread import train
from dogbread.cli import main
from dogbread.config import TrainConfig
from dogbread.errors import DataError

from .conftest import SMALL

BACKBONE_SIZE = 32  # MobileNetV3Small's smallest input


def _constant_teacher(directory: Path, class_names: tuple[str, ...], dog: float) -> str:
    """A model dir whose model says p(dog) = `dog` for every image, whatever the label."""
    import tf_keras as keras

    from dogbread.model import ModelCard, save_model

    images = keras.Input((SMALL, SMALL, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(images)
    logit = float(np.log(dog / (1 - dog)))
    probability = keras.layers.Dense(
        1,
        activation="sigmoid",
        kernel_initializer="zeros",
        bias_initializer=keras.initializers.Constant(logit),
    )(pooled)
    model = keras.Model(images, probability)
    model.compile(loss="binary_crossentropy")
    save_model(model, ModelCard(class_names, SMALL, 0), str(directory))
    return str(directory)


def test_distillation_loss_is_cross_entropy_at_weight_0_and_zero_for_a_matching_teacher():
    import tensorflow as tf

    from dogbread.distill import distillation_loss

    student = tf.constant([[0.9], [0.2], [0.6]])
    labels = tf.constant([1.0, 0.0, 0.0])
    hard = distillation_loss(temperature=3.0, weight=0.0)
    packed = tf.concat([labels[:, None], tf.constant([[0.1], [0.5], [0.5]])], axis=-1)
    expected = -np.log([0.9, 0.8, 0.4])
    np.testing.assert_allclose(hard(packed, student).numpy(), expected, rtol=1e-5)
    soft = distillation_loss(temperature=2.0, weight=1.0)
    same = tf.concat([labels[:, None], student], axis=-1)
    np.testing.assert_allclose(soft(same, student).numpy(), 0.0, atol=1e-5)
    # Softmax heads too: a teacher that disagrees costs more than one that agrees.
    three = tf.constant([[0.7, 0.2, 0.1]])
    agree = tf.constant([[0.0, 0.7, 0.2, 0.1]])
    disagree = tf.constant([[0.0, 0.1, 0.2, 0.7]])
    assert float(soft(disagree, three)[0]) > float(soft(agree, three)[0]) + 0.1


@pytest.mark.slow
def test_a_student_of_two_workers_learns_its_teachers_answers_and_its_card_names_the_teacher(
    ray_local, synthetic_tree: str, tmp_path: Path
):
    """The teacher says "dog" for every image; a student taught by it alone (weight 1) says dog
    for the bread too, which the labels alone never teach it."""
    teacher = _constant_teacher(tmp_path / "teacher", ("bread", "dog"), dog=0.97)
    config = TrainConfig(
        data=synthetic_tree,
        out=str(tmp_path / "student"),
        workers=2,
        epochs=3,
        batch_size=8,
        image_size=SMALL,
        teacher=teacher,
        distill_weight=1.0,
        distill_temperature=1.0,
        seed=3,
    )
    metrics = train.run(config)
    for row in metrics["history"]:
        digests = row["worker_weight_digests"]
        assert digests[0] == digests[1], row  # the two workers stay in sync
    assert metrics["per_class"]["dog"]["recall"] == 1.0
    assert metrics["per_class"]["bread"]["recall"] < 0.5  # bread called dog, as taught
    card = json.loads((tmp_path / "student" / "model_card.json").read_text())
    teacher_card = json.loads((tmp_path / "teacher" / "model_card.json").read_text())
    assert card["teacher"] == teacher_card["model_version"] != ""
    assert card["architecture"] == "seed"
    saved = yaml.safe_load((tmp_path / "student" / "config.yaml").read_text())
    assert saved["teacher"] == teacher and saved["distill_weight"] == 1.0


def test_a_teacher_of_other_classes_or_none_at_all_is_refused_before_training(
    synthetic_tree: str, tmp_path: Path, capsys
):
    teacher = _constant_teacher(tmp_path / "teacher", ("cat", "dog"), dog=0.5)
    config = TrainConfig(data=synthetic_tree, out=str(tmp_path / "run"), teacher=teacher)
    with pytest.raises(DataError, match="knows cat, dog, the data has bread, dog"):
        train.run(config)
    code = main(
        ["train", "--data", synthetic_tree, "--out", str(tmp_path / "r"), "--teacher", "/nope"]
    )
    assert code == 2
    assert "no model at /nope" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_backbone_starts_from_its_weights_file_stays_frozen_then_is_fine_tuned(
    ray_local, synthetic_tree: str, tmp_path: Path
):
    import tf_keras as keras

    from dogbread import backbone
    from dogbread.model import ModelConfig, build_model, load_model

    keras.utils.set_random_seed(11)  # weights of its own, not those the run's seed draws
    pretrained = keras.applications.MobileNetV3Small(
        input_shape=(BACKBONE_SIZE, BACKBONE_SIZE, 3),
        include_top=False,
        weights=None,
        pooling="avg",
        include_preprocessing=True,
    )
    weights_file = tmp_path / "mobilenet.weights.h5"
    pretrained.save_weights(str(weights_file))
    expected = pretrained.get_weights()
    out = tmp_path / "run"
    config = TrainConfig(
        data=synthetic_tree,
        out=str(out),
        workers=1,
        epochs=2,
        batch_size=16,
        image_size=BACKBONE_SIZE,
        architecture="mobilenet_v3_small",
        backbone_weights=str(weights_file),
        freeze_epochs=1,
        patience=5,
        seed=5,
    )
    train.run(config)

    def backbone_after(epoch: int) -> list[np.ndarray]:
        model = build_model(ModelConfig(image_size=BACKBONE_SIZE, architecture=config.architecture))
        model.load_weights(str(out / "checkpoints" / f"epoch_{epoch:04d}" / "current.weights.h5"))
        return backbone.of(model).get_weights()

    frozen = backbone_after(1)
    assert len(frozen) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(frozen, expected, strict=True))
    tuned = backbone_after(2)
    assert not all(np.array_equal(a, b) for a, b in zip(tuned, expected, strict=True))
    history = json.loads((out / "metrics.json").read_text())["history"]
    rates = [row["learning_rate"] for row in history]
    assert rates[1] == pytest.approx(rates[0] * 0.1)  # fine-tuned at a tenth of the rate
    model, card = load_model(str(out))  # the whole model loads in safe mode
    assert card.architecture == "mobilenet_v3_small"
    assert card.backbone_weights == str(weights_file)
    assert card.backbone_weights_sha256 == hashlib.sha256(weights_file.read_bytes()).hexdigest()


@pytest.mark.parametrize("architecture", ["mobilenet_v3_small", "efficientnet_v2_b0"])
def test_backbone_models_save_and_load_in_safe_mode(architecture: str, tmp_path: Path):
    from dogbread.model import ModelCard, ModelConfig, build_model, load_model, save_model

    model = build_model(ModelConfig(image_size=BACKBONE_SIZE, architecture=architecture))
    save_model(model, ModelCard(("bread", "dog"), BACKBONE_SIZE, 0), str(tmp_path))
    loaded, _ = load_model(str(tmp_path))
    images = np.random.default_rng(0).integers(0, 256, (2, BACKBONE_SIZE, BACKBONE_SIZE, 3))
    np.testing.assert_allclose(
        loaded(images, training=False).numpy(), model(images, training=False).numpy(), atol=1e-6
    )


def test_backbone_flags_need_a_backbone_architecture(tmp_path: Path, capsys):
    code = main(["train", "--data", "d", "--out", str(tmp_path), "--freeze-epochs", "2"])
    assert code == 2
    assert "need a backbone: mobilenet_v3_small, efficientnet_v2_b0" in capsys.readouterr().err


def test_the_photos_recipe_is_one_flag_and_flags_and_config_files_override_it(tmp_path: Path):
    from dogbread.cli import build_parser, config_from_args

    def resolved(*flags: str) -> TrainConfig:
        args = build_parser().parse_args(["train", "--data", "d", "--out", "o", *flags])
        return config_from_args(TrainConfig, args)

    photos = resolved("--recipe", "photos")
    assert (photos.architecture, photos.image_size, photos.augment) == ("residual", 160, True)
    assert (photos.lr_schedule, photos.epochs, photos.patience) == ("cosine", 60, 20)
    assert resolved("--recipe", "seed") == resolved()  # the seed's recipe is the default
    job = tmp_path / "job.yaml"
    job.write_text("epochs: 30\n")
    overridden = resolved("--recipe", "photos", "--config", str(job), "--image-size", "128")
    assert (overridden.epochs, overridden.image_size, overridden.augment) == (30, 128, True)


def test_an_unknown_recipe_is_one_line_naming_the_recipes(capsys):
    assert main(["train", "--data", "d", "--out", "o", "--recipe", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dogbread: error: no recipe 'fast': the recipes are photos, seed"
