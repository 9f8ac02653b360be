"""The CNN, its model card, and the one inference function every path uses.

The default is the seed notebook's network. tf-keras (Keras 2) is used rather than Keras 3 because
Keras 3 under MultiWorkerMirroredStrategy fails (ray-project/ray#47464, keras-team/keras#20585).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tf_keras as keras

import dogbread
from dogbread import storage
from dogbread.errors import ModelError

MODEL_FILENAME = "model.keras"
CARD_FILENAME = "model_card.json"


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 256
    num_classes: int = 2
    augment: bool = False  # flip, small rotation and zoom; off keeps the seed's behaviour
    learning_rate: float = 1e-3


@dataclass(frozen=True)
class ModelCard:
    class_names: tuple[str, ...]
    image_size: int
    parameter_count: int
    model_version: str = ""
    data_fingerprint: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        raw = json.loads(text)
        raw["class_names"] = tuple(raw["class_names"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def build_model(config: ModelConfig = ModelConfig()) -> keras.Model:
    """The seed CNN, compiled. Pure: the same config gives the same architecture."""
    if config.num_classes < 2:
        raise ModelError(f"num_classes must be at least 2, got {config.num_classes}")
    regularizer = keras.regularizers.L2(0.01)
    inputs = keras.Input(shape=(config.image_size, config.image_size, 3), name="image")
    x = inputs
    if config.augment:
        x = keras.layers.RandomFlip("horizontal")(x)
        x = keras.layers.RandomRotation(0.05)(x)
        x = keras.layers.RandomZoom(0.1)(x)
    # Rescaling lives in the model so that every caller feeds raw uint8 pixels.
    x = keras.layers.Rescaling(1.0 / 255)(x)
    for filters in (16, 32, 16):
        x = keras.layers.Conv2D(filters, 3, activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(
        256, activation="relu", kernel_regularizer=regularizer, bias_regularizer=regularizer
    )(x)
    x = keras.layers.Dropout(0.25)(x)
    if config.num_classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
        loss = "binary_crossentropy"
    else:
        outputs = keras.layers.Dense(config.num_classes, activation="softmax", name="probability")(
            x
        )
        loss = "sparse_categorical_crossentropy"
    model = keras.Model(inputs, outputs, name="dogbread_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate), loss=loss, metrics=["accuracy"]
    )
    return model


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """(n, num_classes) probabilities from the model's raw outputs (sigmoid or softmax head)."""
    outputs = np.asarray(outputs, dtype=np.float32)
    if outputs.shape[-1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=-1)
    return outputs


def predict_probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Probabilities for a uint8 batch (n, size, size, 3). Predict and label both call this."""
    if len(images) == 0:
        return np.zeros((0, max(2, model.output_shape[-1])), np.float32)
    # A direct call on a fixed-size batch avoids model.predict's per-call setup cost.
    return class_probabilities(model(images, training=False).numpy())


def versions() -> dict[str, str]:
    import ray
    import tensorflow as tf

    return {"dogbread": dogbread.__version__, "tensorflow": tf.__version__, "ray": ray.__version__}


def save_model(
    model: keras.Model, card: ModelCard, directory: str, s3_endpoint: str | None = None
) -> ModelCard:
    """Write model.keras and model_card.json into `directory` (local or s3://)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, MODEL_FILENAME)
        model.save(local)
        data = open(local, "rb").read()
    card = dataclasses.replace(
        card,
        parameter_count=model.count_params(),
        model_version=card.model_version or hashlib.sha256(data).hexdigest()[:12],
        versions=card.versions or versions(),
    )
    storage.write_bytes(storage.join(directory, MODEL_FILENAME), data, s3_endpoint)
    storage.write_text(storage.join(directory, CARD_FILENAME), card.to_json(), s3_endpoint)
    return card


def load_model(uri: str, s3_endpoint: str | None = None) -> tuple[keras.Model, ModelCard]:
    """Load a model dir (or its model.keras) in Keras safe mode, with its model card."""
    directory = uri if not uri.endswith(".keras") else uri.rsplit("/", 1)[0] if "/" in uri else "."
    model_uri = uri if uri.endswith(".keras") else storage.join(uri, MODEL_FILENAME)
    try:
        fs, path = storage.resolve(model_uri, s3_endpoint)
        data = storage.read_bytes(fs, path)
    except OSError:
        raise ModelError(f"no model at {uri} (expected a run dir with {MODEL_FILENAME})") from None
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, MODEL_FILENAME)
        with open(local, "wb") as out:
            out.write(data)
        try:
            # safe_mode refuses models that carry arbitrary code (Lambda layers).
            model = keras.models.load_model(local, safe_mode=True)
        except Exception as exc:  # Keras raises many types for a bad file
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"cannot load model {uri}: {line}") from None
    card_uri = storage.join(directory, CARD_FILENAME)
    if storage.exists(card_uri, s3_endpoint):
        card = ModelCard.from_json(storage.read_text(card_uri, s3_endpoint))
    else:  # a bare model file: name the classes by index
        n = max(2, model.output_shape[-1])
        card = ModelCard(tuple(f"class_{i}" for i in range(n)), model.input_shape[1], 0)
    size = model.input_shape[1]
    if card.image_size != size:
        raise ModelError(f"model card says image size {card.image_size}, the model takes {size}")
    return model, card


def label_predictions(
    probabilities: np.ndarray, class_names: tuple[str, ...], threshold: float | None = None
) -> tuple[list[str], np.ndarray]:
    """(label per row, score per row): the most probable class, "uncertain" below `threshold`."""
    best = np.argmax(probabilities, axis=1)
    scores = probabilities[np.arange(len(best)), best].astype(np.float32)
    labels = [class_names[i] for i in best]
    if threshold is not None:
        labels = [
            lab if s >= threshold else "uncertain" for lab, s in zip(labels, scores, strict=True)
        ]
    return labels, scores
