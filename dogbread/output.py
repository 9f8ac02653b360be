"""A label output folder: its layout, how a shard is committed, and how it is read back.

    OUTPUT/part-00042.parquet              a shard's rows (with --partition-by label: one file
    OUTPUT/label=dog/part-00042.parquet    per label in Hive folders, error rows in label=__error__)
    OUTPUT/_config.yaml  _summary.json  _report.html  _SUCCESS (written last, on a complete run)
    OUTPUT/_dogbread/plan.json             the shards, written once by the first run (plan.py)
    OUTPUT/_dogbread/plan/shard-00042.pq   a shard's input paths, sorted
    OUTPUT/_dogbread/batches/shard-00042/  labeled batches of a shard not yet committed
    OUTPUT/_dogbread/shards/shard-00042.json     a committed shard's marker: its counts

Everything that is not data starts with `_`, so pandas, pyarrow, DuckDB, Spark and Athena open
the folder as it is; dogbread's own Parquet files are named `.pq`, so that a `**/*.parquet` glob
(DuckDB's, which does not skip `_` folders) finds the data files only. Partitioned data files
leave the label out, as Hive does: the folder holds it.

A shard is committed by `commit_shard`: its batches (and, when rows are retried, its earlier rows)
become its data files, then its marker is written, then the batches are deleted. Each step can be
repeated after a crash and gives the same files, so a path never has two rows once a shard is
committed, and never in two committed shards.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dogbread import storage
from dogbread.errors import ConfigError, StorageError, first_line

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
# Error rows' folder with --partition-by label. Not Hive's __HIVE_DEFAULT_PARTITION__ (a null):
# pandas.read_parquet fails on a null partition value ("Cannot yet unify dictionaries with nulls").
ERROR_PARTITION = "__error__"
INTERNAL = ".pq"  # the suffix of dogbread's own Parquet files: plan shards and kept batches
META, CONFIG, SUMMARY, REPORT, SUCCESS = (
    "_dogbread",
    "_config.yaml",
    "_summary.json",
    "_report.html",
    "_SUCCESS",
)
# A read that failed (network, throttling, a file gone for a moment) may work next time: a rerun
# labels these rows again. Every other reason (not_an_image, truncated, too_large...) is final.
RETRIED_REASONS = frozenset({"unreadable"})
ROW_GROUP_ROWS = 131_072  # ~4 MiB: engines read row groups in parallel and skip them by stats


@dataclass(frozen=True)
class Output:
    """A label output location, resolved once: its filesystem, its path there and its URI."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @classmethod
    def at(cls, uri: str, s3_endpoint: str | None = None) -> Output:
        fs, root = storage.resolve(uri, s3_endpoint)
        return cls(fs, root, storage.to_uri(fs, root))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def read_json(self, *parts: str) -> Any:
        try:
            return json.loads(storage.read_bytes(self.fs, self.path(*parts)))
        except FileNotFoundError:
            return None

    def write(self, relpath: str, data: bytes) -> None:
        storage.write_atomic(self.fs, self.path(relpath), data)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def data_file_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def write_table(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """A Parquet file of the output's row groups, written whole or not at all."""
    storage.write_atomic(fs, path, table, ROW_GROUP_ROWS)


# --- batches: labeled, not yet committed --------------------------------------------------------


def write_batch(out: Output, shard: int, table: pa.Table) -> None:
    """Keep a labeled batch of one shard until the shard is committed.

    Named after its rows: a batch that Ray retries after its actor died replaces its own file.
    """
    digest = hashlib.sha1("\n".join(table["path"].to_pylist()).encode()).hexdigest()[:16]
    name = f"batch-{digest}-n{table.num_rows}{INTERNAL}"
    write_table(out.fs, out.path(META, "batches", shard_name(shard), name), table)


def batch_rows(out: Output) -> Counter[int]:
    """Rows in the batches kept for each shard, from the file names alone."""
    selector = pafs.FileSelector(out.path(META, "batches"), recursive=True, allow_not_found=True)
    rows: Counter[int] = Counter()
    for info in out.fs.get_file_info(selector):
        found = re.fullmatch(r"batch-[0-9a-f]{16}-n(\d+)\.pq", info.base_name)
        if info.type == pafs.FileType.File and found:
            rows[int(posixpath.basename(posixpath.dirname(info.path))[6:])] += int(found[1])
    return rows


def batch_paths(out: Output, shard: int) -> pa.Array:
    """The paths of a shard's kept batches."""
    return _read_batches(out, _batch_files(out, shard), ["path"])["path"].combine_chunks()


def _batch_files(out: Output, shard: int) -> list[str]:
    folder = out.path(META, "batches", shard_name(shard))
    infos = out.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.base_name.startswith("batch-"))


