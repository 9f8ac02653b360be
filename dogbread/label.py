"""`dogbread label`: label an image store into Parquet with Ray Data.

Pipeline: the inputs (a listing, or a manifest so that a huge bucket need not be listed) become an
Arrow table of paths cut into blocks of `batch_size` rows. One task per block reads and decodes the
images (Ray's per-row operators would cost more than the decoding). A pool of actors loads the
model once each, labels a batch and writes it itself as a Parquet part; only a few count rows per
batch flow back to the driver, for the progress line and the summary.

Output, in `output/`:
- `part-<run>-<hash>.parquet` files with OUTPUT_SCHEMA, one row per input. With `--partition-by
  label` they sit in Hive folders `label=<URL-quoted label>/`; error rows go to
  `label=__HIVE_DEFAULT_PARTITION__`, which Hive, Spark and pyarrow read back as a null label. The
  label column stays in the files too, so every part is complete on its own.
- `config.yaml` (written first) and `summary.json` (written last). They are not Parquet: read the
  labels with `read_labels()`, `ray.data.read_parquet` (it keeps only *.parquet files) or
  `pyarrow.dataset.dataset(out, format="parquet", exclude_invalid_files=True)`.

Exactness: every file under the input is an input, except hidden names (a path component starting
with "."), which are counted as skipped. A file that cannot be read or decoded becomes a row whose
`error` starts with its reason code ("truncated: ...", "unreadable: ..."); the job goes on.

Resumability: a part is written whole or not at all (locally to a hidden temp name, then renamed;
on S3 a PUT is atomic), once its batch is labeled. Before starting, the `path` column of the parts
already in the output (the done-list) is read and those inputs are skipped, so a rerun, after a
crash or after success, adds no duplicate rows and does not redo finished batches. Parts of earlier
runs are never changed or deleted; an output holding another model_version is refused rather than
mixed. Error rows are done too: a rerun does not retry them. Two runs writing into one output at
the same time are not supported (both would label the remaining inputs).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dogbread import data, storage
from dogbread.config import CONFIG_FILENAME, LabelConfig, dump_config
from dogbread.errors import ConfigError, DataError, StorageError
from dogbread.images import DEFAULT_MAX_BYTES, ImageDecodeError, decode_image

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),  # null on error; "uncertain" below --threshold
        ("score", pa.float32()),  # probability of the most probable class
        ("probabilities", pa.list_(pa.float32())),  # in the model card's class order
        ("model_version", pa.string()),
        ("error", pa.string()),  # "<reason>: <detail>", null on success
        ("labeled_at", pa.timestamp("us", tz="UTC")),
    ]
)
SUMMARY_FILENAME = "summary.json"
ERROR_PARTITION = "__HIVE_DEFAULT_PARTITION__"
PART_PREFIX = "part-"
ACTOR_NUM_CPUS = 0.5  # fractional: whole-CPU actors on 2 cores leave no CPU to decode with
INFERENCE_CHUNK = 32  # images per model call: decoding the next chunk overlaps this one
S3_READ_THREADS = 16  # object reads wait on the network: a batch's reads overlap


def run(config: LabelConfig) -> dict[str, Any]:
    """Label every input into Parquet parts under config.output; print and return the summary.

    Config, model, input and output are all checked (raising DogbreadError) before Ray starts.
    """
    started = time.monotonic()
    _check_config(config)
    model_file, card, model = _check_model(config)
    inputs, in_fs, skipped = _list_inputs(config)
    storage.check_writable(config.output, config.s3_endpoint)
    out_fs, out_root = storage.resolve(config.output, config.s3_endpoint)
    done = _read_done(out_fs, out_root, config.output, card.model_version)
    done = done.filter(pc.is_in(done["path"], value_set=inputs))
    todo = inputs.filter(pc.invert(pc.is_in(inputs, value_set=done["path"])))
    # Written before the work, so that even a killed run records how it was started.
    storage.write_text(
        storage.join(config.output, CONFIG_FILENAME), dump_config(config), config.s3_endpoint
    )
    log.info("%d inputs, %d already labeled in %s", len(inputs), done.num_rows, config.output)

    counts = _count_rows(done)
    labeling_started = time.monotonic()
    if len(todo):  # a finished output is not worth starting Ray for
        counts.update(_label(config, todo, in_fs, out_fs, out_root, model_file, card, model))
    labeling_seconds = time.monotonic() - labeling_started
    summary = {
        "input": config.input,
        "output": storage.to_uri(out_fs, out_root),
        "model_version": card.model_version,
        "images": len(inputs),  # the output holds exactly one row for each
        "labeled": len(todo),  # by this run
        "already_done": done.num_rows,  # by earlier runs into the same output
        "labels": _by_kind(counts, "label"),  # over all `images`, earlier runs included
        "errors": _by_kind(counts, "error"),  # by reason code, likewise
        "skipped_hidden": skipped["hidden"],
        "duplicate_paths": skipped["duplicates"],
        "seconds": round(time.monotonic() - started, 2),
        "labeling_seconds": round(labeling_seconds, 2),  # Ray start-up included
        "images_per_second": round(len(todo) / labeling_seconds, 1) if len(todo) else 0.0,
    }
    storage.write_text(
        storage.join(config.output, SUMMARY_FILENAME),
        json.dumps(summary, indent=2) + "\n",
        config.s3_endpoint,
    )
    print(json.dumps(summary, indent=2), flush=True)
    if config.report:
        from dogbread.report import try_write_report  # imports this module

        try_write_report(config.output, config.s3_endpoint)
    return summary


def read_labels(output: str, s3_endpoint: str | None = None) -> pa.Table:
    """Every row a label job wrote into `output` (a convenience for small outputs)."""
    fs, root = storage.resolve(output, s3_endpoint)
    return pads.dataset(_part_files(fs, root), filesystem=fs, schema=OUTPUT_SCHEMA).to_table()


def _check_config(config: LabelConfig) -> None:
    if not (config.model and config.input and config.output):
        raise ConfigError("model, input and output must not be empty")
    if config.batch_size < 1 or config.actors < 1:
        raise ConfigError("batch_size and actors must be at least 1")
    if config.threshold is not None and not 0.0 <= config.threshold <= 1.0:
        raise ConfigError(f"threshold must be between 0 and 1, got {config.threshold}")
    if config.partition_by not in (None, "label"):
        raise ConfigError(f"partition_by can only be 'label', got {config.partition_by!r}")
    if not data.is_manifest(config.input) and _inside(config.output, config.input):
        # Refused rather than filtered: our parts would become inputs of the next run.
        raise ConfigError(f"output {config.output} is inside input {config.input}")


def _inside(inner: str, outer: str) -> bool:
    if storage.is_s3(inner) != storage.is_s3(outer):
        return False
    if storage.is_s3(inner):
        inner, outer = inner[len("s3://") :].rstrip("/"), outer[len("s3://") :].rstrip("/")
    else:
        inner, outer = os.path.realpath(inner), os.path.realpath(outer)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _check_model(config: LabelConfig) -> tuple[tuple[pafs.FileSystem, str], Any, Any]:
    """((fs, path) of the model file, its card, the model: a LiteRTModel or a Keras model).

    Loading it here fails fast on a bad model. A model saved with its LiteRT conversion (as
    `dogbread train` saves it) is read without TensorFlow: ~3 s less before the first batch.
    """
    from dogbread.model import load_litert, load_model, model_paths

    model_file = storage.resolve(model_paths(config.model)[1], config.s3_endpoint)
    saved = None if config.use_gpu else load_litert(config.model, config.s3_endpoint)
    model, card = saved or load_model(config.model, config.s3_endpoint)
    return model_file, card, model


def _list_inputs(config: LabelConfig) -> tuple[pa.Array, pafs.FileSystem, Counter[str]]:
    """(unique input URIs, the filesystem to read them with, counts of what was skipped)."""
    skipped: Counter[str] = Counter()
    if data.is_manifest(config.input):
        paths = _read_manifest(config.input, config.s3_endpoint)
        on_s3 = pc.sum(pc.starts_with(paths, "s3://")).as_py() or 0
        if on_s3 not in (0, len(paths)):
            raise DataError(f"manifest {config.input} mixes s3:// and local paths")
        fs = storage.s3_filesystem(config.s3_endpoint) if on_s3 else pafs.LocalFileSystem()
    else:
        fs, root, files = data.list_files(config.input, config.s3_endpoint)
        visible = [p for p in files if not _hidden(p[len(root) :])]
        skipped["hidden"] = len(files) - len(visible)
        paths = pa.array([storage.to_uri(fs, p) for p in visible], pa.string())
    unique = pc.unique(paths)  # in first-seen order
    skipped["duplicates"] = len(paths) - len(unique)
    if len(unique) == 0:
        raise DataError(f"no files to label in {config.input}")
    return unique, fs, skipped


def _read_manifest(uri: str, s3_endpoint: str | None) -> pa.Array:
    """Paths from a `path` column, or s3://bucket/key from S3 Inventory-like columns."""
    table = data.read_table_file(uri, ("path", "bucket", "key"), s3_endpoint)
    if "path" in table.column_names:
        paths = table["path"].cast(pa.string())
    elif {"bucket", "key"} <= set(table.column_names):
        bucket, key = table["bucket"].cast(pa.string()), table["key"].cast(pa.string())
        paths = pc.binary_join_element_wise("s3://", bucket, "/", key, "")  # "": no separator
    else:
        raise DataError(f"manifest {uri} needs a `path` column, or `bucket` and `key` columns")
    if paths.null_count or pc.any(pc.equal(paths, "")).as_py():
        raise DataError(f"manifest {uri} has rows without a path")
    if pc.all(pc.starts_with(paths, "s3://")).as_py():
        return paths.combine_chunks()  # kept in Arrow: an inventory may list millions of keys
    # Relative local paths are relative to the working directory, as on the command line.
    return pa.array([p if p.startswith("s3://") else os.path.abspath(p) for p in paths.to_pylist()])


