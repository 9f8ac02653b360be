"""Labeled image trees and manifests.

A labeled tree has one subfolder per class (`root/bread/...`, `root/dog/...`); class indices are the
sorted folder names. Each file's split comes from a hash of its path relative to the root, so a
file keeps its split when others are added. A manifest (Parquet or CSV) records the listing and the
split, so training and evaluation need not list a large bucket again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dogbread import storage
from dogbread.errors import DataError, StorageError, first_line
from dogbread.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Decoded images a dataset holds in the object store at most: 192 MiB at 256 px, plenty to keep
# a GPU fed (a node decodes ~2,000 a second per core, bench/README.md).
IN_FLIGHT_IMAGES = 1024
MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # full location: a local path or s3://bucket/key
        ("relpath", pa.string()),  # relative to the tree root: what the split hash is taken of
        ("label", pa.string()),
        ("split", pa.string()),
    ]
)


@dataclass(frozen=True)
class Manifest:
    table: pa.Table  # MANIFEST_SCHEMA
    class_names: tuple[str, ...]
    skipped_non_images: int = 0

    def split(self, name: str) -> pa.Table:
        return self.table.filter(pa.compute.equal(self.table["split"], name))


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith((".parquet", ".csv"))


def is_image_name(path: str) -> bool:
    name = posixpath.basename(path)
    return not name.startswith(".") and posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def assign_split(relpath: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """train/val/test from a stable hash of the relative path (not Python's salted hash())."""
    bucket = int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) % 10_000 / 10_000
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


def list_files(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str, list[str]]:
    """(fs, root, sorted file paths below root), recursively."""
    fs, root = storage.resolve(uri, s3_endpoint)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound and not storage.is_s3(uri):
            raise DataError(f"input not found: {uri}")
        if not storage.is_s3(uri):
            return fs, root, _walk_local(root)
        bucket = root.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise DataError(f"bucket not found: s3://{bucket}")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot list {uri}: {first_line(exc)}") from None
    return fs, root, sorted(i.path for i in infos if i.type == pafs.FileType.File)


def _walk_local(root: str) -> list[str]:
    """Every file below root, following folder links once each.

    pyarrow's recursive listing drops broken links (an input that silently vanishes) and follows
    a folder link that points up the tree some 40 levels deep (the same files listed 40 times).
    Here a broken link is listed (its read fails, so it gets an error row) and a folder already
    walked is not walked again.
    """
    paths, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        seen.add(os.path.realpath(folder))
        subfolders[:] = [
            d for d in subfolders if os.path.realpath(os.path.join(folder, d)) not in seen
        ]
        paths += [os.path.join(folder, name) for name in names]
    return sorted(paths)


def list_labeled_tree(
    uri: str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    s3_endpoint: str | None = None,
) -> Manifest:
    """List `uri/<class>/**/<image>` and assign each file its split."""
    fs, root, paths = list_files(uri, s3_endpoint)
    rows: dict[str, list[str]] = {name: [] for name in MANIFEST_SCHEMA.names}
    skipped = 0
    for path in paths:
        relpath = posixpath.relpath(path, root) if root != "/" else path.lstrip("/")
        if "/" not in relpath or relpath.startswith(".") or not is_image_name(path):
            skipped += 1  # at the root (no class), in a hidden folder, or not an image by name
            continue
        rows["path"].append(storage.to_uri(fs, path))
        rows["relpath"].append(relpath)
        rows["label"].append(relpath.split("/", 1)[0])
        rows["split"].append(assign_split(relpath, val_fraction, test_fraction))
    if skipped:
        log.info("skipped %d non-image files under %s", skipped, uri)
    # S3 has no empty folders; locally an empty class folder is a mistake worth stopping for.
    top = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    folders = {i.base_name for i in top if i.type == pafs.FileType.Directory}
    empty = sorted(f for f in folders - set(rows["label"]) if not f.startswith("."))
    if empty:
        raise DataError(f"class folder(s) with no images in {uri}: {', '.join(empty)}")
    table = pa.table(rows, schema=MANIFEST_SCHEMA)
    class_names = _class_names(table, uri)
    return Manifest(table, class_names, skipped)


def _class_names(table: pa.Table, source: str) -> tuple[str, ...]:
    if table.num_rows == 0:
        raise DataError(f"no images found in {source} (expected one subfolder per class)")
    names = tuple(sorted(set(table["label"].to_pylist())))
    if len(names) < 2:
        raise DataError(f"only one class ({names[0]}) in {source}: at least two are needed")
    return names


def write_manifest(manifest: Manifest, uri: str, s3_endpoint: str | None = None) -> None:
    fs, path = storage.resolve(uri, s3_endpoint)
    try:
        fs.create_dir(posixpath.dirname(path), recursive=True)
        if uri.lower().endswith(".csv"):
            with fs.open_output_stream(path) as out:
                pacsv.write_csv(manifest.table, out)
        else:
            pq.write_table(manifest.table, path, filesystem=fs)
    except OSError as exc:
        raise StorageError(f"cannot write manifest {uri}: {first_line(exc)}") from None


