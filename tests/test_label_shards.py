"""`dogbread label` at bucket scale, in miniature: manifests of many files, S3 Inventory, shards
and their markers, --dry-run, retried reads and outputs of the version before shards."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import shutil
from pathlib import Path
from urllib.parse import quote_plus

import pandas
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dogbread import label, plan, worklist
from dogbread.config import LabelConfig
from dogbread.output import OUTPUT_SCHEMA, Output

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(synthetic_tree, tmp_path_factory) -> list[str]:
    """40 good JPEGs, in sorted order."""
    root = tmp_path_factory.mktemp("shard-images")
    for name in ("bread", "dog"):
        shutil.copytree(Path(synthetic_tree, name), root / name)
    return sorted(str(p) for p in root.rglob("*.jpg"))[:40]


def rows_of(out: Path) -> pa.Table:
    return label.read_labels(str(out))


def run(model: str, source: str, out: Path, **changes) -> dict:
    config = LabelConfig(model=model, input=source, output=str(out), batch_size=4, **changes)
    return label.run(config)


def test_a_folder_of_manifests_is_cut_into_shards_with_duplicates_dropped(
    ray_local, images, small_model_dir, tmp_path
):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "a.csv").write_text("path\n" + "\n".join(images[:25]) + "\n")
    pq.write_table(pa.table({"path": images[20:]}), manifests / "b.parquet")  # 5 paths again
    (manifests / "_SUCCESS").write_text("")  # a writer's marker: not a manifest, not an error
    out = tmp_path / "out"

    dry = run(small_model_dir, str(manifests), out, rows_per_file=10, dry_run=True)
    assert (dry["images"], dry["to_label"], dry["already_done"]) == (40, 40, 0)
    assert dry["duplicate_paths"] == 5 and dry["shards"] >= 3 and not dry["planned_before"]
    assert not out.exists()  # a dry run writes nothing

    summary = run(small_model_dir, str(manifests), out, rows_per_file=10)
    table = rows_of(out)
    assert sorted(table["path"].to_pylist()) == images
    assert summary["duplicate_paths"] == 5 and summary["shards"] == dry["shards"]
    markers = [json.loads(p.read_text()) for p in (out / "_dogbread" / "shards").iterdir()]
    assert sum(m["rows"] for m in markers) == 40 and len(markers) == summary["shards"]
    assert sorted(p.name for p in out.glob("part-*.parquet")) == sorted(
        f"part-{m['shard']:05d}.parquet" for m in markers
    )
    for marker in markers:  # a shard's file holds its rows, sorted, with its marker's counts
        paths = pq.read_table(out / f"part-{marker['shard']:05d}.parquet")["path"].to_pylist()
        assert paths == sorted(paths) and len(paths) == marker["rows"]
    assert sum(summary["labels"].values()) == 40

    again = run(small_model_dir, str(manifests), out, rows_per_file=10, dry_run=True)
    assert (again["already_done"], again["to_label"], again["planned_before"]) == (40, 0, True)


def test_an_s3_inventory_manifest_lists_its_data_files(ray_local, tmp_path):
    """A local copy of an inventory as S3 writes one: gzipped CSV without a header, URL-encoded
    keys, files named in manifest.json relative to the destination bucket."""
    keys = [f"photos/day {i % 3}/IMG #{i}+.jpg" for i in range(30)]
    data = tmp_path / "inventory" / "src-bucket" / "config" / "data"
    data.mkdir(parents=True)
    files = []
    for n, chunk in enumerate((keys[:20], keys[15:])):  # 5 keys twice, as versions would be
        name = f"src-bucket/config/data/part-{n}.csv.gz"
        lines = "".join(f'"src-bucket","{quote_plus(k)}","123"\n' for k in chunk)
        (tmp_path / "inventory" / name).write_bytes(gzip.compress(lines.encode()))
        files.append({"key": name, "size": 1, "MD5checksum": "x"})
    stamp = tmp_path / "inventory" / "src-bucket" / "config" / "2026-12-06T01-00Z"
    stamp.mkdir()
    spec = {"fileFormat": "CSV", "fileSchema": "Bucket, Key, Size", "files": files}
    spec["destinationBucket"] = "arn:aws:s3:::inventory"
    (stamp / "manifest.json").write_text(json.dumps(spec))

    work = worklist.resolve(str(stamp / "manifest.json"), None)
    out = Output.at(str(tmp_path / "out"))
    shards = plan.make(work, out, [], "v1", rows_per_file=1000, write=True)
    assert (shards.images, shards.duplicate_paths, shards.on_s3) == (30, 5, True)
    paths = plan.shard_paths(out, next(iter(shards.shards))).to_pylist()
    assert paths == sorted(f"s3://src-bucket/{k}" for k in keys)


def test_a_failed_read_is_retried_by_a_rerun_and_keeps_one_row(
    ray_local, images, small_model_dir, tmp_path
):
    late = tmp_path / "late" / "photo.jpg"  # listed, but not there yet: its read fails
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "\n".join([*images[:10], str(late)]) + "\n")
    out = tmp_path / "out"
    first = run(small_model_dir, str(manifest), out, partition_by="label")
    assert first["errors"] == {"unreadable": 1} and (out / "_SUCCESS").exists()
    assert list(out.glob("label=__error__/*.parquet"))

    late.parent.mkdir()
    shutil.copy(images[0], late)
    second = run(small_model_dir, str(manifest), out, partition_by="label")
    assert second["labeled"] == 1 and second["errors"] == {}
    assert sum(second["labels"].values()) == 11
    table = rows_of(out)
    assert table.num_rows == 11 and len(set(table["path"].to_pylist())) == 11
    row = next(r for r in table.to_pylist() if r["path"] == str(late))
    assert row["error"] is None and row["label"] in ("bread", "dog")
    assert not list(out.glob("label=__error__/*.parquet"))  # the row moved, not copied


def test_an_output_of_the_version_before_shards_resumes(
    ray_local, images, small_model_dir, tmp_path
):
    from dogbread.model import ModelCard

    card = ModelCard.from_json(Path(small_model_dir, "model_card.json").read_text())
    out = tmp_path / "out"
    out.mkdir()
    now = dt.datetime.now(dt.UTC)
    old = [
        {"path": p, "label": "dog", "score": 0.9, "probabilities": [0.1, 0.9]}
        | {"model_version": card.model_version, "error": None, "labeled_at": now}
        for p in images[:12]
    ]
    for i in (0, 6):  # two parts named as that version named them: part-<run>-<hash>.parquet
        name = f"part-20261206T010203Z-abcdef-{i:016x}.parquet"
        pq.write_table(pa.Table.from_pylist(old[i : i + 6], OUTPUT_SCHEMA), out / name)
    (out / "config.yaml").write_text("# dogbread LabelConfig\n")  # its sidecars, as it wrote them
    (out / "summary.json").write_text("{}")
    summary = run(small_model_dir, str(Path(images[0]).parents[1]), out)
    assert (summary["images"], summary["already_done"], summary["labeled"]) == (120, 12, 108)
    assert summary["labels"]["dog"] >= 12  # the old rows count
    table = pandas.read_parquet(out)  # its old sidecars were set aside, under _dogbread/
    assert len(table) == 120 and table["path"].nunique() == 120
    assert (out / "_dogbread" / "before-shards-config.yaml").exists()
    table = rows_of(out)
    kept = {r["path"]: r for r in table.to_pylist() if r["path"] in images[:12]}
    assert all(r["labeled_at"] == now and r["score"] == pytest.approx(0.9) for r in kept.values())