def _hidden(relpath: str) -> bool:
    return any(part.startswith(".") for part in relpath.split("/"))


def _part_files(fs: pafs.FileSystem, root: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.startswith(PART_PREFIX)
        and i.base_name.endswith(".parquet")
        and not _hidden(i.path[len(root) :])
    )


def _read_done(fs: pafs.FileSystem, root: str, output: str, model_version: str) -> pa.Table:
    """path, label, error and model_version of every row already committed under `root`."""
    try:
        dataset = pads.dataset(_part_files(fs, root), filesystem=fs, schema=OUTPUT_SCHEMA)
        done = dataset.to_table(columns=["path", "label", "error", "model_version"])
    except (OSError, pa.ArrowInvalid) as exc:
        line = storage.first_line(exc)
        raise StorageError(f"cannot read the parts already in {output}: {line}") from None
    others = set(pc.unique(done["model_version"]).to_pylist()) - {model_version}
    if others:
        raise ConfigError(
            f"{output} holds labels of model_version {', '.join(sorted(others))}, not "
            f"{model_version}: label into another output"
        )
    return done


def _count_rows(table: pa.Table) -> Counter[str]:
    """{"label\\t<label>" or "error\\t<reason>": rows}."""
    reasons = pc.list_element(pc.split_pattern(table["error"], ":", max_splits=1), 0)
    counts: Counter[str] = Counter()
    for kind, column in (("label", table["label"]), ("error", reasons)):
        for item in pc.value_counts(column.drop_null()).to_pylist():
            counts[f"{kind}\t{item['values']}"] += item["counts"]
    return counts


