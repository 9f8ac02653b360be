"""LiteRT inference: a Keras model converted to a flatbuffer that XNNPACK runs on the CPU.

On a CPU the seed CNN runs about 2x faster in LiteRT's XNNPACK kernels than in TensorFlow, and
the model is most of the cost of labeling (bench/README.md). A conversion is served only where
it reproduces Keras on a check batch; otherwise Keras stays in charge. An int8 quantization
(quantize_int8) is faster again, but only approximates Keras: dogbread.quantize decides whether
it serves, by its accuracy.
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
# The ops an int8 conversion may run outside XNNPACK: on the input pixels, or on the output.
UNDELEGATED_OPS = frozenset({"CAST", "QUANTIZE", "DEQUANTIZE", "SOFTMAX", "LOGISTIC"})


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
        converted = LiteRTModel(_flatbuffer(_converter(model)), tuple(model.output_shape))
        check = _check_batch(model)
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


def quantize_int8(model: keras.Model, calibration: np.ndarray) -> LiteRTModel | None:
    """The model quantized to int8 after training, or None (with a warning) when that fails.

    Weights and activations become int8, their ranges taken from running the `calibration`
    images (uint8, a couple of hundred training images); the input stays uint8 and the output
    float32, so it is called as the float conversion is. XNNPACK runs it ~2.3x faster than the
    float conversion (the seed CNN at 256 px, in-process); whether it is as accurate is for the
    caller to measure (dogbread.quantize): it no longer reproduces Keras to 1e-4.
    """
    import tensorflow as tf

    if len(calibration) == 0:
        log.warning("no int8 LiteRT conversion: no calibration images")
        return None
    try:
        converter = _converter(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # One image a batch, as the converted function's signature takes them: uint8.
        converter.representative_dataset = lambda: (
            [np.ascontiguousarray(image[None], np.uint8)] for image in calibration
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.float32
        quantized = LiteRTModel(_flatbuffer(converter), tuple(model.output_shape))
        outputs = quantized(_check_batch(model))
        expected = (len(outputs), *model.output_shape[1:])
        if outputs.shape != expected or not np.all(np.isfinite(outputs)):
            raise ValueError(f"outputs of shape {outputs.shape}, not {expected}, or not finite")
        _check_xnnpack(quantized)
    except Exception as exc:  # whatever fails in converting or running, the float one serves
        log.warning("no int8 LiteRT conversion: %s", first_line(exc))
        return None
    return quantized


def _converter(model: keras.Model) -> Any:
    """A TFLiteConverter of the model as a function of a uint8 batch."""
    import tensorflow as tf

    # Converted with uint8 input, cast inside the graph (exactly, as Keras casts): ~6% faster
    # than feeding float32, and a quarter of the bytes per call.
    signature = tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8)
    function = tf.function(
        lambda images: model(tf.cast(images, tf.float32), training=False),
        input_signature=[signature],
    )
    return tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], model
    )


def _flatbuffer(converter: Any) -> bytes:
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(logging.WARNING)  # not "Assets written to /tmp/...": its scratch copy
    try:
        return converter.convert()
    finally:
        tf_log.setLevel(level)


def _check_batch(model: keras.Model) -> np.ndarray:
    """Fixed pixels, so that every process takes the same decision for the same model: noise,
    and blocks of flat colour, closer to photos."""
    rng = np.random.default_rng(0)
    height, width = model.input_shape[1:3]
    noise = rng.integers(0, 256, (4, height, width, 3), dtype=np.uint8)
    blocks = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    blocks = blocks.repeat(-(-height // 8), axis=1).repeat(-(-width // 8), axis=2)
    return np.concatenate([noise, blocks[:, :height, :width]])


def _check_xnnpack(converted: LiteRTModel) -> None:
    """Raise unless XNNPACK runs every op of the (already called) model whose cost grows with
    the image: all but the input's conversion and the output's.

    In LiteRT's own kernels the int8 seed CNN is half as fast as the float one in XNNPACK (272
    against 544 images/s at 256 px): a convolution XNNPACK does not take would make int8 a
    slowdown. XNNPACK has no int8 softmax, a few numbers an image. Each stretch XNNPACK takes
    is a DELEGATE node; the nodes it replaced are those between its inputs and its outputs.
    """
    nodes = converted._interpreter._get_ops_details()
    delegates = [n for n in nodes if n["op_name"] == "DELEGATE"]
    producers = {int(t): n for n in nodes if n["op_name"] != "DELEGATE" for t in n["outputs"]}
    replaced = {n["index"] for n in delegates}
    for delegate in delegates:
        inputs = {int(t) for t in delegate["inputs"]}
        tensors = [int(t) for t in delegate["outputs"]]
        while tensors:
            node = producers.get(tensors.pop())
            if node is not None and node["index"] not in replaced:
                replaced.add(node["index"])
                tensors += [int(t) for t in node["inputs"] if int(t) not in inputs]
    left = {n["op_name"] for n in nodes if n["index"] not in replaced}
    if not left <= UNDELEGATED_OPS:
        raise ValueError(f"XNNPACK leaves out {', '.join(sorted(left - UNDELEGATED_OPS))}")
