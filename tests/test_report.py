"""Reports of label outputs (_report.html) and training runs (report.html): counts, thumbnails,
escaping, a real browser.

Most label outputs here are written by hand (data files of label's schema), so the expected
counts are known exactly and no Ray is needed; one test labels for real, partitioned, with Ray.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dogbread import data, evaluate, label, output, report
from dogbread.cli import main
from dogbread.config import LabelConfig

NASTY = "odd <b>&\"q'.jpg"  # a real file name: must come out escaped, never as markup
SCRIPT_ERROR = "truncated: <script>alert(1)</script>"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def sections(page: str) -> dict[str, str]:
    """{h2 title: the section's HTML}."""
    found = re.findall(r"<section><h2>(.*?)</h2>(.*?)</section>", page, re.S)
    return {html.unescape(title): body for title, body in found}


def table_rows(body: str, css: str) -> list[list[str]]:
    """The text of every cell of the table of class `css`, row by row."""
    table = re.search(rf'<table class="{css}">(.*?)</table>', body, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    return [[html.unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r)] for r in rows]


def tiles(body: str) -> tuple[int, int]:
    """(thumbnails, failed placeholders) in a section."""
    return body.count('<img class="thumb"'), body.count('class="tile failed"')


def write_parts(fs_root: str, rows: list[dict], parts: int, filesystem=None) -> None:
    """`rows` as `parts` data files of label's schema, one per shard as label names them
    (locally, or in `filesystem`)."""
    defaults = {"probabilities": None, "model_version": "v1", "labeled_at": None}
    table = pa.Table.from_pylist([{**defaults, **r} for r in rows], output.OUTPUT_SCHEMA)
    for i, chunk in enumerate(np.array_split(np.arange(len(rows)), parts)):
        path = f"{fs_root}/{output.data_file_name(i)}"
        pq.write_table(table.take(chunk), path, filesystem=filesystem)


def fake_rows(tree: Path, input_root: Path) -> list[dict]:
    """30 bread, 8 dog and 1 vanished dog (scored), 3 error rows; scores known exactly."""
    breads = sorted((tree / "bread").iterdir())[:30]
    dogs = sorted((tree / "dog").iterdir())[:8]
    shutil.copy(dogs[0], input_root / NASTY)
    rows = [
        {"path": str(p), "label": "bread", "score": float(s)}
        for p, s in zip(breads, np.linspace(0.55, 0.99, 30), strict=True)
    ]
    rows += [
        {"path": str(p), "label": "dog", "score": float(s)}
        for p, s in zip([input_root / NASTY, *dogs[1:]], np.linspace(0.6, 0.95, 8), strict=True)
    ]
    rows.append({"path": str(input_root / "gone.jpg"), "label": "dog", "score": 0.505})
    rows += [
        {"path": str(input_root / f"bad {NASTY}"), "label": None, "error": "empty: no bytes"},
        {"path": str(input_root / "e2.jpg"), "label": None, "error": "empty: no bytes"},
        {"path": str(input_root / "t.jpg"), "label": None, "error": SCRIPT_ERROR},
    ]
    return rows


@pytest.fixture(scope="module")
def fake_output(tmp_path_factory, synthetic_tree, small_model_dir) -> dict:
    """A finished label output, in 4 data files, with a summary and the config naming the model."""
    root = tmp_path_factory.mktemp("report")
    (root / "in").mkdir()
    out = root / "out"
    out.mkdir()
    rows = fake_rows(Path(synthetic_tree), root / "in")
    write_parts(str(out), rows, parts=4)
    summary = {"input": str(root / "in"), "output": str(out), "images": 42, "seconds": 3.5}
    summary |= {"images_per_second": 12.3, "labels": {"bread": 30, "dog": 9}}
    summary |= {"errors": {"empty": 2, "truncated": 1}, "complete": True, "shards": 4}
    (out / "_summary.json").write_text(json.dumps(summary))
    config = LabelConfig(model=small_model_dir, input=str(root / "in"), output=str(out))
    (out / "_config.yaml").write_text(yaml.safe_dump(vars(config)))
    assert main(["report", str(out)]) == 0
    return {"page": (out / "_report.html").read_text(), "rows": {r["path"]: r for r in rows}}


def test_label_report_counts_histograms_and_grids(fake_output):
    found = sections(fake_output["page"])
    counts = found["Counts"]
    assert "42 images in 4 Parquet files" in counts
    assert table_rows(counts, "label-counts")[1:] == [
        ["bread", "30", "71.4%"],
        ["dog", "9", "21.4%"],
    ]
    assert table_rows(counts, "error-counts")[1:] == [["empty", "2"], ["truncated", "1"]]

    histograms = found["Scores per label"]
    for name, scored in (("bread", 30), ("dog", 9)):
        figure = re.search(
            rf"<figure class=\"hist\">((?:(?!</figure>).)*{name}: \d+ scores)", histograms
        )
        bars = [int(n) for n in re.findall(r": (\d+)</title>", figure.group(1))]
        assert len(bars) == report.BINS and sum(bars) == scored

    assert tiles(found["Sample: bread"]) == (12, 0)  # sampled down to GRID
    assert tiles(found["Sample: dog"]) == (8, 1)  # all 9; the vanished file as a placeholder
    least = found["Least confident"]
    assert tiles(least) == (11, 1)
    scores = [float(s) for s in re.findall(r"<figcaption>\w+ (0\.\d+)<br>", least)]
    assert scores == sorted(scores) and scores[0] == pytest.approx(0.505, abs=1e-3)
    assert "unreadable: " in least  # gone.jpg was deleted after it was labeled
    # Each thumbnail is of its own row: sampled rows were matched to their paths across parts.
    shown = re.findall(
        r'<figure class="tile" title="([^"]*)"><img [^>]*><figcaption>(\w+) ([\d.]+)<br>',
        fake_output["page"],
    )
    assert len(shown) == 12 + 8 + 11
    for title, name, score in shown:
        row = fake_output["rows"][html.unescape(title)]
        assert (row["label"], f"{row['score']:.3f}") == (name, score)
    failed = found["Failed files (3)"]
    assert tiles(failed) == (0, 3)
    assert failed.count("empty: no bytes") == 2 and html.escape(SCRIPT_ERROR) in failed

    card = dict(table_rows(found["Model card"], "kv"))
    assert card["class_names"] == "bread, dog" and card["image_size"] == "64"
    run = dict(table_rows(found["Run"], "kv"))
    assert run["images_per_second"] == "12.3" and run["seconds"] == "3.5"


def test_label_report_escapes_data_and_loads_nothing_external(fake_output):
    page = fake_output["page"]
    assert "<script" not in page and "<b>" not in page and NASTY not in page
    assert html.escape(NASTY) in page
    references = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, re.I)
    assert references and all(r.startswith("data:image/") for r in references)
    assert not re.search(r"<link|@import|url\(", page, re.I)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_label_report_renders_in_headless_chromium(fake_output, tmp_path):
    # Written into the copy only: counts the images the browser could not decode.
    check = (
        '<script>addEventListener("load", () => { document.body.dataset.broken = '
        "[...document.images].filter(i => !i.naturalWidth).length; });</script></body>"
    )
    page = fake_output["page"].replace("</body>", check)
    (tmp_path / "report.html").write_text(page)
    command = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    command += ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    url = (tmp_path / "report.html").as_uri()
    done = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Uncaught" not in done.stderr and ":CONSOLE" not in done.stderr, done.stderr[-2000:]
    dom = done.stdout
    assert 'data-broken="0"' in dom
    assert dom.count('class="thumb"') == 12 + 8 + 11
    assert table_rows(sections(dom)["Counts"], "label-counts")[1] == ["bread", "30", "71.4%"]

    shot = tmp_path / "shot.png"
    command += [f"--screenshot={shot}", "--window-size=1200,2000", url]
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        assert len(image.convert("RGB").getcolors(1 << 20)) > 1000  # thumbnails were painted