def _by_kind(counts: Counter[str], kind: str) -> dict[str, int]:
    return {k.split("\t", 1)[1]: n for k, n in sorted(counts.items()) if k.startswith(kind + "\t")}


def _label(
    config: LabelConfig,
    todo: pa.Array,
    in_fs: pafs.FileSystem,
    out_fs: pafs.FileSystem,
    out_root: str,
    model_file: tuple[pafs.FileSystem, str],
    card: Any,
    model: Any,
) -> Counter[str]:
    """Run the Ray Data pipeline over `todo`; the counts of the rows it committed."""
    import ray

    from dogbread.runtime import ensure_ray

    # A Ray started here (not one joined) would prestart a Python worker per CPU that nothing
    # uses; on a small machine booting them (~1.5 s of CPU each) delays our actor by seconds.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    with ThreadPoolExecutor(1) as pool:
        # Converting the model for LiteRT and starting Ray take seconds each: they overlap.
        converting = pool.submit(_inference_model, model, config.use_gpu)
        started_ray = ensure_ray()
        inference = converting.result()
    if config.use_gpu and not ray.cluster_resources().get("GPU"):
        # Not an error: an autoscaling cluster adds GPU nodes once the actors ask for them.
        log.warning("no GPU in the Ray cluster yet: the labeling actors wait for one")
    run_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    size, finished, start = config.batch_size, 0, time.monotonic()
    counts: Counter[str] = Counter()
    try:
        # One block per batch, so Ray's per-block costs are paid once per batch. from_blocks
        # (a DeveloperAPI; Ray is pinned) takes the blocks' metadata from the driver, where
        # from_arrow runs a Ray task per block for it: ~1.5 s of start-up on 2 CPUs.
        blocks = [pa.table({"path": todo.slice(i, size)}) for i in range(0, len(todo), size)]
        labeler_args = (model_file, card.to_json(), inference, in_fs, config.threshold)
        ds = ray.data.from_blocks(blocks).map_batches(
            _Labeler,
            batch_size=None,  # a block is a batch
            batch_format="pyarrow",
            # Two batches in flight per actor: one's decoding and Parquet write overlap the
            # other's model calls (~7% more images/s here); the model runs one call at a time.
            # Not on GPUs, where two Keras calls at once would need twice the GPU memory.
            compute=ray.data.ActorPoolStrategy(
                size=config.actors,
                max_concurrent_calls_per_actor=1 if config.use_gpu else 2,
                enable_true_multi_threading=not config.use_gpu,
            ),
            num_cpus=ACTOR_NUM_CPUS,
            num_gpus=1 if config.use_gpu else 0,
            fn_constructor_args=(*labeler_args, out_fs, out_root, config.partition_by, run_id),
        )
        # This dataset's own copy of the context: Ray's bars would fight with our line.
        ds.context.enable_progress_bars = ds.context.print_on_execution_start = False
        print(f"labeling {len(todo)} images", file=sys.stderr, flush=True)
        shown, every = start, 0.5 if sys.stderr.isatty() else 10.0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for key, n in zip(batch["key"].to_pylist(), batch["count"].to_pylist(), strict=True):
                counts[key] += n
                finished += n
            if time.monotonic() - shown >= every or finished == len(todo):
                shown = time.monotonic()
                _show_progress(finished, len(todo), start)
    finally:
        if started_ray:
            ray.shutdown()
    return counts


