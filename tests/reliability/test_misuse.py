"""Misuse: what dogbread promises when the command itself is wrong.

Promise: an unknown flag, a missing model, a model whose input size differs from its model card,
an empty input folder or an empty S3 prefix each give one clear line on stderr (no traceback),
exit code 2, and start no Ray. (No test here starts Ray, so none is marked slow.)

The commands run at once, as subprocesses, the way a user types them.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from dogbread.model import CARD_FILENAME, ModelCard

from .conftest import BUCKET, s3_env

MISTAKES = {
    "an unknown flag": "unrecognized arguments: --batch-szie",
    "a missing model": "no model at",
    "a model whose input size differs from its card": "model card says image size 32",
    "an empty input folder": "no files to label",
    "an empty s3 prefix": "no files to label",
}


@pytest.fixture(scope="module")
def mistakes(small_model_dir, local_s3, tmp_path_factory, cli) -> dict:
    base = tmp_path_factory.mktemp("misuse")
    resized = base / "resized-model"  # the 64x64 model, its card edited to say 32
    shutil.copytree(small_model_dir, resized)
    card = ModelCard.from_json((resized / CARD_FILENAME).read_text())
    (resized / CARD_FILENAME).write_text(dataclasses.replace(card, image_size=32).to_json())
    (base / "empty").mkdir()
    (base / "images").mkdir()
    shutil.copy(Path(small_model_dir) / CARD_FILENAME, base / "images" / "not-read.jpg")
    out = str(base / "out")
    good = ["--model", small_model_dir, "--output", out]
    commands = {
        "an unknown flag": ["--input", str(base / "images"), *good, "--batch-szie", "8"],
        "a missing model": ["--model", str(base / "no-model"), "--input", str(base / "images")]
        + ["--output", out],
        "a model whose input size differs from its card": ["--model", str(resized)]
        + ["--input", str(base / "images"), "--output", out],
        "an empty input folder": ["--input", str(base / "empty"), *good],
        "an empty s3 prefix": ["--input", f"s3://{BUCKET}/nothing-under-this-prefix/", *good]
        + ["--s3-endpoint", local_s3.endpoint],
    }
    runs = cli.run_all([(["label", *args], s3_env(local_s3)) for args in commands.values()])
    return {"runs": dict(zip(commands, runs, strict=True)), "out": base / "out"}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_gets_one_clear_line_no_traceback_and_exit_code_2(mistakes, mistake):
    run = mistakes["runs"][mistake]
    assert run.returncode == 2, run.explain()
    assert "Traceback" not in run.stderr, run.explain()
    (line,) = run.error_lines()
    assert MISTAKES[mistake] in line, line
    assert not run.ray_started, "a Ray session dir was created"
    assert not mistakes["out"].exists(), "the output was created"
