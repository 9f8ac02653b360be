"""The work list of `dogbread label`: every input path, read in Ray tasks, never whole in one place.

An input is one of:
- a folder or s3://bucket/prefix of images: listed folder by folder (on S3 a `Delimiter="/"`
  listing per prefix), each batch of folders in a Ray task, so a bucket of millions of keys lists
  in parallel. The driver holds the folder names still to list, never the files;
- a manifest: a .csv/.parquet file with a `path` column or `bucket` and `key` columns (as an S3
  Inventory lists them); a folder or prefix holding only such files; or an S3 Inventory
  `manifest.json` (its CSV or Parquet data files). Each manifest file is read by a Ray task.

Either way the paths flow as Arrow tables (WORK_SCHEMA) through Ray tasks and the object store;
where they go is plan.py's concern.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dogbread import storage
from dogbread.errors import DataError, StorageError, first_line

WORK_SCHEMA = pa.schema([("path", pa.string()), ("hidden", pa.bool_())])
MANIFEST_SUFFIXES = (".csv", ".csv.gz", ".parquet")
INVENTORY_NAME = "manifest.json"
FOLDERS_PER_TASK = 16  # one listing request each; a task's overhead is paid once for them all
LISTINGS_IN_FLIGHT = 32  # listing tasks at once: enough to keep S3 busy, few enough to steer
ROWS_PER_BLOCK = 65_536  # a manifest file's rows go on in blocks of this many


@dataclass(frozen=True)
class WorkList:
    """Where the inputs are listed: a folder to walk, or manifest files to read."""

    source: str  # --input as given
    fs: pafs.FileSystem
    root: str  # the folder (or manifest location) inside fs
    manifests: tuple[str, ...] = ()  # manifest files inside fs; none: walk `root`
    csv_columns: tuple[str, ...] | None = None  # header-less CSV (S3 Inventory): its columns
    url_encoded_keys: bool = False  # S3 Inventory CSV URL-encodes its keys
    cwd: str = ""  # relative local paths in a manifest are relative to the driver's directory

    @property
    def is_manifest(self) -> bool:
        return bool(self.manifests)

    def sources(self) -> tuple[list[Any], int]:
        """(what Ray tasks read the inputs from, the number of rows, estimated for manifests):
        manifest files, or refs of the listing's blocks, which stay in the object store."""
        if self.manifests:
            return list(self.manifests), self.estimated_rows
        return _list_tree(self.fs, self.root)

    def read(self, source: Any) -> Iterator[pa.Table]:
        """A source's rows (WORK_SCHEMA), in tables of at most ROWS_PER_BLOCK: in a Ray task."""
        if isinstance(source, pa.Table):  # a listed block, its ref resolved by Ray
            yield source
            return
        for table in _manifest_tables(self, source):
            paths = _paths(table, self, source)
            yield pa.table({"path": paths, "hidden": np.zeros(len(paths), bool)}, WORK_SCHEMA)

    @functools.cached_property
    def estimated_rows(self) -> int:
        """Rows in the manifests without reading them (Parquet footers, CSV sizes), read once:
        the planner asks twice (whether to plan in the driver, then how many shards)."""
        rows = 0.0
        for path in self.manifests:
            if path.endswith(".parquet"):
                with self.fs.open_input_file(path) as f:
                    rows += pq.ParquetFile(f).metadata.num_rows
            else:
                size = self.fs.get_file_info(path).size or 0
                rows += size / (20 if path.endswith(".gz") else 60)  # bytes a row, roughly
        return int(rows)


def resolve(source: str, s3_endpoint: str | None) -> WorkList:
    """The work list of --input `source`; raises DataError/StorageError with one line."""
    fs, root = storage.resolve(source, s3_endpoint)
    cwd = os.getcwd()
    try:
        if posixpath.basename(root) == INVENTORY_NAME:
            return _inventory(source, fs, root, cwd)
        if root.lower().endswith(MANIFEST_SUFFIXES):
            if fs.get_file_info(root).type != pafs.FileType.File:
                raise DataError(f"manifest not found: {source}")
            return WorkList(source, fs, root, (root,), cwd=cwd)
        _check_folder(source, fs, root)
        files = _manifest_folder(fs, root)
        if not files and not _has_a_visible_file(fs, root):  # said before Ray starts
            raise DataError(f"no files to label in {source}")
        return WorkList(source, fs, root, files, cwd=cwd)
    except OSError as exc:
        raise StorageError(f"cannot read {source}: {first_line(exc)}") from None