def _read_batches(out: Output, files: list[str], columns: list[str] | None = None) -> pa.Table:
    if not files:
        return OUTPUT_SCHEMA.empty_table().select(columns or OUTPUT_SCHEMA.names)
    dataset = pads.dataset(files, filesystem=out.fs, schema=OUTPUT_SCHEMA)
    return dataset.to_table(columns=columns)


def data_dataset(out: Output, files: list[str]) -> pads.Dataset:
    """The output's data files as one dataset of OUTPUT_SCHEMA (in partitioned files the label
    is the folder's, Hive-style; error rows' `__error__` is left to the caller)."""
    hive = pads.partitioning(pa.schema([OUTPUT_SCHEMA.field("label")]), flavor="hive")
    return pads.dataset(
        files,
        filesystem=out.fs,
        schema=OUTPUT_SCHEMA,
        partitioning=hive,
        partition_base_dir=out.root,
    )


def _read_data(out: Output, files: list[str], columns: list[str] | None = None) -> pa.Table:
    """Rows of data files, with a null label on error rows as in unpartitioned files."""
    if not files:
        return OUTPUT_SCHEMA.empty_table().select(columns or OUTPUT_SCHEMA.names)
    table = data_dataset(out, files).to_table(columns=columns)
    if "label" in table.column_names:
        labels = table["label"]
        nulls = pa.nulls(len(labels), pa.string())
        labels = pc.if_else(pc.equal(labels, ERROR_PARTITION), nulls, labels)
        table = table.set_column(table.column_names.index("label"), "label", labels)
    return table


# --- committing a shard -------------------------------------------------------------------------


def commit_shard(
    out: Output, shard: int, images: int, partition_by: str | None, model_version: str
) -> dict[str, Any]:
    """Turn a shard's batches (and its earlier rows, where some are retried) into its data files
    and marker; return the marker. Raises RuntimeError if the shard does not have `images` rows."""
    marker = read_marker(out, shard) or {}
    earlier = [out.path(f) for f in marker.get("files", {})]
    batches = _batch_files(out, shard)
    rows = _latest_per_path(
        pa.concat_tables([_read_data(out, earlier), _read_batches(out, batches)])
    )
    if rows.num_rows != images:
        raise RuntimeError(f"shard {shard} has {rows.num_rows} rows for {images} inputs")
    groups = _groups(rows, partition_by)
    name = data_file_name(shard)
    files = {posixpath.join(folder, name) if folder else name: t for folder, t in groups.items()}
    old = marker.get("files", {})
    # Files that lose rows go first: a crash in between leaves a row missing (and the shard
    # uncommitted, so the next run commits it again), never a row in two files.
    for relpath in old.keys() - files.keys():
        out.fs.delete_file(out.path(relpath))
    for relpath in sorted(files, key=lambda f: files[f].num_rows - old.get(f, 0)):
        write_table(out.fs, out.path(relpath), files[relpath])
    counts = count_rows(rows)
    marker = {
        "shard": shard,
        "rows": rows.num_rows,
        "labels": by_kind(counts, "label"),
        "errors": by_kind(counts, "error"),
        "retry": sum(
            n for reason, n in by_kind(counts, "error").items() if reason in RETRIED_REASONS
        ),
        "files": {relpath: table.num_rows for relpath, table in files.items()},
        "model_version": model_version,
        "committed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    out.write(
        posixpath.join(META, "shards", shard_name(shard) + ".json"), json.dumps(marker).encode()
    )
    if batches:  # our own files, no longer needed
        out.fs.delete_dir(out.path(META, "batches", shard_name(shard)))
    return marker


def _latest_per_path(rows: pa.Table) -> pa.Table:
    """One row per path, the most recently labeled one, sorted by path."""
    rows = rows.sort_by([("path", "ascending"), ("labeled_at", "descending")])
    paths = rows["path"].combine_chunks()
    if len(paths) < 2:
        return rows
    first = np.ones(len(paths), bool)
    first[1:] = pc.not_equal(paths[1:], paths[:-1]).to_numpy(zero_copy_only=False)
    return rows.filter(pa.array(first))


