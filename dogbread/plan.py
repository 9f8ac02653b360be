"""Cutting a label job's work list into shards, once, in Ray tasks.

A shard is the unit of commit and of resume. The first run of an output plans it: every input
path is hashed into one of N shards (N = inputs / rows_per_file), a hash shuffle in Ray tasks
brings each shard's paths together in one task, which drops duplicate paths (a path's
copies all hash to the same shard, so no process needs the whole list), sorts the rest and writes
them as `_dogbread/plan/shard-NNNNN.pq`. `_dogbread/plan.json`, written last, lists the
shards with their counts; every later run reads it instead of the work list, so a rerun of a job
of 50 million inputs reads one small file and the shards' markers.

Parts written by dogbread before shards existed (one per batch, "legacy") join the shuffle, so
that their paths are done already and not labeled twice.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dogbread import output
from dogbread.errors import ConfigError, DataError, DogbreadError, StorageError
from dogbread.output import (
    INTERNAL,
    META,
    OUTPUT_SCHEMA,
    Output,
    count_rows,
    shard_name,
    write_table,
)
from dogbread.worklist import WorkList

log = logging.getLogger(__name__)

EXPAND_ROWS = 65_536  # paths a block as a shard's paths are read to be labeled
SPLIT_CPUS = 0.5  # per task of either round: two run on each core, reading overlaps hashing
# A manifest of up to this many paths (~7 MB of them) is planned in the driver: it needs no Ray,
# so that a small job plans while Ray starts rather than after.
DRIVER_PLAN_ROWS = 100_000

PLAN_FILE = "plan.json"
PLAN_ROW = pa.schema(
    [
        ("path", pa.string()),
        ("hidden", pa.bool_()),
        ("legacy", pa.bool_()),  # a row of a legacy part, not an input
        ("label", pa.string()),  # legacy rows': counted into the summary
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class Plan:
    """The shards of a label output. `shards` maps a shard id to its counts: `images` (distinct
    inputs in it), `rows` (those this output's shard files hold: the rest are in legacy parts)
    and `legacy` (count_rows of the legacy rows, by "label\\t..." and "error\\t...")."""

    input: str
    model_version: str
    on_s3: bool  # the inputs are s3:// keys (else local paths)
    images: int
    duplicate_paths: int
    skipped_hidden: int
    shards: dict[int, dict[str, Any]]

    def to_json(self) -> str:
        values = {**self.__dict__, "shards": {str(k): v for k, v in self.shards.items()}}
        return json.dumps(values, indent=1) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Plan:
        """The plan as plan.json holds it (shard ids are JSON keys: text)."""
        shards = {int(k): v for k, v in values["shards"].items()}
        return cls(**{**values, "shards": shards})

    def legacy_counts(self) -> Counter[str]:
        return sum((Counter(s["legacy"]) for s in self.shards.values()), Counter())


def load(out: Output, source: str, model_version: str) -> Plan | None:
    """The output's plan, or None if it has none; refused if made for another input or model."""
    try:
        found = out.read_json(META, PLAN_FILE)
        found = None if found is None else Plan.from_dict(found)
    except (OSError, ValueError, TypeError) as exc:
        raise StorageError(f"cannot read the plan in {out.uri}: {exc}") from None
    if found and found.model_version != model_version:
        raise ConfigError(
            f"{out.uri} holds labels of model_version {found.model_version}, not "
            f"{model_version}: label into another output"
        )
    if found and found.input != source:
        raise ConfigError(
            f"{out.uri} was planned for input {found.input}, not {source}: "
            "label into another output"
        )
    return found


def make(
    work: WorkList,
    out: Output,
    legacy: list[str],
    model_version: str,
    rows_per_file: int,
    write: bool,
) -> Plan:
    """Plan the shards (Ray must be up unless in_driver(work, legacy)); write them and plan.json
    into `out` if `write`."""
    started = time.monotonic()
    try:
        records = _plan_shards(work, out, legacy, rows_per_file, write)
    except Exception as exc:  # a DogbreadError in a task reaches here wrapped by Ray
        raise (_ours(exc) or exc) from None
    log.info("planned %d shards in %.1f s", len(records), time.monotonic() - started)
    plan = _summed(records, work, model_version)
    if write:
        out.write(f"{META}/{PLAN_FILE}", plan.to_json().encode())
    return plan


def in_driver(work: WorkList, legacy: list[str]) -> bool:
    """Whether `make` plans in this process, without Ray: a small manifest, no legacy parts."""
    return work.is_manifest and not legacy and work.estimated_rows <= DRIVER_PLAN_ROWS


def _plan_shards(
    work: WorkList, out: Output, legacy: list[str], rows_per_file: int, write: bool
) -> list[dict[str, Any]]:
    """One record of counts per shard, from a shuffle in two rounds of Ray tasks: one task a
    source (a manifest file, a listed block, a legacy part) splits its rows by shard; one task a
    shard gathers its pieces from them all. The rows wait in the object store, spread over the
    cluster, never in one process. Ray Data's groupby did the same in 2x the time here (notes in
    bench/README.md)."""
    sources, rows = work.sources()
    n_shards = max(1, math.ceil(rows / rows_per_file))
    if in_driver(work, legacy):  # the same two rounds, called here
        split, plan_shard, gather = _split, _plan_shard, list
    else:
        import ray

        split = ray.remote(num_cpus=SPLIT_CPUS, num_returns=n_shards)(_split).remote
        plan_shard = ray.remote(num_cpus=SPLIT_CPUS)(_plan_shard).remote
        gather = ray.get
    pieces = [split(work, n_shards, source) for source in sources]
    pieces += [split(out, n_shards, path) for path in legacy]
    pieces = [p if n_shards > 1 else [p] for p in pieces]  # one piece: a table (ref), no list
    writes_to = out if write else None
    records = [
        plan_shard(shard, writes_to, *(p[shard] for p in pieces)) for shard in range(n_shards)
    ]
    return [record for record in gather(records) if record]


def _split(source_of: WorkList | Output, n_shards: int, source: Any) -> list[pa.Table] | pa.Table:
    """A source's rows (PLAN_ROW) in n_shards tables, by a hash of the path."""
    if isinstance(source_of, Output):  # a legacy part
        tables = [
            pq.read_table(source, filesystem=source_of.fs, columns=["path", "label", "error"])
        ]
    else:
        tables = list(source_of.read(source))
    rows = (
        pa.concat_tables([_as_plan_rows(t) for t in tables]) if tables else PLAN_ROW.empty_table()
    )
    # pandas' vectorized hash (SipHash with a fixed key): the same path, the same shard, in every
    # process. Python's hash() is salted per process.
    paths = rows["path"].fill_null("").to_numpy(zero_copy_only=False)
    shards = pd.util.hash_pandas_object(pd.Series(paths), index=False).to_numpy() % n_shards
    order = np.argsort(shards, kind="stable")
    bounds = np.searchsorted(shards[order], np.arange(n_shards + 1))
    # take() copies: a slice would carry (and pickle) its whole parent's buffers to every shard.
    pieces = [rows.take(order[bounds[i] : bounds[i + 1]]) for i in range(n_shards)]
    return pieces if n_shards > 1 else pieces[0]


def _ours(exc: BaseException | None) -> DogbreadError | None:
    """The DogbreadError that a Ray task raised, found in the exceptions Ray wraps it in."""
    while exc is not None:
        if isinstance(exc, DogbreadError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _as_plan_rows(batch: pa.Table) -> pa.Table:
    n, names = batch.num_rows, batch.column_names
    legacy = "label" in names
    text = pa.nulls(n, pa.string())
    return pa.table(
        {
            "path": batch["path"],
            "hidden": batch["hidden"] if "hidden" in names else np.zeros(n, bool),
            "legacy": np.full(n, legacy),
            "label": batch["label"] if legacy else text,
            "error": batch["error"] if legacy else text,
        },
        PLAN_ROW,
    )


def _plan_shard(shard: int, out: Output | None, *pieces: pa.Table) -> dict[str, Any] | None:
    """One shard's paths: duplicates dropped, legacy rows matched, the rest written sorted
    (when `out` is given); its counts, or None for a shard that no path fell into."""
    rows = pa.concat_tables(pieces)
    if rows.num_rows == 0:
        return None
    is_legacy = rows["legacy"]
    inputs = rows.filter(pc.invert(is_legacy))
    visible = inputs.filter(pc.invert(inputs["hidden"]))["path"]
    bad = visible.null_count + (pc.sum(pc.equal(visible, "")).as_py() or 0)
    unique = pc.unique(visible.drop_null())
    old = rows.filter(is_legacy)
    todo = unique
    if old.num_rows:  # only where an output of the version before shards is resumed
        old = old.filter(pc.is_in(old["path"], value_set=unique))
        todo = unique.filter(pc.invert(pc.is_in(unique, value_set=old["path"])))
    todo = todo.take(pc.sort_indices(todo))
    if out is not None:
        table = pa.table({"path": todo}, pa.schema([OUTPUT_SCHEMA.field("path")]))
        write_table(out.fs, out.path(META, "plan", shard_name(shard) + INTERNAL), table)
    return {
        "shard": shard,
        "mentions": len(visible),
        "images": len(unique),
        "rows": len(todo),
        "hidden": inputs.num_rows - len(visible),
        "bad": bad,
        "s3": pc.sum(pc.starts_with(unique, "s3://")).as_py() or 0,
        "legacy": json.dumps(count_rows(old)),
    }


def _summed(records: list[dict[str, Any]], work: WorkList, model_version: str) -> Plan:
    total = Counter()
    for record in records:
        total.update({k: record[k] for k in ("mentions", "images", "hidden", "bad", "s3")})
    if total["bad"]:
        raise DataError(f"manifest {work.source} has {total['bad']} rows without a path")
    if total["images"] == 0:
        raise DataError(f"no files to label in {work.source}")
    if total["s3"] not in (0, total["images"]):
        raise DataError(f"manifest {work.source} mixes s3:// and local paths")
    shards = {
        r["shard"]: {"images": r["images"], "rows": r["rows"], "legacy": json.loads(r["legacy"])}
        for r in sorted(records, key=lambda r: r["shard"])
        if r["images"]
    }
    return Plan(
        input=work.source,
        model_version=model_version,
        on_s3=total["s3"] > 0,
        images=total["images"],
        duplicate_paths=total["mentions"] - total["images"],
        skipped_hidden=total["hidden"],
        shards=shards,
    )


def paths_to_label(batch: pa.Table, out: Output, retried: set[int]) -> Iterator[pa.Table]:
    """The paths still to label of each shard in `batch` (a Ray Data map): its planned paths
    (or, for a committed shard, those whose read failed) less those in batches already kept."""
    for shard in batch["shard"].to_pylist():
        if shard in retried:
            rows = output.read_shard_rows(out, output.read_marker(out, shard), ["path", "error"])
            reasons = pc.list_element(pc.split_pattern(rows["error"], ":", max_splits=1), 0)
            retry = pa.array(sorted(output.RETRIED_REASONS))
            paths = rows.filter(pc.is_in(reasons, value_set=retry))["path"].combine_chunks()
        else:
            paths = shard_paths(out, shard)
        kept = output.batch_paths(out, shard)
        if len(kept):
            paths = paths.filter(pc.invert(pc.is_in(paths, value_set=kept)))
        for start in range(0, len(paths), EXPAND_ROWS):  # bounded: a shard may hold millions
            chunk = paths.slice(start, EXPAND_ROWS)
            yield pa.table({"path": chunk, "shard": pa.array([shard] * len(chunk), pa.int32())})


def shard_paths(out: Output, shard: int) -> pa.Array:
    """The sorted input paths of a planned shard."""
    table = pq.read_table(out.path(META, "plan", shard_name(shard) + INTERNAL), filesystem=out.fs)
    return table["path"].combine_chunks()
