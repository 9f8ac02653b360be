"""Tests for dogbread.model: the seed CNN, its probabilities and labels, saving and loading."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tf_keras as keras

from dogbread.errors import ModelError
from dogbread.litert import LiteRTModel
from dogbread.model import (
    CARD_FILENAME,
    LITERT_FILENAME,
    MODEL_FILENAME,
    ModelCard,
    ModelConfig,
    build_model,
    class_probabilities,
    label_predictions,
    load_litert,
    load_model,
    predict_probabilities,
    save_model,
)

RESIDUAL_PARAMETERS = 183_361  # independent of the image size (global average pooling)
TINY = 32  # smallest convenient size for save/load tests: 30->15->13->6->4->2


def layers_of(model: keras.Model, cls: type) -> list:
    return [layer for layer in model.layers if isinstance(layer, cls)]


def architecture(model: keras.Model) -> list[tuple]:
    """Layer types, output shapes and parameter counts: everything but the generated names."""
    return [
        (type(layer).__name__, str(layer.output_shape), layer.count_params())
        for layer in model.layers
    ]


@pytest.fixture(scope="module")
def default_model() -> keras.Model:
    return build_model()


# --- the default (seed) network -----------------------------------------------------------------


def test_default_model_has_the_seed_parameter_count(default_model):
    assert default_model.count_params() == 3_696_625


def test_default_model_layer_order_and_output_shapes(default_model):
    m = default_model
    assert m.input_shape == (None, 256, 256, 3)
    assert [type(layer).__name__ for layer in m.layers] == [
        "InputLayer",
        "Rescaling",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Flatten",
        "Dense",
        "Dropout",
        "Dense",
    ]
    convs = layers_of(m, keras.layers.Conv2D)
    assert [c.output_shape for c in convs] == [
        (None, 254, 254, 16),
        (None, 125, 125, 32),
        (None, 60, 60, 16),
    ]
    assert all(c.kernel_size == (3, 3) and c.activation.__name__ == "relu" for c in convs)
    pools = layers_of(m, keras.layers.MaxPooling2D)
    assert [p.output_shape for p in pools] == [
        (None, 127, 127, 16),
        (None, 62, 62, 32),
        (None, 30, 30, 16),
    ]
    (flatten,) = layers_of(m, keras.layers.Flatten)
    assert flatten.output_shape == (None, 14400)
    hidden, head = layers_of(m, keras.layers.Dense)
    assert hidden.output_shape == (None, 256)
    assert hidden.activation.__name__ == "relu"
    assert head.output_shape == (None, 1)
    assert m.output_shape == (None, 1)
    assert head.activation.__name__ == "sigmoid"


def test_rescaling_by_1_over_255_is_inside_the_model(default_model):
    (rescaling,) = layers_of(default_model, keras.layers.Rescaling)
    assert rescaling.scale == pytest.approx(1 / 255)
    assert rescaling.offset == 0
    # It is the first thing applied to the input: 255 becomes 1.0, 0 stays 0.
    upto = keras.Model(default_model.input, rescaling.output)
    pixels = np.zeros((1, 256, 256, 3), np.uint8)
    pixels[0, 0, 0] = 255
    scaled = upto(pixels).numpy()
    assert scaled.max() == pytest.approx(1.0)
    assert scaled.min() == 0.0


def test_uint8_pixels_can_be_fed_directly():
    model = build_model(ModelConfig(image_size=TINY))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, TINY, TINY, 3), dtype=np.uint8)
    from_uint8 = model(pixels, training=False).numpy()
    from_float = model(pixels.astype(np.float32), training=False).numpy()
    assert from_uint8.shape == (3, 1)
    assert np.all((from_uint8 >= 0) & (from_uint8 <= 1))
    np.testing.assert_allclose(from_uint8, from_float, rtol=1e-6, atol=1e-7)


def test_hidden_dense_is_l2_regularized_and_followed_by_dropout(default_model):
    hidden, head = layers_of(default_model, keras.layers.Dense)
    assert isinstance(hidden.kernel_regularizer, keras.regularizers.L2)
    assert isinstance(hidden.bias_regularizer, keras.regularizers.L2)
    assert float(hidden.kernel_regularizer.l2) == pytest.approx(0.01)
    assert float(hidden.bias_regularizer.l2) == pytest.approx(0.01)
    assert head.kernel_regularizer is None and head.bias_regularizer is None
    # Only those two regularization terms contribute to the loss.
    assert len(default_model.losses) == 2
    (dropout,) = layers_of(default_model, keras.layers.Dropout)
    assert dropout.rate == 0.25
    layers = default_model.layers
    assert layers.index(dropout) == layers.index(hidden) + 1 == layers.index(head) - 1


def test_default_compile_is_binary_crossentropy_with_adam(default_model):
    assert default_model.loss == "binary_crossentropy"
    assert isinstance(default_model.optimizer, keras.optimizers.Adam)
    assert float(default_model.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)


def test_learning_rate_comes_from_the_config():
    model = build_model(ModelConfig(image_size=TINY, learning_rate=0.02))
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.02)


# --- other configs ------------------------------------------------------------------------------


def test_three_classes_give_a_softmax_head_and_sparse_loss():
    model = build_model(ModelConfig(image_size=TINY, num_classes=3))
    assert model.output_shape == (None, 3)
    assert model.layers[-1].activation.__name__ == "softmax"
    assert model.loss == "sparse_categorical_crossentropy"
    pixels = np.random.default_rng(1).integers(0, 256, (4, TINY, TINY, 3), dtype=np.uint8)
    probabilities = predict_probabilities(model, pixels)
    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_image_size_64_works():
    model = build_model(ModelConfig(image_size=64))
    assert model.input_shape == (None, 64, 64, 3)
    # 64 -> conv 62 -> pool 31 -> conv 29 -> pool 14 -> conv 12 -> pool 6: 6*6*16 = 576.
    (flatten,) = layers_of(model, keras.layers.Flatten)
    assert flatten.output_shape == (None, 576)
    assert model.count_params() == 3_696_625 - (14400 - 576) * 256
    out = model(np.zeros((2, 64, 64, 3), np.uint8), training=False).numpy()
    assert out.shape == (2, 1)


def test_augmentation_adds_layers_but_no_parameters_and_is_off_at_inference():
    plain = build_model(ModelConfig(image_size=TINY))
    augmented = build_model(ModelConfig(image_size=TINY, augment=True))
    names = [type(layer).__name__ for layer in augmented.layers]
    assert names[1:5] == ["RandomFlip", "RandomRotation", "RandomZoom", "Rescaling"]
    assert "RandomFlip" not in [type(layer).__name__ for layer in plain.layers]
    assert augmented.count_params() == plain.count_params()
    pixels = np.random.default_rng(2).integers(0, 256, (2, TINY, TINY, 3), dtype=np.uint8)
    first = augmented(pixels, training=False).numpy()
    second = augmented(pixels, training=False).numpy()
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("num_classes", [1, 0])
def test_fewer_than_two_classes_raise_model_error(num_classes):
    with pytest.raises(ModelError, match=f"num_classes must be at least 2, got {num_classes}"):
        build_model(ModelConfig(image_size=TINY, num_classes=num_classes))


def test_the_residual_architecture_keeps_the_contract_with_a_fraction_of_the_parameters():
    model = build_model(ModelConfig(image_size=160, architecture="residual"))
    assert model.count_params() == RESIDUAL_PARAMETERS
    assert model.input_shape == (None, 160, 160, 3) and model.output_shape == (None, 1)
    assert type(model.layers[1]) is keras.layers.Rescaling  # uint8 in, as for the seed
    assert layers_of(model, keras.layers.BatchNormalization)
    assert layers_of(model, keras.layers.GlobalAveragePooling2D)
    three = build_model(ModelConfig(image_size=64, num_classes=3, architecture="residual"))
    pixels = np.random.default_rng(5).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    probabilities = predict_probabilities(three, pixels)
    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_an_unknown_architecture_raises_model_error():
    with pytest.raises(ModelError, match="seed, residual"):
        build_model(ModelConfig(image_size=TINY, architecture="resnet50"))


def test_cosine_decay_takes_the_learning_rate_to_zero_over_decay_steps():
    optimizer = build_model(ModelConfig(image_size=TINY, decay_steps=100)).optimizer
    schedule = keras.optimizers.schedules.deserialize(optimizer.get_config()["learning_rate"])
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(50)) == pytest.approx(5e-4)
    assert float(schedule(100)) == pytest.approx(0, abs=1e-9)


def test_build_model_is_pure():
    config = ModelConfig(image_size=TINY)
    a, b = build_model(config), build_model(config)
    assert a is not b
    assert architecture(a) == architecture(b)
    assert a.count_params() == b.count_params()
    assert not {id(layer) for layer in a.layers} & {id(layer) for layer in b.layers}
    assert not {id(w) for w in a.weights} & {id(w) for w in b.weights}
    # Changing one model's weights leaves the other untouched.
    before = [w.copy() for w in b.get_weights()]
    a.set_weights([np.zeros_like(w) for w in a.get_weights()])
    for kept, now in zip(before, b.get_weights(), strict=True):
        np.testing.assert_array_equal(kept, now)
    # And the config object itself is not changed by building.
    assert config == ModelConfig(image_size=TINY)


# --- probabilities and labels -------------------------------------------------------------------


def test_class_probabilities_of_a_sigmoid_head():
    outputs = np.array([[0.25], [0.875], [0.0], [1.0]], np.float32)
    probabilities = class_probabilities(outputs)
    assert probabilities.shape == (4, 2)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(
        probabilities, [[0.75, 0.25], [0.125, 0.875], [1.0, 0.0], [0.0, 1.0]]
    )
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_class_probabilities_of_a_softmax_head_pass_through():
    outputs = np.array([[0.5, 0.25, 0.25], [0.125, 0.125, 0.75]], np.float32)
    np.testing.assert_array_equal(class_probabilities(outputs), outputs)


def test_predict_probabilities_of_an_empty_batch():
    model = build_model(ModelConfig(image_size=TINY))
    empty = predict_probabilities(model, np.zeros((0, TINY, TINY, 3), np.uint8))
    assert empty.shape == (0, 2)


PROBABILITIES = np.array([[0.75, 0.25], [0.375, 0.625], [0.125, 0.875]], np.float32)


def test_label_predictions_without_threshold():
    labels, scores = label_predictions(PROBABILITIES, ("bread", "dog"))
    assert labels == ["bread", "dog", "dog"]
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [0.75, 0.625, 0.875])


def test_label_predictions_with_threshold_marks_uncertain():
    labels, scores = label_predictions(PROBABILITIES, ("bread", "dog"), threshold=0.75)
    # A score equal to the threshold is kept; below it is "uncertain"; the score is unchanged.
    assert labels == ["bread", "uncertain", "dog"]
    np.testing.assert_array_equal(scores, [0.75, 0.625, 0.875])
    labels, _ = label_predictions(PROBABILITIES, ("bread", "dog"), threshold=0.9)
    assert labels == ["uncertain"] * 3


# --- saving and loading -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved with a card that leaves model_version and versions to save_model."""
    directory = str(tmp_path_factory.mktemp("saved"))
    model = build_model(ModelConfig(image_size=TINY))
    card = ModelCard(
        ("bread", "dog"), TINY, 0, data_fingerprint="abc123", metrics={"accuracy": 0.5}
    )
    returned = save_model(model, card, directory)
    return directory, model, card, returned


