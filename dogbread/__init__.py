"""dogbread: a distributed batch image classifier on Ray."""

import os

# Training uses tf-keras (Keras 2) because Keras 3 with MultiWorkerMirroredStrategy is broken
# (ray-project/ray#47464, keras-team/keras#20585). Setting this before TensorFlow is imported makes
# `tf.keras` the same tf-keras everywhere, so no code path mixes the two Keras versions.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