def test_report_of_an_s3_output(s3_server, synthetic_tree, small_model_dir, tmp_path):
    client, bucket = s3_server.client(), "dogbread-report"
    client.create_bucket(Bucket=bucket)
    (tmp_path / "in").mkdir()
    rows = fake_rows(Path(synthetic_tree), tmp_path / "in")
    for row in rows:  # the images move to the bucket; failed and vanished ones are not there
        local = Path(row["path"])
        row["path"] = f"s3://{bucket}/in/{local.name}"
        if local.exists():
            client.put_object(Bucket=bucket, Key=f"in/{local.name}", Body=local.read_bytes())
    for name in ("model.keras", "model_card.json"):
        body = Path(small_model_dir, name).read_bytes()
        client.put_object(Bucket=bucket, Key=f"model/{name}", Body=body)
    write_parts(f"{bucket}/labels", rows, parts=3, filesystem=s3_server.filesystem())
    config = {"model": f"s3://{bucket}/model", "s3_endpoint": s3_server.endpoint}
    client.put_object(Bucket=bucket, Key="labels/_config.yaml", Body=yaml.safe_dump(config))

    uri = report.write_report(f"s3://{bucket}/labels", s3_server.endpoint)
    assert uri == f"s3://{bucket}/labels/_report.html"
    page = client.get_object(Bucket=bucket, Key="labels/_report.html")["Body"].read().decode()
    found = sections(page)
    assert "42 images in 3 Parquet files" in found["Counts"]
    assert tiles(found["Sample: bread"]) == (12, 0) and tiles(found["Sample: dog"]) == (8, 1)
    assert tiles(found["Failed files (3)"]) == (0, 3)
    assert dict(table_rows(found["Model card"], "kv"))["class_names"] == "bread, dog"
    assert "no _summary.json" in found["Run"]


