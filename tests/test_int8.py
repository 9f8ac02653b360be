"""Tests for int8 LiteRT inference: the quantization, the accuracy check that decides whether it
serves, and save_model/load_litert serving it (real TensorFlow and LiteRT, synthetic images)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow as pa
import pytest
import tf_keras as keras
from PIL import Image

from dogbread.litert import LiteRTModel, inference_model, quantize_int8
from dogbread.model import (
    CARD_FILENAME,
    INT8_FILENAME,
    LITERT_FILENAME,
    MODEL_FILENAME,
    ModelCard,
    ModelConfig,
    build_model,
    load_litert,
    predict_probabilities,
    save_model,
)
from dogbread.quantize import INT8_MAX_ACCURACY_DROP, int8_conversion, sample_batches
from dogbread.synth import draw_image

# Each test trains the seed CNN (a few seconds, once per module) or starts Ray.
pytestmark = pytest.mark.slow

SIZE = 64


def synthetic_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` drawings of bread (0) and dogs (1), alternating, at SIZE x SIZE."""
    images, labels = [], []
    for i in range(count):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        image = draw_image(i % 2, rng).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        images.append(np.asarray(image, np.uint8))
        labels.append(i % 2)
    return np.stack(images), np.asarray(labels)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    train, train_labels = synthetic_images(240, seed=1)
    val, val_labels = synthetic_images(100, seed=2)
    return {"train": train, "train_labels": train_labels, "val": val, "val_labels": val_labels}


@pytest.fixture(scope="module")
def trained(data) -> keras.Model:
    """The seed CNN trained a little: outputs spread over [0, 1], not all near 0.5."""
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(image_size=SIZE))
    model.fit(data["train"], data["train_labels"], epochs=6, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def int8(trained, data) -> LiteRTModel:
    quantized = quantize_int8(trained, data["train"][:100])
    assert quantized is not None
    return quantized


def accuracy(model: keras.Model | LiteRTModel, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predict_probabilities(model, images).argmax(axis=1) == labels))


# --- the quantization ---------------------------------------------------------------------------


def test_int8_outputs_are_close_to_keras_with_uint8_in_and_float_out(trained, int8, data):
    expected = predict_probabilities(trained, data["val"])
    assert expected.min() < 0.2 and expected.max() > 0.8  # trained: a real spread to reproduce
    outputs = int8(data["val"])
    assert outputs.dtype == np.float32 and outputs.shape == (len(data["val"]), 1)
    got = predict_probabilities(int8, data["val"])
    assert np.max(np.abs(got - expected)) < 0.1
    # Not the float conversion again: int8 values come in steps of its output scale.
    assert 0 < np.max(np.abs(got - expected))
    assert np.mean(got.argmax(axis=1) == expected.argmax(axis=1)) >= 0.95


def test_int8_pickles_as_its_flatbuffer_and_is_smaller_than_float(trained, int8, data):
    import pickle

    float_model = inference_model(trained)
    assert isinstance(float_model, LiteRTModel)
    assert len(int8.flatbuffer) < len(float_model.flatbuffer) / 3  # int8 weights: ~1/4
    copy = pickle.loads(pickle.dumps(int8))
    np.testing.assert_array_equal(copy(data["val"][:8]), int8(data["val"][:8]))


def test_a_residual_network_with_softmax_quantizes_too(data):
    # Its int8 softmax runs outside XNNPACK (which has none), the convolutions inside.
    model = build_model(ModelConfig(image_size=SIZE, architecture="residual", num_classes=3))
    quantized = quantize_int8(model, data["train"][:20])
    assert quantized is not None
    got = predict_probabilities(quantized, data["val"][:16])
    assert got.shape == (16, 3)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=0.02)
    assert np.max(np.abs(got - predict_probabilities(model, data["val"][:16]))) < 0.1


