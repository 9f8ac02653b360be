"""The training step when a teacher or a frozen backbone takes part (dogbread.train_worker).

Distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): the student
learns from the labels and from the teacher's probabilities, both softened by a temperature T:

    loss = (1 - w) * cross_entropy(label, student) + w * T^2 * KL(teacher_T || student_T)

The teacher must see the very images the student trains on, augmented ones included, so it runs
inside each training worker, on the batch the student's own augmentation layers drew; Ray Data
computing its probabilities once per epoch would score other images than the ones trained on.

A frozen backbone gets zero gradients until `freeze_steps` (the optimizer's step, so a resumed
run freezes where the uninterrupted one did): Adam's moments stay zero and the weights do not
move, bit for bit. Only the student is saved: the trainer shares its layers and its optimizer.
The driver reads the teacher and the backbone's weights once (starting_point); the workers get
them through the object store.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any

from dogbread import backbone, storage
from dogbread.config import TrainConfig
from dogbread.errors import DataError, first_line
from dogbread.model import AUGMENTATION_PREFIX, read_model

if TYPE_CHECKING:
    import tf_keras as keras

PROBABILITY_EPSILON = 1e-7  # as Keras clips probabilities before its cross-entropies


@dataclasses.dataclass(frozen=True)
class StartingPoint:
    """What a run starts from besides its data: the teacher's model.keras bytes and model
    version, and the backbone's pretrained weights file with its sha256."""

    teacher: bytes = b""
    teacher_version: str = ""
    backbone_weights: bytes = b""
    backbone_sha256: str = ""


def starting_point(config: TrainConfig, class_names: tuple[str, ...]) -> StartingPoint:
    """Read the teacher and the backbone weights once, in the driver, and check the teacher's
    classes: a wrong path or a teacher of other classes fails before Ray starts."""
    teacher, version = b"", ""
    if config.teacher:
        teacher, card = read_model(config.teacher, config.s3_endpoint)
        if card is None:
            raise DataError(f"the teacher {config.teacher} has no model card: its classes unknown")
        if card.class_names != class_names:
            raise DataError(
                f"the teacher {config.teacher} knows {', '.join(card.class_names)}, "
                f"the data has {', '.join(class_names)}"
            )
        version = card.model_version
    weights = b""
    if config.backbone_weights == "imagenet":  # the user's explicit choice: Keras downloads
        weights = backbone.imagenet_weights(config.architecture, config.image_size)
    elif config.backbone_weights:
        try:
            fs, path = storage.resolve(config.backbone_weights, config.s3_endpoint)
            weights = storage.read_bytes(fs, path)
        except OSError as exc:
            message = f"cannot read backbone weights {config.backbone_weights}"
            raise DataError(f"{message}: {first_line(exc)}") from None
    sha256 = hashlib.sha256(weights).hexdigest() if weights else ""
    return StartingPoint(teacher, version, weights, sha256)


def student_trainer(
    student: keras.Model,
    teacher: keras.Model | None = None,
    temperature: float = 1.0,
    weight: float = 0.0,
    freeze_steps: int = 0,
) -> keras.Model:
    """A compiled model whose fit() trains `student` (compiled by build_model, whose optimizer
    it shares) against `teacher`'s probabilities, and with its backbone frozen for
    `freeze_steps` steps. Build it in the distribution strategy's scope."""
    import tensorflow as tf
    import tf_keras as keras

    class StudentTrainer(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="student_trainer")
            self.student = student  # tracked: its variables are the trainer's
            augmented = _augmented_tensor(student)
            self.augment = keras.Model(student.input, augmented)
            self.network = keras.Model(augmented, student.output)
            frozen = backbone.of(student).trainable_variables if freeze_steps else []
            self.frozen = [any(v is f for f in frozen) for v in student.trainable_variables]

        def call(self, images: Any, training: Any = None) -> Any:
            return self.student(images, training=training)

        def train_step(self, data: Any) -> dict[str, Any]:
            images, labels, weights = keras.utils.unpack_x_y_sample_weight(data)
            augmented = self.augment(images, training=True)
            targets = labels
            if teacher is not None:
                taught = teacher(_resized(augmented, teacher.input_shape[1]), training=False)
                targets = tf.concat([tf.cast(labels, taught.dtype)[:, None], taught], axis=-1)
            with tf.GradientTape() as tape:
                outputs = self.network(augmented, training=True)
                loss = self.compiled_loss(
                    targets, outputs, weights, regularization_losses=self.student.losses
                )
            variables = self.student.trainable_variables
            gradients = tape.gradient(loss, variables)
            if any(self.frozen):
                thawed = tf.cast(self.optimizer.iterations >= freeze_steps, gradients[0].dtype)
                gradients = [
                    g * thawed if frozen else g
                    for g, frozen in zip(gradients, self.frozen, strict=True)
                ]
            self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
            self.compiled_metrics.update_state(labels, outputs, weights)
            return {metric.name: metric.result() for metric in self.metrics}

    trainer = StudentTrainer()
    loss = distillation_loss(temperature, weight) if teacher is not None else student.loss
    trainer.compile(optimizer=student.optimizer, loss=loss, weighted_metrics=["accuracy"])
    return trainer


def distillation_loss(temperature: float, weight: float) -> Any:
    """The per-image loss of a student's outputs against packed targets: the label, then the
    teacher's outputs (one sigmoid column, or a softmax row)."""
    import tensorflow as tf

    def loss(targets: Any, outputs: Any) -> Any:
        labels = tf.cast(targets[:, 0], tf.int32)
        log_student = _log_probabilities(outputs)
        log_teacher = _log_probabilities(tf.cast(targets[:, 1:], outputs.dtype))
        hard = -tf.gather(log_student, labels, axis=1, batch_dims=1)
        # log p / T is a logit softened by T: softmax of it is the tempered distribution.
        soft_teacher = tf.nn.softmax(log_teacher / temperature)
        soft_student = tf.nn.log_softmax(log_student / temperature)
        kl = tf.reduce_sum(
            soft_teacher * (tf.math.log(soft_teacher + PROBABILITY_EPSILON) - soft_student), -1
        )
        return (1.0 - weight) * hard + weight * temperature**2 * kl

    return loss


def _log_probabilities(outputs: Any) -> Any:
    """log of (n, classes) probabilities from a sigmoid column or a softmax row."""
    import tensorflow as tf

    if outputs.shape[-1] == 1:
        outputs = tf.concat([1.0 - outputs, outputs], axis=-1)
    return tf.math.log(tf.clip_by_value(outputs, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON))


def _augmented_tensor(model: keras.Model) -> Any:
    """The tensor the augmentation layers give (the input when there are none)."""
    augmentation = [layer for layer in model.layers if layer.name.startswith(AUGMENTATION_PREFIX)]
    return augmentation[-1].output if augmentation else model.input


def _resized(images: Any, size: int) -> Any:
    """Images at the teacher's input size (a student may train at another)."""
    import tensorflow as tf

    if images.shape[1] == size:
        return images
    return tf.image.resize(images, (size, size))