def test_save_model_writes_the_model_and_a_completed_card(saved):
    directory, model, card, returned = saved
    assert sorted(os.listdir(directory)) == [MODEL_FILENAME, CARD_FILENAME]
    data = open(os.path.join(directory, MODEL_FILENAME), "rb").read()
    assert returned.model_version == hashlib.sha256(data).hexdigest()[:12]
    assert returned.parameter_count == model.count_params()
    assert set(returned.versions) == {"dogbread", "tensorflow", "ray"}
    assert returned.class_names == ("bread", "dog")
    assert returned.image_size == TINY
    assert returned.data_fingerprint == "abc123"
    assert returned.metrics == {"accuracy": 0.5}
    on_disk = json.loads(open(os.path.join(directory, CARD_FILENAME)).read())
    assert on_disk["model_version"] == returned.model_version
    assert on_disk["class_names"] == ["bread", "dog"]


def test_save_load_round_trip_gives_the_same_predictions_and_card(saved):
    directory, model, _, returned = saved
    loaded, card = load_model(directory)
    assert card == returned
    assert card.model_version
    assert loaded.count_params() == model.count_params()
    pixels = np.random.default_rng(3).integers(0, 256, (5, TINY, TINY, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        predict_probabilities(loaded, pixels), predict_probabilities(model, pixels), atol=1e-6
    )


def test_load_model_accepts_the_model_file_path_and_finds_its_card(saved):
    directory, _, _, returned = saved
    _, card = load_model(os.path.join(directory, MODEL_FILENAME))
    assert card == returned


def test_save_model_keeps_an_explicit_model_version(tmp_path):
    model = build_model(ModelConfig(image_size=TINY))
    card = ModelCard(("a", "b"), TINY, 0, model_version="v1", versions={"dogbread": "x"})
    returned = save_model(model, card, str(tmp_path))
    assert returned.model_version == "v1"
    assert returned.versions == {"dogbread": "x"}
    assert load_model(str(tmp_path))[1].model_version == "v1"


def test_a_bare_model_file_gets_indexed_class_names(tmp_path):
    model = build_model(ModelConfig(image_size=TINY, num_classes=3))
    path = str(tmp_path / MODEL_FILENAME)
    model.save(path)
    _, card = load_model(path)
    assert card.class_names == ("class_0", "class_1", "class_2")
    assert card.image_size == TINY


def test_load_model_of_a_missing_path_raises_model_error(tmp_path):
    missing = str(tmp_path / "no-such-run")
    with pytest.raises(ModelError, match="no model at") as info:
        load_model(missing)
    assert missing in str(info.value)
    assert "\n" not in str(info.value)


def test_a_lambda_layer_is_refused_by_safe_mode(tmp_path):
    inputs = keras.Input(shape=(4, 4, 3))
    doubled = keras.layers.Lambda(lambda t: t * 2)(inputs)
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(doubled))
    path = str(tmp_path / "lambda.keras")
    keras.Model(inputs, outputs).save(path)
    assert os.path.getsize(path) > 0
    with pytest.raises(ModelError, match="cannot load model") as info:
        load_model(path)
    message = str(info.value)
    assert "Lambda" in message
    assert path in message
    assert "\n" not in message