def _groups(rows: pa.Table, partition_by: str | None) -> dict[str, pa.Table]:
    """{folder relative to the output ("" for its root): rows} for the shard's data files."""
    if partition_by != "label":
        return {"": rows}
    labels = rows["label"].fill_null(ERROR_PARTITION)  # class names never take this name
    data = rows.drop_columns(["label"])  # the folder holds it, as Hive, Spark and pandas expect
    return {
        f"label={quote(value, safe='')}": data.filter(pc.equal(labels, value))
        for value in sorted(pc.unique(labels).to_pylist())
    }


def read_shard_rows(out: Output, marker: dict[str, Any], columns: list[str]) -> pa.Table:
    """The rows of a committed shard's data files."""
    return _read_data(out, [out.path(f) for f in marker["files"]], columns)


def read_marker(out: Output, shard: int) -> dict[str, Any] | None:
    return out.read_json(META, "shards", shard_name(shard) + ".json")


def read_markers(out: Output) -> dict[int, dict[str, Any]]:
    """Every committed shard's marker, read in threads (hundreds of small files)."""
    selector = pafs.FileSelector(out.path(META, "shards"), allow_not_found=True)
    names = [i.base_name for i in out.fs.get_file_info(selector)]
    shards = [int(n[6:11]) for n in names if re.fullmatch(r"shard-\d{5}\.json", n)]
    with ThreadPoolExecutor(16) as pool:
        return dict(zip(shards, pool.map(lambda s: read_marker(out, s), shards), strict=True))


# --- counting and reading back ------------------------------------------------------------------


def count_rows(table: pa.Table) -> Counter[str]:
    """{"label\\t<label>" or "error\\t<reason>": rows}."""
    reasons = pc.list_element(pc.split_pattern(table["error"], ":", max_splits=1), 0)
    counts: Counter[str] = Counter()
    for kind, column in (("label", table["label"]), ("error", reasons)):
        for item in pc.value_counts(column.drop_null()).to_pylist():
            counts[f"{kind}\t{item['values']}"] += item["counts"]
    return counts


def by_kind(counts: Counter[str], kind: str) -> dict[str, int]:
    """count_rows' counts of one kind ("label" or "error"), by label or reason code."""
    return {k.split("\t", 1)[1]: n for k, n in sorted(counts.items()) if k.startswith(kind + "\t")}


def data_files(out: Output) -> list[str]:
    """Every Parquet data file of the output (not under `_` or `.` names), sorted."""
    selector = pafs.FileSelector(out.root, recursive=True, allow_not_found=True)
    return sorted(
        i.path
        for i in out.fs.get_file_info(selector)
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not any(p.startswith(("_", ".")) for p in i.path[len(out.root) :].split("/"))
    )


def legacy_parts(out: Output, model_version: str) -> list[str]:
    """Parts written by dogbread before shards (one per batch), which a run still resumes from;
    refused if of another model_version (that version refused to mix them, so one file tells).

    Called only where no plan exists: a planned output's data files come after its plan."""
    parts = [f for f in data_files(out) if posixpath.basename(f).startswith("part-")]
    if not parts:
        return parts
    try:
        versions = pq.read_table(parts[0], filesystem=out.fs, columns=["model_version"])
    except (OSError, pa.ArrowInvalid) as exc:
        line = first_line(exc)
        raise StorageError(f"cannot read the parts already in {out.uri}: {line}") from None
    others = set(pc.unique(versions["model_version"]).to_pylist()) - {model_version}
    if others:
        raise ConfigError(
            f"{out.uri} holds labels of model_version {', '.join(sorted(others))}, not "
            f"{model_version}: label into another output"
        )
    return parts


def set_aside_legacy_sidecars(out: Output) -> None:
    """Move the config.yaml, summary.json and report.html that dogbread wrote beside its parts
    before shards (they stop pandas and pyarrow from opening the folder) into `_dogbread/`."""
    for name in ("config.yaml", "summary.json", "report.html"):
        if out.fs.get_file_info(out.path(name)).type == pafs.FileType.File:
            out.fs.create_dir(out.path(META), recursive=True)
            out.fs.move(out.path(name), out.path(META, f"before-shards-{name}"))


def read_labels(output: str, s3_endpoint: str | None = None) -> pa.Table:
    """Every row a label job wrote into `output` (a convenience for small outputs)."""
    out = Output.at(output, s3_endpoint)
    return _read_data(out, data_files(out))
