"""`dogbread ensemble`: one model that averages the class probabilities of several trained runs.

Runs of one recipe differ by a point or more of accuracy on a few hundred photos (random
initialization, data order); the mean of their probabilities errs less than a typical member
(bench/README.md). The result is an ordinary model dir, so label, predict and evaluate take it as
they take a run: model.keras (each member a sub-model, then an Average layer: it loads in safe
mode), model.tflite, model_card.json (the members' model versions) and config.yaml. Inference
costs the members' summed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dogbread import storage
from dogbread.config import CONFIG_FILENAME, EnsembleConfig, dump_config
from dogbread.errors import ModelError
from dogbread.model import MODEL_FILENAME, ModelCard, load_model, save_model

if TYPE_CHECKING:
    import tf_keras as keras

log = logging.getLogger(__name__)


def average_models(members: Sequence[keras.Model]) -> keras.Model:
    """A model whose output is the mean of the members' outputs. Pure: the members are shared,
    not changed. They must take the same input and give the same output shape."""
    import tf_keras as keras

    shapes = {(tuple(m.input_shape[1:]), tuple(m.output_shape[1:])) for m in members}
    if len(shapes) != 1:
        raise ModelError(f"members differ in input or output shape: {sorted(shapes)}")
    inputs = keras.Input(shape=members[0].input_shape[1:], name="image")
    # Each member is wrapped in a model of its own name: loaded runs all call theirs dogbread_cnn.
    outputs = [
        keras.Model(m.inputs, m.outputs, name=f"member_{i}")(inputs) for i, m in enumerate(members)
    ]
    averaged = keras.layers.Average(name="probability")(outputs)
    return keras.Model(inputs, averaged, name="dogbread_ensemble")


def run(config: EnsembleConfig) -> ModelCard:
    """Load the members, check they agree on classes and image size, write the ensemble."""
    endpoint = config.s3_endpoint
    if storage.exists(storage.join(config.out, MODEL_FILENAME), endpoint):
        raise ModelError(f"{config.out} already holds a model; choose another --out")
    loaded = [load_model(uri, endpoint) for uri in config.members]
    cards = [card for _, card in loaded]
    first, first_uri = cards[0], config.members[0]
    for uri, card in zip(config.members, cards, strict=True):
        if card.class_names != first.class_names:
            raise ModelError(
                f"{uri} has classes {', '.join(card.class_names)}, "
                f"{first_uri} has {', '.join(first.class_names)}"
            )
        if card.image_size != first.image_size:
            raise ModelError(
                f"{uri} takes {card.image_size} px images, {first_uri} {first.image_size} px"
            )
    versions = [card.model_version for card in cards]
    repeated = sorted({v for v in versions if v and versions.count(v) > 1})
    if repeated:
        raise ModelError(f"the same model is a member twice (model version {repeated[0]})")
    storage.check_writable(config.out, endpoint)
    model = average_models([m for m, _ in loaded])
    card = ModelCard(
        class_names=first.class_names,
        image_size=first.image_size,
        parameter_count=model.count_params(),
        # The members' training data, when it was the same for all of them.
        data_fingerprint=first.data_fingerprint
        if all(c.data_fingerprint == first.data_fingerprint for c in cards)
        else "",
        members=tuple(versions),
        architecture="ensemble",  # of the members' architectures: their cards say which
    )
    card = save_model(model, card, config.out, endpoint, litert=True)
    storage.write_text(storage.join(config.out, CONFIG_FILENAME), dump_config(config), endpoint)
    log.info("ensemble of %d written to %s (model %s)", len(loaded), config.out, card.model_version)
    print(f"model written to {storage.join(config.out, MODEL_FILENAME)}: the mean of {len(loaded)}")
    return card