def read_table_file(
    uri: str, text_columns: Iterable[str], s3_endpoint: str | None = None
) -> pa.Table:
    """A manifest-like CSV or Parquet file as a table."""
    fs, path = storage.resolve(uri, s3_endpoint)
    try:
        if uri.lower().endswith(".csv"):
            # Read these columns as text: a folder named "01" must not become the number 1.
            types = pacsv.ConvertOptions(column_types=dict.fromkeys(text_columns, pa.string()))
            with fs.open_input_stream(path) as stream:
                return pacsv.read_csv(stream, convert_options=types)
        return pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read manifest {uri}: {first_line(exc)}") from None


def read_manifest(uri: str, s3_endpoint: str | None = None) -> Manifest:
    """A manifest written by write_manifest (or any file with path and label columns)."""
    table = read_table_file(uri, MANIFEST_SCHEMA.names, s3_endpoint)
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise DataError(f"manifest {uri} lacks column(s): {', '.join(sorted(missing))}")
    if "relpath" not in table.column_names:
        table = table.append_column("relpath", table["path"])
    if "split" not in table.column_names:
        splits = [assign_split(p) for p in table["relpath"].to_pylist()]
        table = table.append_column("split", pa.array(splits, pa.string()))
    table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    return Manifest(table, _class_names(table, uri))


def load_labeled(
    uri: str, val_fraction: float = 0.1, test_fraction: float = 0.1, s3_endpoint: str | None = None
) -> Manifest:
    """A manifest file as written, or a labeled tree listed and split."""
    if is_manifest(uri):
        return read_manifest(uri, s3_endpoint)
    return list_labeled_tree(uri, val_fraction, test_fraction, s3_endpoint)


def decoded_dataset(
    table: pa.Table,
    class_names: tuple[str, ...],
    image_size: int,
    s3_endpoint: str | None = None,
    rows_per_block: int = 64,
    keep_unreadable: bool = False,
):
    """A Ray Dataset of decoded images ("image" uint8, "label" class index) from manifest rows,
    decoded in Ray Data tasks of half a CPU, wherever the cluster has one. It holds at most
    IN_FLIGHT_IMAGES decoded images in the object store: Ray Data's default budget is a share of
    the whole store, which a small split fits in whole (bench/train_memory.py).

    Files that cannot be decoded get a warning naming the file and the reason. They are left out,
    callers counting them as `table.num_rows - dataset.count()`; or, with `keep_unreadable`, kept
    as a black image with "weight" 0 (1 for the others), so that a training step count planned
    from the manifest holds.
    """
    import ray

    index = {name: i for i, name in enumerate(class_names)}
    # Blocks of `rows_per_block` files, decoded in parallel (per-row overhead dominates Ray Data
    # otherwise), put in the object store as they are: a repartition() copied them again.
    paths = table.select(["path", "label"])
    starts = range(0, max(paths.num_rows, 1), rows_per_block)
    source = ray.data.from_arrow([paths.slice(start, rows_per_block) for start in starts])
    options = {"image_size": image_size, "index": index, "s3_endpoint": s3_endpoint}
    dataset = source.map_batches(
        _decode_batch,
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.5,
        fn_kwargs={**options, "keep_unreadable": keep_unreadable},
    )
    limits = dataset.context.execution_options.resource_limits
    budget = IN_FLIGHT_IMAGES * 3 * image_size**2
    dataset.context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    return dataset


def _decode_batch(
    batch: pa.Table,
    image_size: int,
    index: dict[str, int],
    s3_endpoint: str | None,
    keep_unreadable: bool,
) -> dict:
    import numpy as np

    from dogbread.images import ImageDecodeError, decode_image

    # The filesystem is built here, on the worker, so credentials never travel in task payloads.
    fs = None
    black = np.zeros((image_size, image_size, 3), np.uint8)
    images, labels, weights = [], [], []
    for path, label in zip(batch["path"].to_pylist(), batch["label"].to_pylist(), strict=True):
        try:
            fs = fs or storage.resolve(path, s3_endpoint)[0]
            image = decode_image(storage.read_bytes(fs, storage.fs_path(path)), image_size)
            weight = 1.0
        except (ImageDecodeError, OSError) as exc:
            log.warning("skipped %s: %s", path, str(exc).splitlines()[0] if str(exc) else exc)
            if not keep_unreadable:
                continue
            image, weight = black, 0.0
        images.append(image)
        labels.append(index[label])
        weights.append(weight)
    shape = (len(images), image_size, image_size, 3)
    decoded = {
        "image": np.stack(images) if images else np.zeros(shape, np.uint8),
        "label": np.asarray(labels, np.int64),
    }
    return decoded | ({"weight": np.asarray(weights, np.float32)} if keep_unreadable else {})
