"""`dogbread label` from S3 to S3 against a real SeaweedFS server (the `s3_server` fixture)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from dogbread import label
from dogbread.config import LabelConfig
from dogbread.errors import DataError, StorageError

BUCKET = "dogbread-label"
ODD_KEY = "photos/odd names/a dog #1+2.jpg"  # spaces, '#' and '+' must round-trip


@pytest.fixture(scope="module")
def bucket(s3_server, synthetic_tree, small_model_dir) -> dict:
    """photos/ with 20 good images, one with an awkward key, 2 bad ones and a hidden one."""
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    good = []
    for name in ("bread", "dog"):
        for path in sorted(Path(synthetic_tree, name).iterdir())[:10]:
            key = f"photos/{name}/{path.name}"
            client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
            good.append(key)
    a_dog = next(Path(synthetic_tree, "dog").iterdir()).read_bytes()
    client.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=a_dog)
    good.append(ODD_KEY)
    client.put_object(Bucket=BUCKET, Key="photos/bad/empty.jpg", Body=b"")
    client.put_object(Bucket=BUCKET, Key="photos/bad/readme.png", Body=b"hello\n")
    client.put_object(Bucket=BUCKET, Key="photos/.keep", Body=b"")
    for name in ("model.keras", "model_card.json"):
        body = Path(small_model_dir, name).read_bytes()
        client.put_object(Bucket=BUCKET, Key=f"models/small/{name}", Body=body)
    return {
        "good": good,
        "bad": {"photos/bad/empty.jpg": "empty", "photos/bad/readme.png": "not_an_image"},
    }


def s3_keys(client, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in listing)


def s3_parts(client, prefix: str) -> list[str]:
    """The data files under `prefix` (dogbread's own files are under names starting with _)."""
    return [k for k in s3_keys(client, prefix) if k.endswith(".parquet") and "/_" not in k]


def test_label_s3_to_s3(ray_local, s3_server, bucket, capfd):
    output = f"s3://{BUCKET}/labels/run1"
    config = LabelConfig(
        model=f"s3://{BUCKET}/models/small",
        input=f"s3://{BUCKET}/photos",
        output=output,
        batch_size=8,
        partition_by="label",
        s3_endpoint=s3_server.endpoint,
    )
    summary = label.run(config)
    assert summary["images"] == summary["labeled"] == 23
    assert summary["skipped_hidden"] == 1
    assert summary["errors"] == {"empty": 1, "not_an_image": 1}

    # Read back with pyarrow alone, through a filesystem built independently of dogbread.
    dataset = pads.dataset(
        f"{BUCKET}/labels/run1", filesystem=s3_server.filesystem(), partitioning="hive"
    )
    table = dataset.to_table()
    assert table.num_rows == 23
    assert table.schema.field("probabilities").type == pa.list_(pa.float32())
    rows = {r["path"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(f"s3://{BUCKET}/{k}" for k in [*bucket["good"], *bucket["bad"]])
    for key in bucket["good"]:
        assert rows[f"s3://{BUCKET}/{key}"]["label"] in ("bread", "dog")
    for key, reason in bucket["bad"].items():
        row = rows[f"s3://{BUCKET}/{key}"]
        # Partitioned: the label is the folder's, and error rows sit in label=__error__.
        assert row["error"].startswith(f"{reason}: ") and row["label"] == "__error__"

    # Running again adds nothing.
    client = s3_server.client()
    parts = s3_parts(client, "labels/run1/")
    assert parts and all("/label=" in p for p in parts)
    again = label.run(config)
    assert (again["labeled"], again["already_done"]) == (0, 23)
    assert s3_parts(client, "labels/run1/") == parts

    # The secret key is nowhere: not in the outputs, not in what was printed or logged.
    secret = s3_server.secret_key.encode()
    captured = capfd.readouterr()
    assert secret not in (captured.out + captured.err).encode()
    keys = s3_keys(client, "labels/run1/")  # data, sidecars, and dogbread's plan and markers
    assert {"labels/run1/_summary.json", "labels/run1/_config.yaml", *parts} <= set(keys)
    for key in keys:
        assert secret not in client.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key


def test_manifest_of_bucket_and_key_columns(ray_local, s3_server, bucket, tmp_path):
    keys = [bucket["good"][0], ODD_KEY, "photos/not-there.jpg"]
    manifest = tmp_path / "inventory.parquet"
    pq.write_table(pa.table({"bucket": [BUCKET] * 3, "key": keys, "size": [1, 2, 3]}), manifest)
    output = f"s3://{BUCKET}/labels/from-manifest"
    summary = label.run(
        LabelConfig(
            model=f"s3://{BUCKET}/models/small",
            input=str(manifest),
            output=output,
            s3_endpoint=s3_server.endpoint,
        )
    )
    assert summary["images"] == 3 and summary["errors"] == {"unreadable": 1}
    rows = {r["path"]: r for r in label.read_labels(output, s3_server.endpoint).to_pylist()}
    assert sorted(rows) == sorted(f"s3://{BUCKET}/{k}" for k in keys)
    assert rows[f"s3://{BUCKET}/{ODD_KEY}"]["label"] in ("bread", "dog")


def test_s3_mistakes_fail_before_ray_work(s3_server, bucket, small_model_dir, monkeypatch):
    monkeypatch.setattr(label, "_label", lambda *a: pytest.fail("Ray work started"))
    base = {"model": small_model_dir, "s3_endpoint": s3_server.endpoint}
    empty = LabelConfig(**base, input=f"s3://{BUCKET}/nothing-here", output=f"s3://{BUCKET}/o")
    with pytest.raises(DataError, match="no files"):
        label.run(empty)
    no_bucket = LabelConfig(
        **base, input=f"s3://{BUCKET}/photos", output="s3://no-such-bucket-here/out"
    )
    with pytest.raises(StorageError):
        label.run(no_bucket)