def test_training_run_report(synthetic_tree, tmp_path):
    """A model that always says dog: the misclassified sample is exactly the test split's bread."""
    from dogbread.model import ModelCard, ModelConfig, build_model, save_model

    run = tmp_path / "run"
    model = build_model(ModelConfig(image_size=64))
    kernel, _ = model.layers[-1].get_weights()
    model.layers[-1].set_weights([np.zeros_like(kernel), np.array([5.0], np.float32)])
    save_model(model, ModelCard(("bread", "dog"), 64, 0), str(run))
    manifest = data.list_labeled_tree(synthetic_tree)
    data.write_manifest(manifest, str(run / "manifest.parquet"))
    test = manifest.split("test")["label"].to_pylist()
    y_true = np.array([int(name == "dog") for name in test])
    metrics = evaluate.classification_metrics(y_true, np.ones_like(y_true), ["bread", "dog"])
    metrics["history"] = [
        {"epoch": e, "loss": 1 / e, "accuracy": 0.5, "val_loss": 1 / e, "val_accuracy": 0.5}
        for e in (1, 2)
    ]
    (run / "metrics.json").write_text(json.dumps(metrics))
    evaluate.plot_curves(metrics["history"], str(run / "curves.png"))
    evaluate.plot_confusion(metrics, str(run / "confusion_matrix.png"))
    (run / "config.yaml").write_text("# dogbread TrainConfig\nout: <run & co>\n")

    assert report.write_report(str(run)) == str(run / "report.html")
    page = (run / "report.html").read_text()
    found = sections(page)
    breads = test.count("bread")
    assert 0 < breads < len(test)
    wrong = found["Misclassified test images"]
    assert f"{breads} of {len(test)} sampled test images misclassified" in wrong
    assert tiles(wrong) == (min(breads, report.GRID), 0)
    assert wrong.count("bread → dog") == min(breads, report.GRID)
    confusion = table_rows(found["Per class"], "confusion")
    assert confusion[1:] == [
        ["true bread", "0", str(breads)],
        ["true dog", "0", str(len(test) - breads)],
    ]
    assert found["Curves and confusion matrix"].count('src="data:image/png;base64,') == 2
    assert "&lt;run &amp; co&gt;" in found["Config"]


@pytest.mark.slow
def test_label_writes_the_report_unless_no_report(
    ray_local, synthetic_tree, small_model_dir, tmp_path
):
    """A real, partitioned label run with bad files reports; --no-report does not."""
    source = tmp_path / "in"
    for name in ("bread", "dog"):
        (source / name).mkdir(parents=True)
        for path in sorted(Path(synthetic_tree, name).iterdir())[:10]:
            shutil.copy(path, source / name / path.name)
    (source / "dog" / "empty.jpg").write_bytes(b"")
    jpeg = next((source / "dog").glob("dog_*.jpg")).read_bytes()
    (source / "bread" / "half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    out = tmp_path / "out"
    config = LabelConfig(
        model=small_model_dir,
        input=str(source),
        output=str(out),
        batch_size=8,
        partition_by="label",
    )
    summary = label.run(config)
    assert any(p.name == "label=__error__" for p in out.iterdir())
    found = sections((out / "_report.html").read_text())
    counts = found["Counts"]
    assert "22 images in" in counts
    assert {r[0]: int(r[1]) for r in table_rows(counts, "label-counts")[1:]} == summary["labels"]
    assert table_rows(counts, "error-counts")[1:] == [["empty", "1"], ["truncated", "1"]]
    for name, n in summary["labels"].items():
        assert tiles(found[f"Sample: {name}"]) == (min(n, report.GRID), 0)
    failed = found["Failed files (2)"]
    assert tiles(failed) == (0, 2) and "empty: no bytes" in failed and "truncated: " in failed

    # A rerun into a copy of the finished output has nothing left to label (no Ray work), yet
    # ends as every run does: with the report, unless --no-report.
    quiet = tmp_path / "quiet"
    shutil.copytree(out, quiet, ignore=shutil.ignore_patterns("_report.html", "_summary.json"))
    argv = ["label", "--model", small_model_dir, "--input", str(source), "--output", str(quiet)]
    assert main([*argv, "--batch-size", "8", "--partition-by", "label", "--no-report"]) == 0
    assert (quiet / "_summary.json").exists() and not (quiet / "_report.html").exists()
    assert yaml.safe_load((quiet / "_config.yaml").read_text())["report"] is False
    assert main([*argv, "--batch-size", "8", "--partition-by", "label"]) == 0  # the control
    assert (quiet / "_report.html").exists()


def test_report_of_a_folder_without_labels_fails_with_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dogbread: error: {tmp_path} holds neither label parts nor a training run"]
