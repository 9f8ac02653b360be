"""The CNN, its model card, and the one inference function every path uses.

The default is the seed notebook's network. tf-keras (Keras 2) is used rather than Keras 3 because
Keras 3 under MultiWorkerMirroredStrategy fails (ray-project/ray#47464, keras-team/keras#20585).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

import dogbread
from dogbread import backbone, storage
from dogbread.config import ARCHITECTURES, BACKBONES
from dogbread.errors import ModelError, StorageError, first_line
from dogbread.litert import LiteRTModel, inference_model

if TYPE_CHECKING:  # TensorFlow is imported where a model is built or loaded: see LiteRTModel
    import tf_keras as keras

log = logging.getLogger(__name__)

MODEL_FILENAME = "model.keras"
CARD_FILENAME = "model_card.json"
LITERT_FILENAME = "model.tflite"  # its LiteRT conversion, when save_model was asked for it
INT8_FILENAME = "model.int8.tflite"  # its int8 quantization (dogbread.quantize), beside it
AUGMENTATION_PREFIX = "augment_"  # the augmentation layers' names: dogbread.distill splits there
FINE_TUNE_FACTOR = 0.1
# Dropout draws from a tf.random.Generator (a variable that training reseeds every epoch), not
# from stateful ops inside the traced step, whose state no checkpoint holds: a resumed run then
# draws the masks the uninterrupted run drew. It also gives each worker masks of its own.
RNG_TYPE = "stateful"


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 256
    num_classes: int = 2
    augment: bool = False  # flip, small rotation and zoom; off keeps the seed's behaviour
    learning_rate: float = 1e-3
    architecture: str = "seed"  # or "residual": stronger from scratch (see _residual_features)
    decay_steps: int = 0  # > 0: cosine decay of the learning rate to 0 over that many steps
    # > 0: first the rate rises linearly from warmup_from to learning_rate over these steps
    warmup_steps: int = 0
    warmup_from: float = 0.0
    # > 0: a backbone stays frozen for these steps (dogbread.distill), then the whole network is
    # fine-tuned at FINE_TUNE_FACTOR times the rate (instead of the schedules above)
    freeze_steps: int = 0


@dataclass(frozen=True)
class ModelCard:
    class_names: tuple[str, ...]
    image_size: int
    parameter_count: int
    model_version: str = ""
    data_fingerprint: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    # sha256 of the model.keras that model.tflite was converted from: a model.tflite beside
    # another model.keras (copied over, retrained) is ignored, not served.
    litert_keras_sha256: str = ""
    members: tuple[str, ...] = ()  # an ensemble's: the model_version of each member
    # How it was made: the network (config.ARCHITECTURES), the model_version of the teacher it
    # was distilled from, and the pretrained backbone weights it started from (a path, or
    # "imagenet") with the sha256 of their file.
    architecture: str = ""
    teacher: str = ""
    backbone_weights: str = ""
    backbone_weights_sha256: str = ""
    # Its int8 LiteRT conversion (model.int8.tflite), when one was made: the val accuracy of
    # it and of the float conversion, on how many images, and whether it is served.
    litert_int8: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        raw = json.loads(text)
        raw["class_names"] = tuple(raw["class_names"])
        raw["members"] = tuple(raw.get("members", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def build_model(config: ModelConfig = ModelConfig()) -> keras.Model:
    """The network `config.architecture` names (the seed CNN by default), compiled. Pure: the
    same config gives the same architecture; a backbone's weights are random here."""
    import tf_keras as keras

    if config.num_classes < 2:
        raise ModelError(f"num_classes must be at least 2, got {config.num_classes}")
    if config.architecture not in ARCHITECTURES:
        raise ModelError(f"architecture must be one of {', '.join(ARCHITECTURES)}")
    inputs = keras.Input(shape=(config.image_size, config.image_size, 3), name="image")
    x = inputs
    if config.augment:
        x = keras.layers.RandomFlip("horizontal", name=f"{AUGMENTATION_PREFIX}flip")(x)
        x = keras.layers.RandomRotation(0.05, name=f"{AUGMENTATION_PREFIX}rotation")(x)
        x = keras.layers.RandomZoom(0.1, name=f"{AUGMENTATION_PREFIX}zoom")(x)
    if config.architecture in BACKBONES:
        x = backbone.features(x, config.architecture, config.image_size)
        x = keras.layers.Dropout(0.2, rng_type=RNG_TYPE)(x)
    else:
        # Rescaling lives in the model so that every caller feeds raw uint8 pixels.
        x = keras.layers.Rescaling(1.0 / 255)(x)
        x = _seed_features(x) if config.architecture == "seed" else _residual_features(x)
    if config.num_classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
        loss = "binary_crossentropy"
    else:
        outputs = keras.layers.Dense(config.num_classes, activation="softmax", name="probability")(
            x
        )
        loss = "sparse_categorical_crossentropy"
    model = keras.Model(inputs, outputs, name="dogbread_cnn")
    rate = config.learning_rate
    if config.freeze_steps:  # Keras's own schedules: safe-mode loadable
        rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            [config.freeze_steps], [rate, rate * FINE_TUNE_FACTOR]
        )
    elif config.decay_steps or config.warmup_steps:
        rate = keras.optimizers.schedules.CosineDecay(
            config.warmup_from if config.warmup_steps else rate,
            max(config.decay_steps, 1),
            alpha=0.0 if config.decay_steps else 1.0,  # 1.0: constant once warmed up
            warmup_target=rate if config.warmup_steps else None,
            warmup_steps=config.warmup_steps,
        )
    # Weighted: an image found unreadable only when decoded trains with weight 0 (train_data),
    # and is then left out of the accuracy as it is of the loss.
    optimizer = keras.optimizers.Adam(rate)
    model.compile(optimizer=optimizer, loss=loss, weighted_metrics=["accuracy"])
    return model


