"""`dogbread predict`: classify a few images and print one line each, in the seed's spirit.

A run dir that holds the model's LiteRT conversion (`dogbread train` saves it) is predicted
through LiteRT, without importing TensorFlow: an answer in about a second, not five."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from dogbread import storage
from dogbread.errors import first_line
from dogbread.images import ImageDecodeError, decode_image
from dogbread.model import label_predictions, load_litert, load_model, predict_probabilities


def run(
    model_uri: str,
    image_uris: Sequence[str],
    as_json: bool = False,
    s3_endpoint: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print a line per image ("98.98% bread  path"); 1 if any image failed, else 0."""
    model, card = load_litert(model_uri, s3_endpoint) or load_model(model_uri, s3_endpoint)
    failed = 0
    for uri in image_uris:
        try:
            fs, path = storage.resolve(uri, s3_endpoint)
            image = decode_image(storage.read_bytes(fs, path), card.image_size)
        except (ImageDecodeError, OSError) as exc:
            failed += 1
            error = first_line(exc)
            row = {"path": uri, "label": None, "score": None, "probabilities": None, "error": error}
            print(json.dumps(row) if as_json else f"error   {uri}  ({error})", file=out, flush=True)
            continue
        probabilities = predict_probabilities(model, image[np.newaxis])
        (label,), (score,) = label_predictions(probabilities, card.class_names)
        if as_json:
            probs = dict(
                zip(card.class_names, (round(float(p), 6) for p in probabilities[0]), strict=True)
            )
            row = {"path": uri, "label": label, "score": round(float(score), 6), "error": None}
            print(json.dumps({**row, "probabilities": probs}), file=out, flush=True)
        else:
            print(f"{score * 100:.2f}% {label}  {uri}", file=out, flush=True)
    return 1 if failed else 0
