"""The README's first command, `dogbread demo`, as a user runs it: a process of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dogbread.label import read_labels

PROJECT = Path(__file__).resolve().parents[1]


def test_demo_trains_labels_and_scores_its_labels(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "dogbread", "demo", "--out", str(tmp_path), "--images", "200"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (root,) = tmp_path.iterdir()  # one timestamped folder per run
    assert (root / "run" / "model.keras").exists() and (root / "run" / "metrics.json").exists()
    rows = read_labels(str(root / "labels")).to_pylist()
    assert len(rows) == 200 and all(r["error"] is None for r in rows)
    agree = re.search(r"demo: (\d+)/200 labels match the folder", done.stdout)
    assert agree, done.stdout
    # A trained model got 85-93% here, one that learned nothing gets half (the classes are even).
    assert int(agree.group(1)) >= 130
    assert f"demo: model in {root / 'run'}, labels in {root / 'labels'}" in done.stdout

    # Each step's line and its result, and nothing else: no TensorFlow, Ray or Ray Data notices.
    out = done.stdout.splitlines()
    assert out[:2] == [
        f"demo: writing to {root}",
        "demo: training the seed CNN on 2 workers for up to 6 epochs",
    ]
    assert out[2].startswith("accuracy ") and out[-5] == f"model written to {root}/run/model.keras"
    assert out[-4] == "demo: labeling 200 new images"
    assert re.fullmatch(r"demo: labeled 200 images \(bread \d+, dog \d+; 0 errors\)", out[-3])
    err = done.stderr.splitlines()
    epochs = [line for line in err if line.startswith("epoch ")]
    labeling = err.index("labeling 200 images")
    assert re.fullmatch(r"training on \d+ images with 2 workers, up to 6 epochs", err[0]), err
    stopped = [line for line in err[1:labeling] if line.startswith("early stop after epoch ")]
    assert err[1:labeling] == epochs + stopped and 1 <= len(epochs) <= 6
    assert len(stopped) == (len(epochs) < 6)  # the line that says why it ended before epoch 6
    epoch_line = r"epoch \d/6  loss [\d.]+  val_accuracy [\d.]+  ETA \d+:\d\d"
    assert all(re.fullmatch(epoch_line, line) for line in epochs), epochs
    assert all(line.startswith("labeled ") for line in err[labeling + 1 :])
    assert err[-1].startswith("labeled 200/200 (100%)")