def _check_folder(source: str, fs: pafs.FileSystem, root: str) -> None:
    if isinstance(fs, pafs.S3FileSystem):
        bucket = root.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise DataError(f"bucket not found: s3://{bucket}")
    elif fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise DataError(f"input not found: {source}")


def _has_a_visible_file(fs: pafs.FileSystem, folder: str) -> bool:
    """Whether any file below `folder` has no hidden name; stops at the first one found."""
    if isinstance(fs, pafs.S3FileSystem):
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        entries = [(i.path, i.type == pafs.FileType.Directory) for i in infos]
    else:
        with os.scandir(folder) as found:  # a link to a folder counts as a file: no loops
            entries = [(e.path, e.is_dir(follow_symlinks=False)) for e in found]
    visible = [(p, is_dir) for p, is_dir in entries if not posixpath.basename(p).startswith(".")]
    return any(not is_dir for _, is_dir in visible) or any(
        _has_a_visible_file(fs, path) for path, is_dir in visible if is_dir
    )


def _manifest_folder(fs: pafs.FileSystem, root: str) -> tuple[str, ...]:
    """The manifest files of a folder that holds nothing else (no subfolders), else ()."""
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    visible = [i for i in infos if not i.base_name.startswith((".", "_"))]
    if not visible or any(
        i.type != pafs.FileType.File or not i.base_name.lower().endswith(MANIFEST_SUFFIXES)
        for i in visible
    ):
        return ()
    return tuple(sorted(i.path for i in visible))


