"""Pretrained backbones: Keras Applications networks without their top, for users who have
weights (transfer learning). dogbread.model puts a head on one; dogbread.distill keeps it frozen
while the head learns; the training workers load its weights (a file the driver read once)."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

from dogbread.errors import ModelError, first_line

if TYPE_CHECKING:
    import tf_keras as keras

# The Keras Applications constructors of the backbones; each rescales its own 0-255 input.
CONSTRUCTORS = {
    "mobilenet_v3_small": "MobileNetV3Small",
    "efficientnet_v2_b0": "EfficientNetV2B0",
}


def features(x: Any, architecture: str, image_size: int) -> Any:
    """The backbone's pooled features of `x` (0-255 pixels), its weights random (the training
    workers load the pretrained ones: load_weights). It runs in inference mode even while
    fine-tuned, as in Keras's transfer-learning guide: its batch-normalization statistics stay
    those of its pretraining data."""
    return _network(architecture, image_size, weights=None)(x, training=False)


def of(model: keras.Model) -> keras.Model:
    """The pretrained network inside a backbone architecture's model."""
    import tf_keras as keras

    found = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not found:
        raise ModelError(f"{model.name} has no backbone")
    return found[0]


def load_weights(model: keras.Model, weights: bytes, name: str) -> None:
    """Load a backbone's weights file (its bytes; `name` ends as the file did: .h5 or
    .weights.h5) into the model's backbone."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name.rsplit("/", 1)[-1])
        with open(local, "wb") as out:
            out.write(weights)
        try:
            of(model).load_weights(local)
        except (ValueError, OSError) as exc:
            raise ModelError(f"backbone weights {name} do not fit: {first_line(exc)}") from None


def imagenet_weights(architecture: str, image_size: int) -> bytes:
    """The backbone's ImageNet weights as a .weights.h5 file's bytes. Keras downloads them (into
    ~/.keras, checking its own hash): only when a user asks for backbone_weights imagenet."""
    backbone = _network(architecture, image_size, weights="imagenet")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "backbone.weights.h5")
        backbone.save_weights(local)
        return open(local, "rb").read()


def _network(architecture: str, image_size: int, weights: str | None) -> keras.Model:
    import tf_keras as keras

    constructor = getattr(keras.applications, CONSTRUCTORS[architecture])
    return constructor(
        input_shape=(image_size, image_size, 3),
        include_top=False,
        weights=weights,
        pooling="avg",
        include_preprocessing=True,
    )