def _show_progress(done: int, total: int, start: float) -> None:
    """done/total, images/s and ETA on stderr, redrawn in place on a terminal."""
    rate = done / max(time.monotonic() - start, 1e-6)
    eta = int((total - done) / rate) if rate else 0
    line = f"labeled {done}/{total} ({done / total:.0%})  {rate:.1f} img/s  "
    line += f"ETA {eta // 60}:{eta % 60:02d}"
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if done >= total else "", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def _inference_model(model: Any, use_gpu: bool) -> Any:
    """The LiteRTModel for the actors (as saved, or converted once here), or None: then each
    actor loads the Keras model itself (on GPUs, where TensorFlow beats LiteRT on the CPU, or
    when LiteRT does not reproduce Keras)."""
    from dogbread.model import LiteRTModel, inference_model

    if use_gpu:
        return None
    converted = model if isinstance(model, LiteRTModel) else inference_model(model)
    return converted if isinstance(converted, LiteRTModel) else None


def _load_model_file(model_file: tuple[pafs.FileSystem, str], card_json: str) -> tuple[Any, Any]:
    from dogbread.model import CARD_FILENAME, MODEL_FILENAME, load_model

    # The driver's filesystem arrives pickled with its credentials, so an actor can read the
    # model whatever its own environment; load_model then checks it as the driver did.
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, MODEL_FILENAME), "wb") as out:
            out.write(storage.read_bytes(*model_file))
        with open(os.path.join(tmp, CARD_FILENAME), "w") as out:
            out.write(card_json)
        return load_model(tmp)


def _read_and_decode(fs: pafs.FileSystem, uri: str, size: int) -> np.ndarray | str:
    """The file's pixels, or its error ("<reason>: <detail>")."""
    content = _read_file(fs, uri)
    if isinstance(content, str):
        return content
    try:
        return decode_image(content, size)
    except ImageDecodeError as exc:
        return str(exc)


def _read_file(fs: pafs.FileSystem, uri: str) -> bytes | str:
    """The file's bytes, or its error."""
    try:
        with fs.open_input_file(uri.removeprefix("s3://")) as f:
            if f.size() > DEFAULT_MAX_BYTES:  # refused before a huge file is read into memory
                return f"too_large: {f.size()} bytes, limit is {DEFAULT_MAX_BYTES}"
            return f.read()
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable: {storage.first_line(exc)}"