def _inventory(source: str, fs: pafs.FileSystem, root: str, cwd: str) -> WorkList:
    """An S3 Inventory manifest.json: its data files, found beside it as S3 Inventory puts them."""
    try:
        spec = json.loads(storage.read_bytes(fs, root))
        file_format, keys = spec["fileFormat"].upper(), [f["key"] for f in spec["files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{source} is not an S3 Inventory manifest.json: {exc}") from None
    if file_format not in ("CSV", "PARQUET"):
        raise DataError(f"{source}: inventory format {file_format} is not supported (CSV, Parquet)")
    if isinstance(fs, pafs.S3FileSystem):  # keys are keys of the destination bucket
        bucket = spec.get("destinationBucket", "").rsplit(":", 1)[-1] or root.split("/", 1)[0]
        files = tuple(f"{bucket}/{key}" for key in keys)
    else:  # a local copy: keys are relative to the folder that holds the whole inventory
        files = tuple(_find_below_ancestor(fs, posixpath.dirname(root), key) for key in keys)
    columns = None
    if file_format == "CSV":
        columns = tuple(c.strip().lower() for c in spec.get("fileSchema", "").split(","))
        if not {"bucket", "key"} <= set(columns):
            raise DataError(f"{source}: fileSchema names no Bucket and Key columns")
    return WorkList(source, fs, root, files, columns, url_encoded_keys=columns is not None, cwd=cwd)


def _find_below_ancestor(fs: pafs.FileSystem, folder: str, key: str) -> str:
    start = folder
    while True:
        candidate = posixpath.join(folder, key)
        if fs.get_file_info(candidate).type == pafs.FileType.File:
            return candidate
        if folder in ("/", ""):
            raise DataError(f"inventory file {key} not found above {start}")
        folder = posixpath.dirname(folder)


# --- reading manifests (in Ray tasks) --------------------------------------------------------


def _manifest_tables(work: WorkList, file: str) -> Any:
    """The manifest file's rows in tables of at most ROWS_PER_BLOCK, path/bucket/key as text."""
    wanted = ("path", "bucket", "key")
    try:
        if file.endswith(".parquet"):
            with work.fs.open_input_file(file) as f:
                parquet = pq.ParquetFile(f)
                columns = [c for c in parquet.schema_arrow.names if c.lower() in wanted]
                for batch in parquet.iter_batches(ROWS_PER_BLOCK, columns=columns):
                    yield pa.Table.from_batches([batch])
            return
        read = pacsv.ReadOptions(column_names=work.csv_columns, block_size=8 << 20)
        types = pacsv.ConvertOptions(
            column_types=dict.fromkeys([*wanted, "Bucket", "Key"], pa.string()),
            include_columns=None,
        )
        with work.fs.open_input_stream(file) as stream:  # .gz is decompressed by pyarrow
            for batch in pacsv.open_csv(stream, read_options=read, convert_options=types):
                yield pa.Table.from_batches([batch])
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read manifest {file}: {first_line(exc)}") from None


def _paths(table: pa.Table, work: WorkList, file: str) -> pa.Array:
    columns = {name.lower(): table[name] for name in table.column_names}
    if "path" in columns:
        paths = columns["path"].cast(pa.string())
        local = pc.invert(pc.starts_with(paths, "s3://"))
        relative = pc.and_(local, pc.invert(pc.starts_with(paths, "/")))
        absolute = pc.binary_join_element_wise(work.cwd, paths, "/")
        paths = pc.if_else(pc.fill_null(relative, False), absolute, paths)
    elif {"bucket", "key"} <= set(columns):
        key = columns["key"].cast(pa.string())
        if work.url_encoded_keys:
            key = pa.array([None if k is None else unquote_plus(k) for k in key.to_pylist()])
        paths = pc.binary_join_element_wise(
            "s3://", columns["bucket"].cast(pa.string()), "/", key, ""
        )
    else:
        raise DataError(f"manifest {file} needs a `path` column, or `bucket` and `key` columns")
    return paths.combine_chunks() if isinstance(paths, pa.ChunkedArray) else paths


# --- listing folders (in Ray tasks) ----------------------------------------------------------


def _list_tree(fs: pafs.FileSystem, root: str) -> tuple[list[Any], int]:
    """(object refs of WORK_SCHEMA blocks: every file below root, listed breadth first; how
    many files). The driver keeps the folders still to list (and, locally, the real paths of
    those walked, so that a link pointing up the tree is walked once); the files stay in the
    object store."""
    import ray

    list_folders = ray.remote(num_cpus=0.25, num_returns=2)(_list_folders)
    blocks, frontier, seen, running, files = [], [root], {root}, {}, 0
    while frontier or running:
        while frontier and len(running) < LISTINGS_IN_FLIGHT:
            batch, frontier = frontier[:FOLDERS_PER_TASK], frontier[FOLDERS_PER_TASK:]
            block, found = list_folders.remote(fs, root, batch)
            running[found] = block
        ready, _ = ray.wait(list(running), num_returns=1)
        blocks.append(running.pop(ready[0]))
        subfolders, count = ray.get(ready[0])
        files += count
        for folder, real in subfolders:
            if real not in seen:
                seen.add(real)
                frontier.append(folder)
    return blocks, files


def _list_folders(fs: pafs.FileSystem, root: str, folders: list[str]) -> tuple[pa.Table, tuple]:
    """(the files directly in `folders`, ([(subfolder, its real path)], how many files))."""
    files: list[str] = []
    subfolders: list[tuple[str, str]] = []
    for folder in folders:
        try:
            if isinstance(fs, pafs.S3FileSystem):
                infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
                for info in infos:
                    if info.type == pafs.FileType.Directory:
                        subfolders.append((info.path, info.path))
                    elif info.type == pafs.FileType.File:
                        files.append("s3://" + info.path)
            else:
                _scan_local(folder, files, subfolders)
        except OSError as exc:
            raise StorageError(f"cannot list {folder}: {first_line(exc)}") from None
    hidden = [_hidden(p, root) for p in files]
    table = pa.table({"path": pa.array(files, pa.string()), "hidden": hidden}, WORK_SCHEMA)
    return table, (subfolders, len(files))


def _scan_local(folder: str, files: list[str], subfolders: list[tuple[str, str]]) -> None:
    # A broken link is listed as a file (its read fails, so it gets an error row, rather than
    # vanishing); a link to a folder is followed.
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                subfolders.append((entry.path, os.path.realpath(entry.path)))
            else:
                files.append(entry.path)


def _hidden(path: str, root: str) -> bool:
    relpath = path.removeprefix("s3://")[len(root) :]
    return any(part.startswith(".") for part in relpath.split("/"))
