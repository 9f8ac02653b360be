"""`dogbread label`: label an image store into Parquet with Ray Data.

Pipeline: the inputs (a listing, or a manifest so that a huge bucket need not be listed) become an
Arrow table of paths cut into blocks of `batch_size` rows. A pool of actors (labeler.Labeler) loads
the model once each; an actor reads and decodes a block's images in threads (Ray's per-row
operators would cost more than the decoding), labels them and writes the batch itself as a
Parquet part; only a few count rows per batch flow back to the driver, for the progress line and
the summary.

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
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from dogbread import data, storage
from dogbread.config import CONFIG_FILENAME, LabelConfig, dump_config
from dogbread.errors import ConfigError, DataError, StorageError
from dogbread.labeler import OUTPUT_SCHEMA, PART_PREFIX, Labeler, by_kind, count_rows

log = logging.getLogger(__name__)

SUMMARY_FILENAME = "summary.json"
ACTOR_NUM_CPUS = 0.5  # fractional: whole-CPU actors on 2 cores leave no CPU to decode with


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

    counts = count_rows(done)
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
        "labels": by_kind(counts, "label"),  # over all `images`, earlier runs included
        "errors": by_kind(counts, "error"),  # by reason code, likewise
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
    return pads.dataset(part_files(fs, root), filesystem=fs, schema=OUTPUT_SCHEMA).to_table()


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


def part_files(fs: pafs.FileSystem, root: str) -> list[str]:
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
        dataset = pads.dataset(part_files(fs, root), filesystem=fs, schema=OUTPUT_SCHEMA)
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
    run_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    size, finished, start = config.batch_size, 0, time.monotonic()
    counts: Counter[str] = Counter()
    try:
        if config.use_gpu and not ray.cluster_resources().get("GPU"):
            if started_ray == "local":  # no autoscaler: the actors would wait for a GPU forever
                raise ConfigError("--gpu needs a GPU, and the local Ray has none: drop --gpu")
            # Not an error: an autoscaling cluster adds GPU nodes once the actors ask for them.
            log.warning("no GPU in the Ray cluster yet: the labeling actors wait for one")
        # One block per batch, so Ray's per-block costs are paid once per batch. from_blocks
        # (a DeveloperAPI; Ray is pinned) takes the blocks' metadata from the driver, where
        # from_arrow runs a Ray task per block for it: ~1.5 s of start-up on 2 CPUs.
        blocks = [pa.table({"path": todo.slice(i, size)}) for i in range(0, len(todo), size)]
        labeler_args = (model_file, card.to_json(), inference, in_fs, config.threshold)
        ds = ray.data.from_blocks(blocks).map_batches(
            Labeler,
            # A block is a batch. Ray refuses GPU map_batches without a batch_size; the blocks
            # already hold that many rows, so it is the same batching.
            batch_size=size if config.use_gpu else None,
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
    from dogbread.litert import LiteRTModel, inference_model

    if use_gpu:
        return None
    converted = model if isinstance(model, LiteRTModel) else inference_model(model)
    return converted if isinstance(converted, LiteRTModel) else None
