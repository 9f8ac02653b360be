"""What `dogbread` prints by default, as a user runs it: the answers, one progress line per job,
the summary, and nothing else. TensorFlow's, absl's, LiteRT's and Ray's own lines go to the log
file (DOGBREAD_LOG_DIR) and to Ray's logs; `-v` shows them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dogbread import cli
from dogbread.synth import write_synthetic_tree
from dogbread.train import EpochLines
from dogbread.train_worker import STATE

from .conftest import PROJECT, subprocess_env

NUMBER = r"\d+\.\d+"
ETA = r"ETA \d+:\d\d"


def dogbread(args: list[str], log_dir: Path) -> subprocess.CompletedProcess:
    """`python -m dogbread ARGS` with a Ray of its own (its own short temp dir) and its log
    files in `log_dir`; stdout and stderr apart, as a terminal would show them."""
    ray_tmpdir = tempfile.mkdtemp(prefix="dbo-", dir="/tmp")  # Ray's socket paths: <= 107 bytes
    env = subprocess_env(RAY_TMPDIR=ray_tmpdir, DOGBREAD_LOG_DIR=str(log_dir))
    try:
        return subprocess.run(
            [sys.executable, "-m", "dogbread", *args],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def assert_lines(text: str, patterns: list[str]) -> list[re.Match]:
    lines = text.splitlines()
    assert len(lines) == len(patterns), text
    matches = [re.fullmatch(p, line) for p, line in zip(patterns, lines, strict=True)]
    assert all(matches), list(zip(patterns, lines, strict=True))
    return matches  # type: ignore[return-value]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A tiny `train`, then `label` and `predict` with its model, each run as a user would."""
    root = tmp_path_factory.mktemp("cli-output")
    logs = root / "logs"
    write_synthetic_tree(root / "data", per_class=24, seed=0)
    write_synthetic_tree(root / "inbox", per_class=12, seed=1)
    (root / "inbox" / "notes.jpg").write_text("not an image")  # one error row
    run_dir, labels = root / "run", root / "labels"
    train = ["train", "--data", str(root / "data"), "--out", str(run_dir), "--epochs", "2"]
    train += ["--workers", "1", "--image-size", "32", "--batch-size", "8", "--seed", "0"]
    done = {"train": dogbread(train, logs)}
    label = ["label", "--model", str(run_dir), "--input", str(root / "inbox")]
    done["label"] = dogbread([*label, "--output", str(labels), "--batch-size", "8"], logs)
    pictures = [str(root / "inbox" / c / f"{c}_00000.jpg") for c in ("bread", "dog")]
    done["predict"] = dogbread(["predict", "--model", str(run_dir), *pictures], logs)
    done["predict -v"] = dogbread(["predict", "-v", "--model", str(run_dir), *pictures], logs)
    for name, result in done.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    return {"root": root, "logs": logs, "run": run_dir, "pictures": pictures, **done}


def test_train_prints_its_epoch_lines_then_the_test_metrics(runs):
    done = runs["train"]
    assert_lines(
        done.stderr,
        [
            r"training on \d+ images with 1 worker, up to 2 epochs",
            rf"epoch 1/2  loss {NUMBER}  val_accuracy {NUMBER}  {ETA}",
            rf"epoch 2/2  loss {NUMBER}  val_accuracy {NUMBER}  ETA 0:00",
        ],
    )
    assert_lines(
        done.stdout,
        [
            rf"accuracy {NUMBER}  precision {NUMBER}  recall {NUMBER}  \(\d+ images\)",
            r"class        precision  recall  support",
            rf"bread +{NUMBER} +{NUMBER} +\d+",
            rf"dog +{NUMBER} +{NUMBER} +\d+",
            r"confusion \(rows true, columns predicted\): bread, dog",
            r" +\d+ +\d+",
            r" +\d+ +\d+",
            re.escape(f"model written to {runs['run']}/model.keras"),
        ],
    )
    # What the terminal did not show is in the command's log file.
    (log,) = runs["logs"].glob("train-*.log")
    assert "INFO dogbread.runtime: Ray local" in log.read_text()


def test_label_prints_its_progress_lines_then_the_summary(runs):
    done = runs["label"]
    lines = done.stderr.splitlines()
    assert lines[0] == "labeling 25 images", done.stderr
    progress = rf"labeled (\d+)/25 \((\d+)%\)  {NUMBER} img/s  {ETA}"
    matches = assert_lines("\n".join(lines[1:]), [progress] * (len(lines) - 1))
    counts = [int(m[1]) for m in matches]
    assert counts == sorted(counts) and counts[-1] == 25 and matches[-1][2] == "100"
    summary = json.loads(done.stdout)  # stdout is the summary and nothing else
    assert (summary["images"], summary["labeled"], summary["complete"]) == (25, 25, True)
    assert summary["errors"] == {"not_an_image": 1}


def test_predict_prints_one_answer_per_image_and_nothing_else(runs):
    pictures = runs["pictures"]
    done = runs["predict"]
    assert done.stderr == ""  # LiteRT's "Created TensorFlow Lite XNNPACK delegate" went to the log
    assert_lines(done.stdout, [r"\d{1,3}\.\d\d% (bread|dog)  " + re.escape(p) for p in pictures])
    assert "XNNPACK" in runs["predict -v"].stderr  # -v shows it: the quiet run did hide it
    assert runs["predict -v"].stdout == done.stdout
    assert any("XNNPACK" in log.read_text() for log in runs["logs"].glob("predict-*.log"))


def test_an_unexpected_error_is_one_line_that_names_the_log(tmp_path, monkeypatch, capsys):
    def fails(*args, **kwargs):
        raise RuntimeError("the disk went away\nand a second line")

    monkeypatch.setenv("DOGBREAD_LOG_DIR", str(tmp_path))
    monkeypatch.setattr("dogbread.synth.write_synthetic_tree", fails)
    assert cli.main(["synth", str(tmp_path / "out"), "--per-class", "1"]) == 1
    (log,) = tmp_path.glob("synth-*.log")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"dogbread: error: RuntimeError: the disk went away (full log: {log})"
    ]
    assert "Traceback" in log.read_text() and "and a second line" in log.read_text()


def _write_state(checkpoints: Path, epoch: int, best_epoch: int) -> None:
    history = [
        {"epoch": e, "loss": 1.0 / e, "val_accuracy": 0.5 + e / 10, "seconds": 2.0}
        for e in range(1, epoch + 1)
    ]
    folder = checkpoints / f"epoch_{epoch:04d}"
    folder.mkdir(parents=True)
    state = {"epoch": epoch, "best_epoch": best_epoch, "history": history}
    (folder / STATE).write_text(json.dumps(state))


def test_epoch_lines_follow_the_checkpoints_and_say_why_a_run_ended_early(tmp_path, capsys):
    import pyarrow.fs as pafs

    checkpoints = tmp_path / "checkpoints"
    _write_state(checkpoints, epoch=1, best_epoch=1)  # a resumed run: epoch 1 was shown before
    with EpochLines(5, pafs.LocalFileSystem(), str(checkpoints)):
        _write_state(checkpoints, epoch=2, best_epoch=1)
        _write_state(checkpoints, epoch=3, best_epoch=1)  # early stopping ends it here
    assert capsys.readouterr().err.splitlines() == [
        "epoch 2/5  loss 0.5000  val_accuracy 0.7000  ETA 0:06",
        "epoch 3/5  loss 0.3333  val_accuracy 0.8000  ETA 0:04",
        "early stop after epoch 3: no better val_loss since epoch 1, whose weights are kept",
    ]
