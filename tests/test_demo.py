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