class _Labeler:
    """Reads, decodes and labels a batch of paths, and commits it as Parquet part(s).

    Decoding runs here, in threads, rather than in Ray tasks of its own: pixels never go through
    the object store (memory stays flat whatever the number of images, and no CPU is spent
    copying them), and the threads decode the next chunk while the model runs on this one.
    Given a LiteRTModel, the actor never imports TensorFlow: it starts in a second, not ten.
    Two calls may run at once (see _label): the pool and the model are safe to share.
    """

    def __init__(
        self,
        model_file: tuple[pafs.FileSystem, str],
        card_json: str,
        inference: Any,
        in_fs: pafs.FileSystem,
        threshold: float | None,
        fs: pafs.FileSystem,
        root: str,
        partition_by: str | None,
        run_id: str,
    ) -> None:
        from dogbread.model import ModelCard

        self.card = ModelCard.from_json(card_json)
        threads = len(os.sched_getaffinity(0))
        if inference is None:
            self.model, self.card = _load_model_file(model_file, card_json)
        else:
            self.model = inference.with_threads(threads)
        # Object reads wait on the network, local reads and decoding on the CPU.
        self.pool = ThreadPoolExecutor(
            S3_READ_THREADS if isinstance(in_fs, pafs.S3FileSystem) else threads
        )
        self.in_fs, self.threshold, self.fs, self.root = in_fs, threshold, fs, root
        self.partition_by, self.run_id = partition_by, run_id

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        from dogbread.model import label_predictions, predict_probabilities

        paths = batch["path"].to_pylist()
        size, n = self.card.image_size, len(paths)
        # In input order; the pool decodes ahead while the model runs on the chunk before.
        decoded = self.pool.map(lambda path: _read_and_decode(self.in_fs, path, size), paths)
        errors: list[str | None] = [None] * n
        probs = np.zeros((n, len(self.card.class_names)), np.float32)
        for start in range(0, n, INFERENCE_CHUNK):
            rows, images = [], []
            for i in range(start, min(start + INFERENCE_CHUNK, n)):
                result = next(decoded)
                if isinstance(result, str):
                    errors[i] = result
                else:
                    rows.append(i)
                    images.append(result)
            if rows:
                probs[rows] = predict_probabilities(self.model, np.stack(images))
        ok = np.flatnonzero([e is None for e in errors])
        ok_labels, ok_scores = label_predictions(probs[ok], self.card.class_names, self.threshold)
        labels, scores, probabilities = [None] * n, [None] * n, [None] * n
        for j, i in enumerate(ok):
            labels[i], scores[i], probabilities[i] = ok_labels[j], ok_scores[j], probs[i]
        version, now = [self.card.model_version] * n, [dt.datetime.now(dt.UTC)] * n
        columns = [paths, labels, scores, probabilities, version, errors, now]
        table = pa.Table.from_arrays(
            [pa.array(c, f.type) for c, f in zip(columns, OUTPUT_SCHEMA, strict=True)],
            schema=OUTPUT_SCHEMA,
        )
        _commit(table, self.fs, self.root, self.partition_by, self.run_id)
        counts = _count_rows(table)
        return {"key": np.array(list(counts), object), "count": np.array(list(counts.values()))}


def _commit(
    table: pa.Table, fs: pafs.FileSystem, root: str, partition_by: str | None, run_id: str
) -> None:
    groups = [(root, table)]
    if partition_by == "label":
        labels = table["label"].fill_null(ERROR_PARTITION)  # class names never take this name
        groups = [
            (f"{root}/label={quote(value, safe='')}", table.filter(pc.equal(labels, value)))
            for value in pc.unique(labels).to_pylist()
        ]
    for folder, rows in groups:
        # Named after the run and the rows: a batch that Ray retries after its actor died
        # overwrites its own part instead of adding a second copy of the rows.
        digest = hashlib.sha1("\n".join(rows["path"].to_pylist()).encode()).hexdigest()[:16]
        _write_atomic(fs, folder, f"{PART_PREFIX}{run_id}-{digest}.parquet", rows)


def _write_atomic(fs: pafs.FileSystem, folder: str, name: str, table: pa.Table) -> None:
    if isinstance(fs, pafs.S3FileSystem):  # readers see a PUT whole or not at all
        pq.write_table(table, f"{folder}/{name}", filesystem=fs)
        return
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp")  # hidden: never taken for a part
    with open(tmp, "wb") as out:
        pq.write_table(table, out)
        out.flush()
        os.fsync(out.fileno())  # or a machine crash could leave a renamed but empty part
    os.replace(tmp, os.path.join(folder, name))