def test_a_card_whose_image_size_disagrees_raises_model_error(tmp_path):
    model = build_model(ModelConfig(image_size=TINY))
    save_model(model, ModelCard(("bread", "dog"), TINY, 0, versions={"x": "y"}), str(tmp_path))
    card_path = tmp_path / CARD_FILENAME
    card = ModelCard.from_json(card_path.read_text())
    card_path.write_text(dataclasses.replace(card, image_size=64).to_json())
    with pytest.raises(ModelError, match=f"image size 64, the model takes {TINY}"):
        load_model(str(tmp_path))


def test_a_model_saved_with_litert_is_served_without_tensorflow(tmp_path):
    model = build_model(ModelConfig(image_size=TINY, num_classes=3))
    card = save_model(model, ModelCard(("a", "b", "c"), TINY, 0), str(tmp_path), litert=True)
    assert (tmp_path / LITERT_FILENAME).exists()
    keras_bytes = (tmp_path / MODEL_FILENAME).read_bytes()
    assert card.litert_keras_sha256 == hashlib.sha256(keras_bytes).hexdigest()
    served, served_card = load_litert(str(tmp_path))
    assert isinstance(served, LiteRTModel) and served_card == card
    pixels = np.random.default_rng(4).integers(0, 256, (5, TINY, TINY, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        predict_probabilities(served, pixels), predict_probabilities(model, pixels), atol=1e-4
    )
    # What `dogbread label` relies on for its start-up: no TensorFlow in the process.
    probe = (
        "import sys; from dogbread.model import load_litert; "
        f"assert load_litert({str(tmp_path)!r}) is not None; "
        "assert not [m for m in sys.modules if m.startswith(('tensorflow', 'tf_keras'))]"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)


def test_a_litert_file_of_another_model_keras_is_not_served(tmp_path):
    model = build_model(ModelConfig(image_size=TINY))
    save_model(model, ModelCard(("bread", "dog"), TINY, 0), str(tmp_path), litert=True)
    other = build_model(ModelConfig(image_size=TINY))
    other.save(tmp_path / MODEL_FILENAME)  # replaced behind the card's back
    assert load_litert(str(tmp_path)) is None
    # Saving again without litert leaves the old model.tflite, which the new card disowns.
    save_model(model, ModelCard(("bread", "dog"), TINY, 0), str(tmp_path))
    assert (tmp_path / LITERT_FILENAME).exists() and load_litert(str(tmp_path)) is None


def test_model_card_json_ignores_unknown_keys():
    card = ModelCard(("bread", "dog"), 64, 10, metrics={"auc": 0.9})
    raw = json.loads(card.to_json())
    raw["added_in_a_later_version"] = True
    assert ModelCard.from_json(json.dumps(raw)) == card