def test_a_model_that_xnnpack_does_not_run_is_refused(int8, data):
    # The same flatbuffer in LiteRT's own kernels: at half the float model's speed in XNNPACK.
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from dogbread.litert import _check_xnnpack

    _check_xnnpack(int8)  # as quantize_int8 made it: XNNPACK runs it
    plain = LiteRTModel(int8.flatbuffer, int8.output_shape)
    plain._interpreter = Interpreter(
        model_content=int8.flatbuffer,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    np.testing.assert_allclose(plain(data["val"][:4]), int8(data["val"][:4]), atol=1 / 256)
    with pytest.raises(ValueError, match="XNNPACK leaves out CONV_2D, FULLY_CONNECTED"):
        _check_xnnpack(plain)


def test_no_calibration_images_gives_none_with_a_warning(trained, caplog):
    with caplog.at_level(logging.WARNING, logger="dogbread.litert"):
        assert quantize_int8(trained, np.zeros((0, SIZE, SIZE, 3), np.uint8)) is None
    assert "no calibration images" in caplog.text


# --- the accuracy check -------------------------------------------------------------------------


def test_int8_conversion_card_holds_both_val_accuracies(trained, data):
    model, card = int8_conversion(trained, data["train"][:100], [(data["val"], data["val_labels"])])
    assert isinstance(model, LiteRTModel)
    float_accuracy = accuracy(trained, data["val"], data["val_labels"])
    int8_accuracy = accuracy(model, data["val"], data["val_labels"])
    assert card == {
        "float_val_accuracy": pytest.approx(float_accuracy),
        "int8_val_accuracy": pytest.approx(int8_accuracy),
        "val_images": 100,
        "served": int8_accuracy >= float_accuracy - INT8_MAX_ACCURACY_DROP,
    }
    assert float_accuracy > 0.7  # it learned something: the comparison means something


def float_boundary(model: keras.Model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two blends of a bread and a dog that differ by one step of the mix, on either side of the
    float model's decision. Training on CPU is not bit-exact from run to run, so a fixed pool may
    hold no image that int8 answers differently; int8's output moves in steps of 1/256, so its
    decision is all but never flipped by the same step as float's, and one of the two differs."""
    answers = predict_probabilities(model, images).argmax(axis=1)
    bread, dog = (images[np.flatnonzero(answers == c)[0]].astype(np.float32) for c in (0, 1))

    def blend(mix: float) -> np.ndarray:
        return np.rint(bread + mix * (dog - bread)).astype(np.uint8)[None]

    low, high = 0.0, 1.0  # float says bread at low, dog at high
    while high - low > 1e-6:
        middle = (low + high) / 2
        if predict_probabilities(model, blend(middle)).argmax() == 1:
            high = middle
        else:
            low = middle
    return blend(low), blend(high)


def test_int8_is_not_served_when_it_gets_one_image_of_ten_wrong_that_float_gets_right(
    trained, int8, data
):
    # Labels taken from the float conversion's own answers, on images where int8 answers the
    # same, plus one where it does not: float is right on all, int8 on 9 of 10.
    pool, _ = synthetic_images(400, seed=3)
    pool = np.concatenate([data["val"], pool, *float_boundary(trained, data["val"])])
    float_answer = predict_probabilities(trained, pool).argmax(axis=1)
    int8_answer = predict_probabilities(int8, pool).argmax(axis=1)
    differ = np.flatnonzero(float_answer != int8_answer)
    agree = np.flatnonzero(float_answer == int8_answer)
    assert len(differ) >= 1, "no image on which int8 and float disagree: pick another pool"
    chosen = np.concatenate([agree[:9], differ[:1]])
    _, card = int8_conversion(trained, data["train"][:100], [(pool[chosen], float_answer[chosen])])
    assert card["float_val_accuracy"] == 1.0 and card["int8_val_accuracy"] == 0.9
    assert card["served"] is False
    # The same minus that image: as accurate, so served.
    _, card = int8_conversion(trained, data["train"][:100], [(pool[agree], float_answer[agree])])
    assert card["int8_val_accuracy"] == card["float_val_accuracy"] == 1.0
    assert card["served"] is True and card["val_images"] == len(agree)


def test_no_val_images_means_not_served(trained, data):
    model, card = int8_conversion(trained, data["train"][:20], [])
    assert isinstance(model, LiteRTModel)
    assert card == {
        "float_val_accuracy": None,
        "int8_val_accuracy": None,
        "val_images": 0,
        "served": False,
    }


# --- saving and serving -------------------------------------------------------------------------

CARD = ModelCard(("bread", "dog"), SIZE, 0)
SERVED = {"float_val_accuracy": 0.9, "int8_val_accuracy": 0.9, "val_images": 100, "served": True}


def test_a_served_int8_model_is_what_load_litert_gives(tmp_path, trained, int8, data, caplog):
    card = save_model(trained, CARD, str(tmp_path), litert=True, int8=int8, int8_card=SERVED)
    assert card.litert_int8 == SERVED
    assert (tmp_path / INT8_FILENAME).read_bytes() == int8.flatbuffer
    assert (tmp_path / LITERT_FILENAME).exists()
    with caplog.at_level(logging.INFO, logger="dogbread.model"):
        served, served_card = load_litert(str(tmp_path))
    assert served.flatbuffer == int8.flatbuffer and served_card == card
    assert f"inference runs in {INT8_FILENAME}" in caplog.text
    np.testing.assert_array_equal(served(data["val"][:8]), int8(data["val"][:8]))


def test_an_int8_model_not_served_leaves_the_float_one_in_charge(tmp_path, trained, int8):
    save_model(trained, CARD, str(tmp_path), litert=True, int8=int8, int8_card=SERVED)
    card_path = tmp_path / CARD_FILENAME
    card = ModelCard.from_json(card_path.read_text())
    card_path.write_text(
        dataclasses.replace(card, litert_int8={**SERVED, "served": False}).to_json()
    )
    served, _ = load_litert(str(tmp_path))
    assert served.flatbuffer == (tmp_path / LITERT_FILENAME).read_bytes() != int8.flatbuffer
    # Served by the card, but the file is gone: the float one, not Keras.
    card_path.write_text(card.to_json())
    (tmp_path / INT8_FILENAME).unlink()
    served, _ = load_litert(str(tmp_path))
    assert served.flatbuffer == (tmp_path / LITERT_FILENAME).read_bytes()


def test_an_int8_model_beside_another_model_keras_is_not_used(tmp_path, trained, int8):
    save_model(trained, CARD, str(tmp_path), litert=True, int8=int8, int8_card=SERVED)
    keras.utils.set_random_seed(1)
    build_model(ModelConfig(image_size=SIZE)).save(tmp_path / MODEL_FILENAME)  # behind its back
    assert (tmp_path / INT8_FILENAME).exists() and load_litert(str(tmp_path)) is None
    # Saved again without int8: the old file stays, the new card does not serve it.
    card = save_model(trained, CARD, str(tmp_path), litert=True)
    assert card.litert_int8 == {}
    served, _ = load_litert(str(tmp_path))
    assert served.flatbuffer == (tmp_path / LITERT_FILENAME).read_bytes() != int8.flatbuffer


def test_int8_is_written_only_with_the_float_conversion(tmp_path, trained, int8):
    card = save_model(trained, CARD, str(tmp_path), int8=int8, int8_card=SERVED)
    assert not (tmp_path / INT8_FILENAME).exists() and not (tmp_path / LITERT_FILENAME).exists()
    assert card.litert_int8 == {} and card.litert_keras_sha256 == ""


# --- sampling a split ---------------------------------------------------------------------------


def test_sample_batches_spread_over_the_split_and_leave_out_unreadable_files(tmp_path, ray_local):
    from dogbread.synth import write_synthetic_tree

    write_synthetic_tree(tmp_path, per_class=6, seed=4)
    paths = sorted(str(p) for p in tmp_path.rglob("*.jpg"))  # bread's six, then dog's
    (tmp_path / "dog" / "dog_00005.jpg").write_bytes(b"not a jpeg")
    table = pa.table({"path": paths, "label": [p.split("/")[-2] for p in paths]})

    def sampled(table: pa.Table, **limit: int) -> tuple[np.ndarray, np.ndarray]:
        batches = list(sample_batches(table, ("bread", "dog"), 32, **limit))
        if not batches:
            return np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64)
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    images, labels = sampled(table, limit=4)
    # Rows 0, 3, 6 and 9 of 12: both classes, though the first four are all bread.
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert sorted(labels.tolist()) == [0, 0, 1, 1]
    assert images.std() > 0  # decoded pixels, not the zeros it was allocated with
    images, labels = sampled(table, limit=100)
    assert len(images) == len(labels) == 11  # all but the broken one
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 5
    images, labels = sampled(table.slice(0, 0))
    assert images.shape == (0, 32, 32, 3) and labels.shape == (0,)
