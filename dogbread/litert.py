"""LiteRT inference: a Keras model converted to a flatbuffer that XNNPACK runs on the CPU.

On a CPU the seed CNN runs about 2x faster in LiteRT's XNNPACK kernels than in TensorFlow, and
the model is most of the cost of labeling (bench/README.md). A conversion is served only where
it reproduces Keras on a check batch; otherwise Keras stays in charge.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from dogbread.errors import first_line

if TYPE_CHECKING:  # TensorFlow is imported where a model is converted: see LiteRTModel
    import tf_keras as keras

log = logging.getLogger(__name__)

LITERT_TOLERANCE = 1e-4  # the largest |LiteRT - Keras| output on the check batch LiteRT may have
LITERT_CHUNK = 32  # images per interpreter call: 128 at 256x256 would need a ~0.5 GB arena


class LiteRTModel:
    """A model converted to a LiteRT flatbuffer, run by XNNPACK on `threads` threads.

    It pickles as the flatbuffer, so a process that unpickles it needs ai-edge-litert but not
    TensorFlow (seconds and ~0.5 GB less per label actor); the interpreter is made on first use.
    """

    def __init__(
        self, flatbuffer: bytes, output_shape: tuple[int | None, ...], threads: int | None = None
    ) -> None:
        self.flatbuffer, self.output_shape, self.threads = flatbuffer, output_shape, threads
        self._interpreter: Any = None
        self._shape: tuple[int, ...] = ()
        self._lock = threading.Lock()  # an interpreter is not thread-safe; Keras models are

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("flatbuffer", "output_shape", "threads")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def with_threads(self, threads: int) -> LiteRTModel:
        return LiteRTModel(self.flatbuffer, self.output_shape, threads)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """The model's raw outputs for a uint8 batch."""
        outputs = []
        with self._lock:
            if self._interpreter is None:
                from ai_edge_litert.interpreter import Interpreter

                threads = self.threads or len(os.sched_getaffinity(0))
                self._interpreter = Interpreter(model_content=self.flatbuffer, num_threads=threads)
            interpreter = self._interpreter
            (tensor_in,), (tensor_out,) = (
                interpreter.get_input_details(),
                interpreter.get_output_details(),
            )
            for start in range(0, len(images), LITERT_CHUNK):
                chunk = np.ascontiguousarray(images[start : start + LITERT_CHUNK], np.uint8)
                if chunk.shape != self._shape:  # the arena is planned again only on a new size
                    interpreter.resize_tensor_input(tensor_in["index"], chunk.shape)
                    interpreter.allocate_tensors()
                    self._shape = chunk.shape
                interpreter.set_tensor(tensor_in["index"], chunk)
                interpreter.invoke()
                outputs.append(interpreter.get_tensor(tensor_out["index"]))  # a copy
        return np.concatenate(outputs)


# What inference_model made of each model object. The key holds the output layer's weights: a
# model trained further after a first prediction is converted again rather than served stale.
_inference_models: weakref.WeakKeyDictionary[keras.Model, tuple[bytes, Any]] = (
    weakref.WeakKeyDictionary()
)
_inference_lock = threading.Lock()


def inference_model(model: keras.Model) -> keras.Model | LiteRTModel:
    """The model's LiteRT conversion if it reproduces Keras on a check batch, else the model.

    Made once per model object (converting takes seconds); a failure or a mismatch is logged with
    its reason and leaves Keras in charge.
    """
    key = b"".join(w.tobytes() for w in model.layers[-1].get_weights())
    with _inference_lock:
        cached = _inference_models.get(model)
        if cached is None or cached[0] != key:
            cached = key, _convert(model) or model
            _inference_models[model] = cached
    return cached[1]


def _convert(model: keras.Model) -> LiteRTModel | None:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        log.info("inference runs in Keras: TensorFlow on a GPU beats LiteRT on the CPU")
        return None
    try:
        # Converted with uint8 input, cast inside the graph (exactly, as Keras casts): ~6% faster
        # than feeding float32, and a quarter of the bytes per call.
        signature = tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8)
        function = tf.function(
            lambda images: model(tf.cast(images, tf.float32), training=False),
            input_signature=[signature],
        )
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [function.get_concrete_function()], model
        )
        tf_log = logging.getLogger("tensorflow")
        level = tf_log.level
        tf_log.setLevel(logging.WARNING)  # not "Assets written to /tmp/...": its scratch copy
        try:
            flatbuffer = converter.convert()
        finally:
            tf_log.setLevel(level)
        converted = LiteRTModel(flatbuffer, tuple(model.output_shape))
        # Fixed pixels, so that every process takes the same decision for the same model: noise,
        # and blocks of flat colour, closer to photos.
        rng = np.random.default_rng(0)
        height, width = model.input_shape[1:3]
        noise = rng.integers(0, 256, (4, height, width, 3), dtype=np.uint8)
        blocks = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
        blocks = blocks.repeat(-(-height // 8), axis=1).repeat(-(-width // 8), axis=2)
        check = np.concatenate([noise, blocks[:, :height, :width]])
        expected = model(check, training=False).numpy()
        difference = float(np.max(np.abs(converted(check) - expected)))
    except Exception as exc:  # whatever fails in converting or running, Keras stays in charge
        log.warning("inference runs in Keras: the LiteRT conversion failed (%s)", first_line(exc))
        return None
    if not difference <= LITERT_TOLERANCE:  # written so that NaN fails too
        log.warning(
            "inference runs in Keras: LiteRT differs from it by %.3g on the check batch (limit %g)",
            difference,
            LITERT_TOLERANCE,
        )
        return None
    log.info("inference runs in LiteRT: it differs from Keras by %.2g at most", difference)
    return converted
