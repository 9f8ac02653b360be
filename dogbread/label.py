"""`dogbread label`: label an image store into Parquet with Ray Data, at any size.

A job is cut into shards once (plan.py): fixed sets of input paths, ~rows_per_file each. Then:

    shards to do ─► expand: a shard's paths (less those already kept) in blocks of batch_size
              ─► Labeler actors: label a block (decoded by them, or by CPU tasks before them:
                 the plans of pipeline.py), keep it as a batch file
              ─► the driver counts rows per shard; a shard complete ─► commit (a Ray task):
                 its data file(s), then its marker (output.py)

Only counts reach the driver. A rerun reads plan.json and the markers, not the rows: a killed run
is simply started again and redoes only the batches it had in flight, and a complete output
starts no Ray. Rows whose read failed (network, throttling) are labeled again by a rerun; other
errors are final. An output holding another model_version is refused rather than mixed. Two runs
writing into one output at the same time are not supported.

Exactness: every file under the input is an input, except hidden names (a path component starting
with "."), which are counted as skipped. A file that cannot be read or decoded becomes a row whose
`error` starts with its reason code ("truncated: ...", "unreadable: ..."); the job goes on.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from dogbread import console, output, pipeline, plan, storage, worklist
from dogbread.config import LabelConfig, dump_config
from dogbread.errors import ConfigError
from dogbread.labeler import Labeler
from dogbread.output import Output, by_kind
from dogbread.pipeline import Job
from dogbread.plan import Plan

log = logging.getLogger(__name__)

LOCAL = pafs.LocalFileSystem()


def run(config: LabelConfig) -> dict[str, Any]:
    """Label every input into Parquet under config.output; return the summary (with --dry-run:
    plan and count only, return what a run would do).

    Config, model, input and output are checked (raising DogbreadError) before Ray starts.
    """
    started = time.monotonic()
    _check_config(config)
    model_file, card, model = _check_model(config)
    work = worklist.resolve(config.input, config.s3_endpoint)
    if not config.dry_run:
        storage.check_writable(config.output, config.s3_endpoint)
    out = Output.at(config.output, config.s3_endpoint)
    planned = plan.load(out, config.input, card.model_version)
    legacy = [] if planned else output.legacy_parts(out, card.model_version)
    if not config.dry_run:  # before the work, so that even a killed run records how it started
        if legacy:
            output.set_aside_legacy_sidecars(out)
        out.write(output.CONFIG, dump_config(config).encode())
    markers = output.read_markers(out) if planned else {}
    shards = planned
    if shards is None and plan.in_driver(work, legacy):  # a small job plans before Ray starts
        shards = _plan(config, work, out, legacy, card.model_version)
    if config.dry_run and shards:
        pending = _pending(out, _todo(shards, markers))
        return _dry_run(shards, markers, pending, planned is not None, started)
    todo = _todo(shards, markers) if shards else None  # None: known once planned, with Ray
    labeling = not config.dry_run and todo != {}
    inference = _inference_model(model, config.use_gpu) if labeling else None
    pending = _pending(out, todo) if todo else {}  # before the driver labels any of it
    meanwhile = _driver_labeling(
        config, shards, markers, pending, out, (model_file, card, inference)
    )
    with _ray_session(shards is None or labeling, meanwhile) as ray_started:
        if shards is None:
            shards = _plan(config, work, out, legacy, card.model_version)
            pending = _pending(out, _todo(shards, markers))
            if config.dry_run:
                return _dry_run(shards, markers, pending, planned is not None, started)
        labeled = sum(pending.values())  # by this run, the driver's first batch included
        labeling_started, resources = time.monotonic(), None
        if pending:  # shards to do; one a killed run kept whole is only committed
            in_fs = storage.s3_filesystem(config.s3_endpoint) if shards.on_s3 else LOCAL
            resources = pipeline.resources(config)
            job = Job(
                config, shards, in_fs, out, model_file, card, inference, ray_started, resources
            )
            if meanwhile:  # less what the driver labeled while Ray started
                pending = _pending(out, _todo(shards, markers))
            in_driver = labeled - sum(pending.values())
            retried = {s for s in pending if s in markers}
            new_markers, where = _label(job, pending, retried, (in_driver, started))
            markers |= new_markers
            for counts in where["images_by_node"].values() if in_driver else ():
                counts["driver"] = in_driver  # while Ray started
        labeling_seconds = time.monotonic() - labeling_started
    summary = _summary(config, out, shards, markers, labeled, labeling_seconds, started)
    if resources:  # how this run labeled, as resolved from --plan, --actors and --actor-cpus
        summary["plan"] = {
            "decode": resources.plan,
            "actor_cpus": resources.actor_cpus,
            **where,  # Ray node ids where this run decoded and labeled, and how many actors
        }
    out.write(output.SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    if len(markers) == len(shards.shards):  # every input has its row: the output is complete
        out.write(output.SUCCESS, b"")
    if config.report:
        from dogbread.report import try_write_report

        try_write_report(config.output, config.s3_endpoint)
    return summary


def _plan(
    config: LabelConfig, work: worklist.WorkList, out: Output, legacy: list[str], version: str
) -> Plan:
    return plan.make(work, out, legacy, version, config.rows_per_file, not config.dry_run)


def _driver_labeling(
    config: LabelConfig,
    shards: Plan | None,
    markers: dict[int, dict],
    pending: dict[int, int],
    out: Output,
    model: tuple[tuple[pafs.FileSystem, str], Any, Any],
) -> Callable[[], None] | None:
    """What the driver does while it starts a local Ray: label the first batch, when the fused
    plan will run (a local Ray is one machine) with a LiteRT model. One batch only: Ray's start
    and Ray Data's take 5-8 s here before an actor keeps a batch, but the driver that labeled
    more would slow Ray's start on a small machine, and do the actors' work in another shape."""
    import ray

    local = not ray.is_initialized() and os.environ.get("RAY_ADDRESS", "") in ("", "local")
    fused = local and pipeline.decode_plan(config, one_machine=True) == "fused"  # a local Ray
    shard = next((s for s, n in pending.items() if n and s not in markers), None)
    model_file, card, inference = model  # inference: a LiteRTModel, or None
    if not (fused and inference is not None and shards and shard is not None):
        return None
    in_fs = storage.s3_filesystem(config.s3_endpoint) if shards.on_s3 else LOCAL
    cpus = pipeline.fused_actor_cpus(len(os.sched_getaffinity(0)), config)
    labeler = Labeler(model_file, card.to_json(), inference, in_fs, config.threshold, out, cpus)
    return functools.partial(pipeline.label_in_driver, labeler, out, shard, config.batch_size)


def read_labels(output_uri: str, s3_endpoint: str | None = None) -> pa.Table:
    """Every row a label job wrote into `output_uri` (a convenience for small outputs)."""
    return output.read_labels(output_uri, s3_endpoint)


def _check_config(config: LabelConfig) -> None:
    if not (config.model and config.input and config.output):
        raise ConfigError("model, input and output must not be empty")
    names_a_file = config.input.lower().endswith((*worklist.MANIFEST_SUFFIXES, ".json"))
    if not names_a_file and _inside(config.output, config.input):
        # Refused rather than filtered: our files would become inputs of the next run.
        raise ConfigError(f"output {config.output} is inside input {config.input}")


def _todo(shards: Plan, markers: dict[int, dict]) -> dict[int, int]:
    """{shard: rows it still needs labeled}: shards never committed, and committed shards with
    rows whose read failed (labeled again), before subtracting the batches already kept."""
    todo = {}
    for shard, counts in shards.shards.items():
        marker = markers.get(shard)
        if marker is None:
            todo[shard] = counts["rows"]
        elif marker["retry"]:
            todo[shard] = marker["retry"]
    return todo


def _pending(out: Output, todo: dict[int, int]) -> dict[int, int]:
    """`todo` less the rows of the batches a killed run kept (read from their names only)."""
    kept = output.batch_rows(out)
    return {shard: max(0, rows - kept[shard]) for shard, rows in todo.items()}


@contextlib.contextmanager
def _ray_session(needed: bool, meanwhile: Callable[[], None] | None = None) -> Iterator[str | None]:
    """Ray up for the block when `needed` (a finished output is not worth starting Ray for);
    yields what ensure_ray says: "local" (a Ray of our own), "joined" or None (up already).
    `meanwhile()` runs in a thread while Ray starts; the block starts once both are done."""
    if not needed:
        yield None
        return
    import ray

    from dogbread.runtime import ensure_ray

    # A Ray started here (not one joined) would prestart a Python worker per CPU that nothing
    # uses; on a small machine booting them (~1.5 s of CPU each) delays our actors by seconds.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    with _in_background(meanwhile):
        started = ensure_ray()  # in this thread: Ray's processes die with the thread that forked
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield started
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _in_background(work: Callable[[], None] | None) -> Iterator[None]:
    """Run `work()` in a thread during the block; then wait for it, and raise its error."""
    if work is None:
        yield
        return
    failed = []

    def guarded() -> None:
        try:
            work()
        except BaseException as exc:  # raised in the caller's thread below
            failed.append(exc)

    thread = threading.Thread(target=guarded, name="dogbread-label-in-driver", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failed:
        raise failed[0]


def _dry_run(
    shards: Plan, markers: dict, pending: dict[int, int], planned: bool, started: float
) -> dict[str, Any]:
    to_label = sum(n for s, n in pending.items() if s not in markers)
    report = {
        "images": shards.images,
        "already_done": shards.images - to_label,
        "to_label": to_label,
        "retry": sum(n for s, n in pending.items() if s in markers),
        "shards": len(shards.shards),
        "shards_done": len(markers),
        "duplicate_paths": shards.duplicate_paths,
        "skipped_hidden": shards.skipped_hidden,
        "planned_before": planned,
        "seconds": round(time.monotonic() - started, 2),
    }
    return report


def _summary(
    config: LabelConfig,
    out: Output,
    shards: Plan,
    markers: dict[int, dict],
    labeled: int,
    labeling_seconds: float,
    started: float,
) -> dict[str, Any]:
    """The run's counts, added up from the shards' markers (and the legacy parts' counts)."""
    counts = shards.legacy_counts()
    for marker in markers.values():
        counts.update({f"label\t{k}": n for k, n in marker["labels"].items()})
        counts.update({f"error\t{k}": n for k, n in marker["errors"].items()})
    return {
        "input": config.input,
        "output": out.uri,
        "model_version": shards.model_version,
        "images": shards.images,  # the output holds exactly one row for each, once complete
        "labeled": labeled,  # by this run, rows whose read failed before included
        "already_done": shards.images - labeled,  # by earlier runs into the same output
        "complete": len(markers) == len(shards.shards),
        "labels": by_kind(counts, "label"),  # over all committed rows, earlier runs included
        "errors": by_kind(counts, "error"),  # by reason code, likewise
        "skipped_hidden": shards.skipped_hidden,
        "duplicate_paths": shards.duplicate_paths,
        "shards": len(shards.shards),
        "seconds": round(time.monotonic() - started, 2),
        "labeling_seconds": round(labeling_seconds, 2),
        "images_per_second": round(labeled / labeling_seconds, 1) if labeled else 0.0,
    }


def _label(
    job: Job, pending: dict[int, int], retried: set[int], progress_from: tuple[int, float]
) -> tuple[dict[int, dict], dict[str, Any]]:
    """Label the pending rows of the shards to do (`retried`: committed shards whose failed reads
    are labeled again) and commit each shard once all its rows are kept; return the new markers,
    and where the work ran: the rows each Ray node decoded and labeled (a batch Ray ran twice
    counts twice), and the number of actors that labeled. The progress line counts from
    `progress_from`: the images the driver labeled while Ray started, and the command's start."""
    import ray

    config, out = job.config, job.out
    if config.use_gpu and not ray.cluster_resources().get("GPU"):
        if job.ray_started == "local":  # no autoscaler: the actors would wait for a GPU forever
            raise ConfigError("--gpu needs a GPU, and the local Ray has none: drop --gpu")
        # Not an error: an autoscaling cluster adds GPU nodes once the actors ask for them.
        log.warning("no GPU in the Ray cluster yet: the labeling actors wait for one")
    commit = ray.remote(num_cpus=pipeline.SMALL_TASK_CPUS)(output.commit_shard)

    def commit_shard(shard: int) -> Any:
        rows = job.shards.shards[shard]["rows"]
        return commit.remote(out, shard, rows, config.partition_by, job.shards.model_version)

    commits = [commit_shard(s) for s, n in pending.items() if not n]  # kept whole by a killed run
    shards = [s for s, n in pending.items() if n]
    ds = pipeline.dataset(job, shards, retried)
    finished, start = progress_from
    remaining, total, committing = dict(pending), sum(pending.values()) + finished, set()
    nodes = {"decoded": collections.Counter(), "labeled": collections.Counter()}
    actors: set[str] = set()
    progress = console.ProgressLine(every_s=10.0)
    if total:
        print(f"labeling {total} images", file=console.terminal(), flush=True)
    if finished:  # by the driver
        progress.update(_progress(finished, total, start), force=finished >= total)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow") if shards else []:
        actors.update(batch["actor"].to_pylist())
        for shard, n, decoded_on, labeled_on in zip(
            *(batch[c].to_pylist() for c in ("shard", "rows", "decoded_on", "labeled_on")),
            strict=True,
        ):
            nodes["decoded"][decoded_on] += n
            nodes["labeled"][labeled_on] += n
            remaining[shard] -= n
            finished += n
            if remaining[shard] <= 0 and shard not in committing:  # all its rows are kept
                committing.add(shard)  # (<=: a batch Ray rebuilt counts twice; commit checks)
                commits.append(commit_shard(shard))
        progress.update(_progress(finished, total, start), force=finished >= total)
    progress.close()
    markers = {marker["shard"]: marker for marker in ray.get(commits)}
    return markers, {
        "images_by_node": {stage: dict(counts) for stage, counts in nodes.items()},
        "actors": len(actors),  # labeling actors that labeled a batch: how far the pool grew
    }


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


def _progress(done: int, total: int, start: float) -> str:
    rate = done / max(time.monotonic() - start, 1e-6)
    eta = console.eta((total - done) / rate if rate else 0)
    return f"labeled {done}/{total} ({done / total:.0%})  {rate:.1f} img/s  {eta}"


def _inference_model(model: Any, use_gpu: bool) -> Any:
    """The LiteRTModel for the actors (as saved, or converted once here), or None: then each
    actor loads the Keras model itself (on GPUs, where TensorFlow beats LiteRT on the CPU, or
    when LiteRT does not reproduce Keras)."""
    from dogbread.litert import LiteRTModel, inference_model

    if use_gpu:
        return None
    converted = model if isinstance(model, LiteRTModel) else inference_model(model)
    return converted if isinstance(converted, LiteRTModel) else None
