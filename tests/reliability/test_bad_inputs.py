"""Bad inputs: what dogbread promises when the images are not what they should be.

The catalog (tests/reliability/catalog.py) holds, in ONE folder labeled by ONE `dogbread label`
run: a zero-byte file, a truncated JPEG, random bytes named .jpg, a text file named .png, a PNG
with alpha, a palette PNG, a 16-bit grayscale PNG, a CMYK JPEG, a progressive JPEG, a JPEG with
EXIF orientation 6, an animated GIF, a WebP, a real 30000x30000 PNG (900 M pixels in 110 KB),
names with spaces, unicode, '#', '%' and '+', a nested subfolder and a symlink.

Promises:
1. Every bad input gets exactly one row (a label, or an error with its reason) and the job
   exits 0.
2. The summary's counts match the rows.
3. An EXIF-rotated JPEG is labeled as if it were upright.
4. A decompression bomb is refused as too_large without being decoded: fast, in little memory.
5. Awkward names, nested folders and symlinks come back as the very paths that were listed.
6. The same names as S3 keys round-trip through a real S3 server.
7. Training skips the unreadable images of such a tree and counts them.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from .catalog import (
    EXIF_ROTATED,
    EXIF_SIDEWAYS,
    EXIF_UPRIGHT,
    ODD_NAMES,
    SYMLINK,
    SYMLINK_TARGET,
    bomb_png,
)
from .conftest import BUCKET, PROJECT, read_json_object, read_rows

pytestmark = pytest.mark.slow

GiB = 1024**3


@pytest.fixture(scope="module")
def rows(catalog_run) -> dict[str, dict]:
    run = catalog_run["run"]
    assert run.returncode == 0, run.explain()
    table = read_rows(catalog_run["out"])
    paths = table["path"].to_pylist()
    assert len(paths) == len(set(paths)), "a path has more than one row"
    return {row["path"]: row for row in table.to_pylist()}


def test_every_bad_input_gets_exactly_one_row_and_the_job_exits_0(catalog_run, rows):
    assert catalog_run["run"].returncode == 0
    expected = catalog_run["expected"]
    assert sorted(rows) == sorted(expected)
    for path, reason in expected.items():
        row = rows[path]
        if reason is None:
            assert row["error"] is None, (path, row["error"])
            assert row["label"] in catalog_run["class_names"], path
            assert len(row["probabilities"]) == 2 and row["score"] == max(row["probabilities"])
        else:
            assert row["error"].startswith(f"{reason}: "), (path, row["error"])
            assert "\n" not in row["error"]
            assert row["label"] is None and row["score"] is None and row["probabilities"] is None


def test_the_summary_counts_match_the_rows(catalog_run, rows):
    out, run = catalog_run["out"], catalog_run["run"]
    summary = json.loads((out / "_summary.json").read_text())
    printed, _ = json.JSONDecoder().raw_decode(run.stdout[run.stdout.index("{") :])
    assert printed == summary
    reasons = Counter(r for r in catalog_run["expected"].values() if r is not None)
    labels = Counter(row["label"] for row in rows.values() if row["label"] is not None)
    assert summary["images"] == summary["labeled"] == len(rows) == len(catalog_run["expected"])
    assert summary["already_done"] == 0 and summary["duplicate_paths"] == 0
    assert summary["errors"] == dict(reasons)
    assert summary["labels"] == dict(labels)
    assert summary["skipped_hidden"] == 1  # .DS_Store
    # The run printed one progress line that reached 100%.
    assert f"labeled {len(rows)}/{len(rows)} (100%)" in run.stderr


def test_an_exif_rotated_jpeg_is_labeled_as_if_upright(catalog_run, rows):
    root = catalog_run["root"]

    def probabilities(name: str) -> np.ndarray:
        return np.array(rows[str(root / name)]["probabilities"], np.float64)

    rotated, upright = probabilities(EXIF_ROTATED), probabilities(EXIF_UPRIGHT)
    np.testing.assert_allclose(rotated, upright, rtol=0, atol=1e-5)
    # The check can tell: the same pixels left sideways give other probabilities.
    assert np.abs(rotated - probabilities(EXIF_SIDEWAYS)).max() > 1e-4


def test_a_decompression_bomb_is_refused_as_too_large_fast_and_in_little_memory(
    catalog_run, rows, tmp_path
):
    row = rows[str(catalog_run["root"] / "bomb-30000x30000.png")]
    assert row["error"].startswith("too_large: "), row["error"]

    # The run: decoding the bomb would take 0.9 GB for its bitmap and 2.7 GB for the RGB copy.
    # No process of the labeling run came near that (Ray and TensorFlow alone take ~0.8 GB).
    peaks = catalog_run["run"].peak_rss
    if not peaks:
        pytest.skip("no /proc to read peak RSS from")
    title, peak = max(peaks.values(), key=lambda item: item[1])
    assert peak < 1.5 * GiB, f"{title} peaked at {peak / GiB:.2f} GiB"

    # The decoder alone, in a fresh process: CPU time and memory of refusing it.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    probe = (
        "import json, resource, sys, time\n"
        "from dogbread.images import ImageDecodeError, decode_image\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "started = time.process_time()\n"
        "try:\n"
        "    decode_image(data, 64)\n"
        "    reason = None\n"
        "except ImageDecodeError as exc:\n"
        "    reason = exc.reason\n"
        "cpu = time.process_time() - started\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'reason': reason, 'cpu': cpu, 'grew_kib': after - before}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(bomb)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["reason"] == "too_large"
    assert measured["cpu"] < 0.5, measured  # CPU seconds, so a busy machine does not matter
    assert measured["grew_kib"] < 50 * 1024, measured  # the bitmap alone would be 900 MB


def test_awkward_names_nested_folders_and_symlinks_come_back_as_the_same_paths(catalog_run, rows):
    root = catalog_run["root"]
    for name in (*ODD_NAMES, SYMLINK_TARGET, SYMLINK):
        path = str(root / name)
        assert path in rows, f"no row for {path!r}: {sorted(rows)}"
        assert rows[path]["error"] is None and rows[path]["label"] is not None
    # The symlink keeps its own name in the output, and is labeled as the file it points to.
    assert (root / SYMLINK).is_symlink()
    link, target = rows[str(root / SYMLINK)], rows[str(root / SYMLINK_TARGET)]
    np.testing.assert_allclose(link["probabilities"], target["probabilities"], atol=1e-5)


def test_the_same_awkward_names_round_trip_as_s3_keys(s3_world):
    label = s3_world["label"]
    assert label.returncode == 0, label.explain()
    server = s3_world["server"]
    filesystem = pafs.S3FileSystem(
        endpoint_override=server.endpoint.removeprefix("http://"),
        scheme="http",
        access_key=server.access_key,
        secret_key=server.secret_key,
        region=server.region,
    )
    dataset = pads.dataset(f"{BUCKET}/labels", filesystem=filesystem, partitioning="hive")
    table = dataset.to_table()
    paths = table["path"].to_pylist()
    assert len(paths) == len(set(paths))
    assert sorted(paths) == sorted(s3_world["expected"])
    by_path = {row["path"]: row for row in table.to_pylist()}
    for path, reason in s3_world["expected"].items():
        if reason is None:
            assert by_path[path]["label"] in ("bread", "dog"), path
        else:
            assert by_path[path]["error"].startswith(f"{reason}: "), path
    for name in ODD_NAMES:  # the keys exactly as uploaded: no %-decoding, no '+' for ' '
        assert by_path[f"s3://{BUCKET}/inbox/{name}"]["error"] is None
    summary = read_json_object(server, "labels/_summary.json")
    reasons = Counter(r for r in s3_world["expected"].values() if r is not None)
    assert summary["images"] == len(paths) and summary["errors"] == dict(reasons)


def test_training_skips_every_unreadable_input_and_counts_it(s3_world):
    train = s3_world["train"]
    assert train.returncode == 0, train.explain()
    server = s3_world["server"]
    unreadable = sorted(
        f"s3://{BUCKET}/train/dog/catalog/{rel}"
        for rel, reason in s3_world["catalog"].items()
        if reason is not None
    )
    assert len(unreadable) == 5  # empty, truncated, random bytes, text, bomb
    metrics = read_json_object(server, "run/metrics.json")
    assert sum(metrics["skipped_unreadable"].values()) == len(unreadable), metrics
    body = server.client().get_object(Bucket=BUCKET, Key="run/manifest.parquet")["Body"].read()
    listed = set(pq.read_table(pa.BufferReader(body))["path"].to_pylist())
    assert set(unreadable) <= listed  # listed, then skipped at decoding: not lost silently
    # Each one is named, with its reason, in the log of the Ray worker that decoded it (a quiet
    # command does not stream those logs to the terminal; -v would), and the terminal says so.
    assert "unreadable images (train/val/test); Ray's worker logs name each one" in train.stderr
    logs = "".join(
        path.read_text(errors="replace")
        for path in (train.ray_tmpdir / "ray").glob("session_*/logs/worker-*")
    )
    for path in unreadable:
        assert f"skipped {path}: " in logs, path


def test_the_catalog_really_holds_what_it_claims(catalog_run):
    """The promise above is only as good as the catalog: check its files are what they say."""
    from PIL import Image

    root: Path = catalog_run["root"]

    def opened(name: str) -> Image.Image:
        return Image.open(root / name)

    assert (root / "empty.jpg").stat().st_size == 0
    assert opened("rgba-alpha.png").mode == "RGBA"
    assert opened("palette.png").mode == "P"
    assert opened("gray-16bit.png").mode.startswith("I;16")
    assert opened("cmyk.jpg").mode == "CMYK"
    assert opened("progressive.jpg").info.get("progressive") == 1
    assert opened(EXIF_ROTATED).getexif()[0x0112] == 6
    assert opened("animated.gif").n_frames == 3
    assert opened("photo.webp").format == "WEBP"
    bomb = (root / "bomb-30000x30000.png").read_bytes()
    assert bomb[12:16] == b"IHDR" and bomb[16:26] == struct.pack(">IIBB", 30000, 30000, 1, 0)
    assert len(bomb) < 200_000  # 900 M pixels of 1 bit, in a few hundred KB at most
    assert (root / SYMLINK).is_symlink() and (root / "nested" / "deeper").is_dir()
