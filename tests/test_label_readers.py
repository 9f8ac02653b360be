"""A label output opens as it is in pandas, pyarrow and DuckDB, locally and on S3 (SeaweedFS).

Four real outputs of one small input with a broken file (so one row has a null label): local and
S3, each plain and with --partition-by label, labeled once for the module. Every reader must give
back exactly one row per input, with the label dogbread stored; the Hive-aware readers take the
label of a partitioned output from its `label=...` folder (error rows: `label=__error__`), so this
also checks that every row sits in its own folder.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from dogbread import label
from dogbread.config import LabelConfig

pytestmark = pytest.mark.slow

BUCKET = "dogbread-readers"
OUTPUTS = ("local", "local-partitioned", "s3", "s3-partitioned")
PARTITIONED = [name for name in OUTPUTS if name.endswith("-partitioned")]
ERROR_FOLDER = "__error__"  # where error rows sit with --partition-by label (dogbread.output)


@pytest.fixture(scope="module")
def outputs(ray_local, s3_server, synthetic_tree, small_model_dir, tmp_path_factory) -> dict:
    """{name: {"where": path for the readers, "fs": filesystem or None, "stored": {path: label}
    as dogbread reads its files back, "files": every file of the output, relative to it}}."""
    base = tmp_path_factory.mktemp("readers")
    source = base / "in"
    for name in ("bread", "dog"):
        (source / name).mkdir(parents=True)
        for path in sorted(Path(synthetic_tree, name).iterdir())[:12]:
            shutil.copy(path, source / name / path.name)
    (source / "dog" / "empty.jpg").write_bytes(b"")  # an error row, whose label is null
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(source.rglob("*.jpg")):
        key = f"in/{path.relative_to(source).as_posix()}"
        client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
    # The readers get a filesystem built without dogbread.storage, as a user would build one.
    s3 = s3_server.filesystem()

    found = {}
    for name in OUTPUTS:
        on_s3 = name.startswith("s3")
        output = f"s3://{BUCKET}/{name}" if on_s3 else str(base / name)
        config = LabelConfig(
            model=small_model_dir,
            input=f"s3://{BUCKET}/in" if on_s3 else str(source),
            output=output,
            batch_size=8,
            partition_by="label" if name in PARTITIONED else None,
            s3_endpoint=s3_server.endpoint if on_s3 else None,
            report=False,  # not what is tested here
        )
        summary = label.run(config)
        assert (summary["images"], summary["errors"], summary["complete"]) == (
            25,
            {"empty": 1},
            True,
        )
        stored = label.read_labels(output, config.s3_endpoint)
        if on_s3:
            where = f"{BUCKET}/{name}"
            keys = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{name}/")["Contents"]
            # S3 has no folders; a key ending with "/" is a folder marker, not a file.
            files = [k["Key"][len(name) + 1 :] for k in keys if not k["Key"].endswith("/")]
        else:
            where = output
            files = [p.relative_to(output).as_posix() for p in Path(output).rglob("*")]
            files = [f for f in files if Path(output, f).is_file()]
        found[name] = {
            "where": where,
            "fs": s3 if on_s3 else None,
            "stored": {row["path"]: row["label"] for row in stored.to_pylist()},
            "files": files,
        }
    return found


def check(rows: pa.Table, output: dict, hive: bool = False) -> None:
    """One row per input, each with the label the files hold (null for the error row; a Hive
    reader of a partitioned output reads the error rows' folder name instead)."""
    paths, labels = rows["path"].to_pylist(), rows["label"].to_pylist()
    assert len(paths) == len(output["stored"]) == 25
    expected = {p: ERROR_FOLDER if hive and v is None else v for p, v in output["stored"].items()}
    assert dict(zip(paths, labels, strict=True)) == expected
    assert sum(v is None for v in output["stored"].values()) == 1


@pytest.mark.parametrize("name", OUTPUTS)
def test_the_output_is_complete_and_only_its_data_files_lack_a_leading_underscore(outputs, name):
    data = r"label=[^/]+/part-\d{5}\.parquet" if name in PARTITIONED else r"part-\d{5}\.parquet"
    files = outputs[name]["files"]
    assert "_SUCCESS" in files and "_summary.json" in files and "_config.yaml" in files
    assert [f for f in files if re.fullmatch(data, f)], files
    assert [f for f in files if not re.fullmatch(data, f) and not f.startswith("_")] == []
    # A **/*.parquet glob (DuckDB's does not skip `_` folders) finds the data files only.
    assert [f for f in files if f.endswith(".parquet") and not re.fullmatch(data, f)] == []


@pytest.mark.parametrize("name", OUTPUTS)
def test_pandas_reads_every_row(outputs, name):
    output = outputs[name]
    # pandas needs s3fs for s3:// URIs (not installed); it takes a pyarrow filesystem instead.
    frame = pd.read_parquet(output["where"], filesystem=output["fs"])
    rows = pa.Table.from_pandas(frame, preserve_index=False)  # NaN labels become null
    check(rows, output, hive=name in PARTITIONED)


@pytest.mark.parametrize("name", OUTPUTS)
def test_a_pyarrow_dataset_with_default_arguments_reads_every_row(outputs, name):
    output = outputs[name]
    rows = pads.dataset(output["where"], filesystem=output["fs"]).to_table()
    if name in PARTITIONED:  # Hive convention: the label is in the folder names, not the files
        assert "label" not in rows.column_names
        assert sorted(rows["path"].to_pylist()) == sorted(output["stored"])
        rows = pads.dataset(output["where"], filesystem=output["fs"], partitioning="hive")
        check(rows.to_table(), output, hive=True)
    else:
        check(rows, output)


@pytest.mark.parametrize("name", OUTPUTS)
def test_duckdb_reads_every_row(outputs, name):
    output, con = outputs[name], duckdb.connect()
    if output["fs"] is None:
        source = f"read_parquet('{output['where']}/**/*.parquet', hive_partitioning=true)"
    else:
        # DuckDB reads S3 with its httpfs extension, which it downloads on first use: not here
        # (no network). It scans a pyarrow dataset instead, with the same Hive partitioning.
        hive = pads.dataset(output["where"], filesystem=output["fs"], partitioning="hive")
        con.register("dataset", hive)
        source = "dataset"
    # fetchall: DuckDB 2 dropped a relation's fetchone(), and keeps execute()'s result open
    # until it is read to the end.
    ((count, distinct),) = con.execute(
        f"SELECT count(*), count(DISTINCT path) FROM {source}"
    ).fetchall()
    assert count == distinct == 25
    rows = con.sql(f"SELECT path, label FROM {source}").to_arrow_table()
    check(rows, output, hive=name in PARTITIONED)