def _seed_features(x: Any) -> Any:
    """The seed notebook's network up to its output layer."""
    import tf_keras as keras

    regularizer = keras.regularizers.L2(0.01)
    for filters in (16, 32, 16):
        x = keras.layers.Conv2D(filters, 3, activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(
        256, activation="relu", kernel_regularizer=regularizer, bias_regularizer=regularizer
    )(x)
    return keras.layers.Dropout(0.25, rng_type=RNG_TYPE)(x)


def _residual_features(x: Any) -> Any:
    """keras-io's "image classification from scratch" network, narrower (0.18 M parameters):
    a strided stem, three residual blocks of separable convolutions with batch normalization,
    global average pooling. The seed plateaus near 0.89 on real photos; this learns further."""
    import tf_keras as keras

    layers = keras.layers
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.Activation("relu")(layers.BatchNormalization()(x))
    previous = x
    for filters in (64, 128, 256):
        for _ in range(2):
            x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.Activation("relu")(layers.BatchNormalization()(x))
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        shortcut = layers.Conv2D(filters, 1, strides=2, padding="same")(previous)
        x = previous = layers.add([x, shortcut])
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dropout(0.3, rng_type=RNG_TYPE)(x)


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """(n, num_classes) probabilities from the model's raw outputs (sigmoid or softmax head)."""
    outputs = np.asarray(outputs, dtype=np.float32)
    if outputs.shape[-1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=-1)
    return outputs


def predict_probabilities(model: keras.Model | LiteRTModel, images: np.ndarray) -> np.ndarray:
    """Probabilities for a uint8 batch (n, size, size, 3). Predict, label and evaluate call this.

    A Keras model runs as what `inference_model` makes of it: its LiteRT conversion when that
    reproduces Keras, else itself. So the model and its inference_model give the same scores.
    """
    if len(images) == 0:
        return np.zeros((0, max(2, model.output_shape[-1])), np.float32)
    runner = model if isinstance(model, LiteRTModel) else inference_model(model)
    if isinstance(runner, LiteRTModel):
        return class_probabilities(runner(images))
    # A direct call on a fixed-size batch avoids model.predict's per-call setup cost.
    return class_probabilities(runner(images, training=False).numpy())


def versions() -> dict[str, str]:
    import ray
    import tensorflow as tf

    return {"dogbread": dogbread.__version__, "tensorflow": tf.__version__, "ray": ray.__version__}


def save_model(
    model: keras.Model,
    card: ModelCard,
    directory: str,
    s3_endpoint: str | None = None,
    litert: bool = False,
    int8: LiteRTModel | None = None,
    int8_card: dict[str, Any] | None = None,
) -> ModelCard:
    """Write model.keras and model_card.json into `directory` (local or s3://).

    With `litert`, also model.tflite when the conversion reproduces Keras (inference_model):
    `dogbread label` then starts without TensorFlow in its driver (see load_litert). With it, an
    `int8` quantization goes to model.int8.tflite and `int8_card` (its accuracy, and whether it
    is served: dogbread.quantize.int8_conversion) to the card's litert_int8. Not without
    model.tflite: the card's litert_keras_sha256 is what ties both to this model.keras.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, MODEL_FILENAME)
        model.save(local)
        data = open(local, "rb").read()
    sha256 = hashlib.sha256(data).hexdigest()
    card = dataclasses.replace(
        card,
        parameter_count=model.count_params(),
        model_version=card.model_version or sha256[:12],
        versions=card.versions or versions(),
        litert_keras_sha256="",
        litert_int8={},
    )
    converted = inference_model(model) if litert else None
    if isinstance(converted, LiteRTModel):
        storage.write_bytes(
            storage.join(directory, LITERT_FILENAME), converted.flatbuffer, s3_endpoint
        )
        card = dataclasses.replace(card, litert_keras_sha256=sha256)
        if int8 is not None:
            storage.write_bytes(
                storage.join(directory, INT8_FILENAME), int8.flatbuffer, s3_endpoint
            )
            card = dataclasses.replace(card, litert_int8=dict(int8_card or {}))
    storage.write_bytes(storage.join(directory, MODEL_FILENAME), data, s3_endpoint)
    storage.write_text(storage.join(directory, CARD_FILENAME), card.to_json(), s3_endpoint)
    return card


def model_paths(uri: str) -> tuple[str, str]:
    """(the model's directory, its model.keras) for a model dir or a model.keras path."""
    if not uri.endswith(".keras"):
        return uri, storage.join(uri, MODEL_FILENAME)
    return (uri.rsplit("/", 1)[0] if "/" in uri else "."), uri


def load_model(uri: str, s3_endpoint: str | None = None) -> tuple[keras.Model, ModelCard]:
    """Load a model dir (or its model.keras) in Keras safe mode, with its model card."""
    data, card = read_model(uri, s3_endpoint)
    model = model_from_bytes(data, uri)
    if card is None:  # a bare model file: name the classes by index
        n = max(2, model.output_shape[-1])
        card = ModelCard(tuple(f"class_{i}" for i in range(n)), model.input_shape[1], 0)
    _check_image_size(card, model.input_shape[1])
    return model, card


def read_model(uri: str, s3_endpoint: str | None = None) -> tuple[bytes, ModelCard | None]:
    """The bytes of a model dir's model.keras (or of a model.keras path), and its card if any.
    Needs no TensorFlow: a wrong path fails before it loads."""
    directory, model_uri = model_paths(uri)
    try:
        data = storage.read_bytes(*storage.resolve(model_uri, s3_endpoint))
    except OSError:
        raise ModelError(f"no model at {uri} (expected a run dir with {MODEL_FILENAME})") from None
    card_uri = storage.join(directory, CARD_FILENAME)
    if not storage.exists(card_uri, s3_endpoint):
        return data, None
    return data, ModelCard.from_json(storage.read_text(card_uri, s3_endpoint))


def model_from_bytes(data: bytes, uri: str) -> keras.Model:
    """A model.keras file's bytes loaded in Keras safe mode; `uri` names it in errors."""
    import tf_keras as keras

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, MODEL_FILENAME)
        with open(local, "wb") as out:
            out.write(data)
        try:
            # safe_mode refuses models that carry arbitrary code (Lambda layers).
            return keras.models.load_model(local, safe_mode=True)
        except Exception as exc:  # Keras raises many types for a bad file
            raise ModelError(f"cannot load model {uri}: {first_line(exc)}") from None


def load_litert(uri: str, s3_endpoint: str | None = None) -> tuple[LiteRTModel, ModelCard] | None:
    """The model.tflite that save_model(litert=True) wrote beside this very model.keras, with the
    card; None when there is none (or it is of another model.keras). Needs no TensorFlow.
    Its model.int8.tflite instead, when the card says that is served (it was as accurate).

    Safe as Keras safe mode is: the flatbuffer holds operators, not Python code.
    """
    from ai_edge_litert.interpreter import Interpreter

    directory, model_uri = model_paths(uri)
    try:
        card_uri = storage.join(directory, CARD_FILENAME)
        card = ModelCard.from_json(storage.read_text(card_uri, s3_endpoint))
        if not card.litert_keras_sha256:
            return None
        keras_bytes = storage.read_bytes(*storage.resolve(model_uri, s3_endpoint))
        if hashlib.sha256(keras_bytes).hexdigest() != card.litert_keras_sha256:
            log.info("%s is not of this %s: not used", LITERT_FILENAME, MODEL_FILENAME)
            return None
        litert_uri = storage.join(directory, _served_litert(directory, card, s3_endpoint))
        flatbuffer = storage.read_bytes(*storage.resolve(litert_uri, s3_endpoint))
        details = Interpreter(model_content=flatbuffer)
        (image,), (output,) = details.get_input_details(), details.get_output_details()
    except (OSError, StorageError, ValueError, TypeError, KeyError):  # then Keras is loaded
        return None
    _check_image_size(card, int(image["shape_signature"][1]))
    return LiteRTModel(flatbuffer, (None, int(output["shape_signature"][-1]))), card


def _served_litert(directory: str, card: ModelCard, s3_endpoint: str | None) -> str:
    """The file name of the LiteRT model to serve: the int8 one when its card says so."""
    int8 = card.litert_int8
    if int8.get("served"):
        if storage.exists(storage.join(directory, INT8_FILENAME), s3_endpoint):
            log.info(
                "inference runs in %s: val accuracy %s, the float one's %s (%s images)",
                INT8_FILENAME,
                int8.get("int8_val_accuracy"),
                int8.get("float_val_accuracy"),
                int8.get("val_images"),
            )
            return INT8_FILENAME
        log.warning("%s is missing: %s serves instead", INT8_FILENAME, LITERT_FILENAME)
    log.info("inference runs in %s", LITERT_FILENAME)
    return LITERT_FILENAME


def _check_image_size(card: ModelCard, size: int) -> None:
    if card.image_size != size:
        raise ModelError(f"model card says image size {card.image_size}, the model takes {size}")


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
