"""Metrics of a model on labeled data: accuracy, precision, recall, confusion matrix, plots."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from dogbread import data, storage
from dogbread.errors import DataError

log = logging.getLogger(__name__)
SCORE_BATCH = 64  # images per scoring call


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall, and the confusion matrix (rows: true class).

    For two classes, top-level precision and recall are those of class 1 (`dog` in our data),
    as in the seed notebook; for more, they are macro averages.
    """
    return metrics_of_confusion(confusion(y_true, y_pred, len(class_names)), class_names)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs: rows true, columns predicted."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return matrix


def metrics_of_confusion(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """classification_metrics from the confusion matrix alone."""
    n = len(class_names)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    diagonal = np.diag(matrix)
    precision = np.divide(diagonal, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(diagonal, actual, out=np.zeros(n), where=actual > 0)
    total = int(matrix.sum())
    per_class = {
        name: {"precision": float(p), "recall": float(r), "support": int(s)}
        for name, p, r, s in zip(class_names, precision, recall, actual, strict=True)
    }
    return {
        "accuracy": float(diagonal.sum() / total) if total else 0.0,
        "precision": float(precision[1] if n == 2 else precision.mean()),
        "recall": float(recall[1] if n == 2 else recall.mean()),
        "images": total,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    """A small table for the terminal."""
    lines = [
        f"accuracy {metrics['accuracy']:.3f}  precision {metrics['precision']:.3f}  "
        f"recall {metrics['recall']:.3f}  ({metrics['images']} images)",
        f"{'class':<12}{'precision':>10}{'recall':>8}{'support':>9}",
    ]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<12}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['support']:>9}")
    names = metrics["class_names"]
    lines.append("confusion (rows true, columns predicted): " + ", ".join(names))
    lines += ["  " + " ".join(f"{v:>6}" for v in row) for row in metrics["confusion_matrix"]]
    return "\n".join(lines)


class ConfusionCounter:
    """A Ray Data actor that scores batches of decoded images and returns only their confusion
    counts: the pixels and predictions of a test split of any size stay on the cluster, and the
    driver sums a k x k matrix per batch."""

    def __init__(self, architecture: str, weights: list[np.ndarray], num_classes: int) -> None:
        import tf_keras as keras

        # The driver's model, loaded there in safe mode or built by dogbread: its JSON and weights.
        self.model = keras.models.model_from_json(architecture)
        self.model.set_weights(weights)
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from dogbread.model import predict_probabilities

        predicted = np.argmax(predict_probabilities(self.model, batch["image"]), axis=1)
        return {"confusion": confusion(batch["label"], predicted, self.num_classes)[np.newaxis]}


def evaluate_decoded(
    model: Any, dataset: Any, class_names: Sequence[str], expected_rows: int
) -> dict[str, Any]:
    """Metrics of `model` on a decoded dataset (data.decoded_dataset), scored by a pool of
    ConfusionCounter actors that grows with the cluster's CPUs; images `expected_rows` had but
    the dataset does not (unreadable) are counted as skipped."""
    import ray

    n = len(class_names)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    counts = dataset.map_batches(
        ConfusionCounter,
        fn_constructor_args=(model.to_json(), model.get_weights(), n),
        batch_size=SCORE_BATCH,
        batch_format="numpy",
        # Half a CPU each, and one CPU left for decoding tasks: a pool that took every CPU
        # starved the tasks that feed it.
        num_cpus=0.5,
        concurrency=(1, max(1, 2 * (cpus - 1))),
    )
    matrix = np.zeros((n, n), np.int64)
    for batch in counts.iter_batches(batch_size=None, batch_format="numpy"):
        matrix += batch["confusion"].sum(axis=0)
    metrics = metrics_of_confusion(matrix, class_names)
    metrics["skipped_unreadable"] = expected_rows - metrics["images"]
    return metrics


def run(
    model_uri: str, data_uri: str, split: str | None = None, s3_endpoint: str | None = None
) -> dict[str, Any]:
    """`dogbread evaluate`: metrics of a saved model on a labeled tree or manifest."""
    from dogbread.model import load_model
    from dogbread.runtime import ensure_ray

    model, card = load_model(model_uri, s3_endpoint)
    manifest = data.load_labeled(data_uri, s3_endpoint=s3_endpoint)
    unknown = set(manifest.class_names) - set(card.class_names)
    if unknown:
        raise DataError(f"classes the model does not know: {', '.join(sorted(unknown))}")
    table = manifest.split(split) if split else manifest.table
    if table.num_rows == 0:
        raise DataError(f"no images in split {split!r} of {data_uri}")
    ensure_ray()
    dataset = data.decoded_dataset(table, card.class_names, card.image_size, s3_endpoint)
    metrics = evaluate_decoded(model, dataset, card.class_names, table.num_rows)
    print(format_metrics(metrics))
    print(json.dumps({k: metrics[k] for k in ("accuracy", "precision", "recall", "images")}))
    return metrics


def plot_curves(history: list[dict[str, Any]], uri: str, s3_endpoint: str | None = None) -> None:
    """Loss and accuracy, training against validation, as in the seed notebook."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [row[key] for row in history], "o-", label=f"train {key}")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "o-", label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    _save_figure(fig, uri, s3_endpoint)


def plot_confusion(metrics: dict[str, Any], uri: str, s3_endpoint: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(metrics["confusion_matrix"])
    names = metrics["class_names"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 1.2 * len(names) + 2.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color)
    ax.set_title(f"accuracy {metrics['accuracy']:.3f}")
    _save_figure(fig, uri, s3_endpoint)


def _save_figure(fig: Any, uri: str, s3_endpoint: str | None) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(uri, buffer.getvalue(), s3_endpoint)
