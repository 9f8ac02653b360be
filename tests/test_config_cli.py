"""Tests for dogbread.config and the `dogbread` command line (a few real subprocesses, no Ray)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dogbread.cli import build_parser, config_from_args
from dogbread.config import (
    LabelConfig,
    SynthConfig,
    TrainConfig,
    dump_config,
    load_config,
)
from dogbread.data import read_manifest
from dogbread.errors import ConfigError

PROJECT = Path(__file__).resolve().parents[1]
REQUIRED = {"data": "trees/x", "out": "runs/y"}


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- load_config --------------------------------------------------------------------------------


def test_defaults_fill_every_unset_field():
    config = load_config(TrainConfig, None, REQUIRED)
    assert config == TrainConfig(data="trees/x", out="runs/y")
    assert (config.workers, config.epochs, config.batch_size) == (2, 10, 32)
    assert config.learning_rate == 1e-3
    assert config.use_gpu is False and config.s3_endpoint is None


def test_yaml_overrides_defaults(tmp_path):
    path = write_yaml(
        tmp_path, "data: d\nout: o\nepochs: 3\nuse_gpu: true\nlearning_rate: 0.01\nworkers: 4\n"
    )
    config = load_config(TrainConfig, path)
    assert (config.data, config.out) == ("d", "o")
    assert config.epochs == 3 and config.workers == 4
    assert config.use_gpu is True
    assert config.learning_rate == 0.01
    assert config.batch_size == 32  # untouched default


def test_overrides_beat_yaml_and_none_overrides_are_ignored(tmp_path):
    path = write_yaml(tmp_path, "data: d\nout: o\nepochs: 3\nworkers: 4\n")
    config = load_config(TrainConfig, path, {"epochs": 7, "workers": None, "out": "o2"})
    assert config.epochs == 7
    assert config.workers == 4  # None means "flag not given": the YAML value stays
    assert config.out == "o2"


def test_cli_flags_override_yaml(tmp_path):
    path = write_yaml(tmp_path, "data: d\nout: o\nepochs: 3\nuse_gpu: true\n")
    args = build_parser().parse_args(
        ["train", "--config", path, "--epochs", "5", "--no-use-gpu", "--learning-rate", "1e-4"]
    )
    config = config_from_args(TrainConfig, args)
    assert config.epochs == 5
    assert config.use_gpu is False
    assert config.learning_rate == pytest.approx(1e-4)
    assert config.data == "d"
    assert config_from_args(
        TrainConfig, build_parser().parse_args(["train", "--config", path, "--gpu"])
    ).use_gpu


def test_unknown_yaml_key_names_the_key(tmp_path):
    path = write_yaml(tmp_path, "data: d\nout: o\nepochz: 3\n")
    with pytest.raises(ConfigError, match="unknown TrainConfig key") as info:
        load_config(TrainConfig, path)
    assert "epochz" in str(info.value)


def test_missing_required_key_is_a_config_error():
    with pytest.raises(ConfigError, match="missing required TrainConfig key.*out"):
        load_config(TrainConfig, None, {"data": "d"})


@pytest.mark.parametrize(
    "line, field",
    [
        ("epochs: ten", "epochs"),
        ("epochs: 2.5", "epochs"),
        ("use_gpu: yes-please", "use_gpu"),
        ("use_gpu: 1", "use_gpu"),
        ("learning_rate: fast", "learning_rate"),
        ("workers: true", "workers"),
        ("data: [a, b]", "data"),
    ],
)
def test_wrong_type_is_a_config_error(tmp_path, line, field):
    text = "\n".join([f"{k}: {v}" for k, v in REQUIRED.items() if k != line.split(":")[0]])
    path = write_yaml(tmp_path, f"{text}\n{line}\n")
    with pytest.raises(ConfigError, match=f"^{field} must be") as info:
        load_config(TrainConfig, path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": "resnet50"}, "architecture must be seed or residual"),
        ({"lr_schedule": "step"}, "lr_schedule must be constant or cosine"),
    ],
)
def test_unknown_choices_are_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**REQUIRED, **change)


def test_bad_yaml_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(TrainConfig, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, write_yaml(tmp_path, "data: [unclosed\n", "broken.yaml"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(TrainConfig, write_yaml(tmp_path, "- a\n- b\n", "list.yaml"))


def test_tuple_fields_from_comma_strings_and_lists(tmp_path):
    assert load_config(SynthConfig, None, {"out": "o", "classes": "a,b,c"}).classes == (
        "a",
        "b",
        "c",
    )
    assert load_config(SynthConfig, None, {"out": "o", "classes": "a, b"}).classes == ("a", "b")
    path = write_yaml(tmp_path, "out: o\nclasses: [x, y]\n")
    assert load_config(SynthConfig, path).classes == ("x", "y")
    args = build_parser().parse_args(["synth", "o", "--classes", "cat,owl", "--per-class", "4"])
    config = config_from_args(SynthConfig, args)
    assert config == SynthConfig(out="o", per_class=4, classes=("cat", "owl"))


def test_ints_are_accepted_for_floats_and_optional_floats():
    config = load_config(
        LabelConfig, None, {"model": "m", "input": "i", "output": "o", "threshold": 1}
    )
    assert config.threshold == 1.0 and isinstance(config.threshold, float)
    assert (
        load_config(LabelConfig, None, {"model": "m", "input": "i", "output": "o"}).threshold
        is None
    )


def test_yaml_float_in_exponent_notation(tmp_path):
    path = write_yaml(tmp_path, "data: d\nout: o\nlearning_rate: 1e-4\n")
    assert load_config(TrainConfig, path).learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(data="s3://bucket/trees", out="runs/1", epochs=4, learning_rate=1e-5),
        TrainConfig(data="d", out="o", use_gpu=True, s3_endpoint="http://localhost:8333"),
        LabelConfig(model="m", input="i", output="o", threshold=0.7, partition_by="label"),
        LabelConfig(model="m", input="i", output="o"),
        SynthConfig(out="o", per_class=3, seed=9, classes=("a", "b", "c")),
    ],
    ids=lambda c: type(c).__name__,
)
def test_dump_config_reloads_to_an_equal_config(tmp_path, config):
    text = dump_config(config)
    assert text.startswith(f"# dogbread {type(config).__name__}\n")
    reloaded = load_config(type(config), write_yaml(tmp_path, text))
    assert reloaded == config
    assert dataclasses.asdict(reloaded) == dataclasses.asdict(config)


# --- the command line, as a user runs it --------------------------------------------------------


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dogbread", *args],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def dogbread(*args: str) -> subprocess.CompletedProcess:
    return finish(start(*args))


def assert_clean_error(result: subprocess.CompletedProcess) -> str:
    """Exit code 2, no traceback; returns dogbread's error line (the last stderr line)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dogbread: error:"), result.stderr
    return last


@pytest.fixture(scope="module")
def train_errors(tmp_path_factory) -> dict:
    """Both failing `dogbread train` runs, started together: each spends seconds importing TF."""
    tmp = tmp_path_factory.mktemp("cli")
    bad = write_yaml(tmp, "data: d\nout: o\nbogus_key: 1\n", "bad.yaml")
    out = tmp / "X"
    processes = {
        "bad_config": start("train", "--config", bad),
        "missing_data": start("train", "--data", "/nonexistent", "--out", str(out)),
    }
    results = {name: finish(process) for name, process in processes.items()}
    return {**results, "out": out}


def test_cli_unknown_config_key_exits_2_with_one_error_line(train_errors):
    result = train_errors["bad_config"]
    last = assert_clean_error(result)
    assert last == "dogbread: error: unknown TrainConfig key(s): bogus_key"
    assert result.stdout == ""


def test_cli_missing_data_exits_2_before_writing_anything(train_errors):
    result = train_errors["missing_data"]
    last = assert_clean_error(result)
    assert last == "dogbread: error: input not found: /nonexistent"
    assert not train_errors["out"].exists()
    assert "Ray" not in result.stderr  # failed before any Ray runtime was started


@pytest.mark.parametrize("which", ["bad_config", "missing_data"])
def test_cli_train_errors_are_the_only_stderr_line(train_errors, which):
    stderr = train_errors[which].stderr
    assert stderr.startswith("dogbread: error:") and len(stderr.strip().splitlines()) == 1, stderr


def test_cli_unknown_flag_exits_2_without_traceback():
    result = dogbread("train", "--data", "d", "--out", "o", "--no-such-flag")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    assert result.stdout == ""


def test_cli_synth_writes_the_images_and_prints_the_count(tmp_path):
    out = tmp_path / "synth"
    result = dogbread("synth", str(out), "--per-class", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 6 images to {out}: {{'bread': 3, 'dog': 3}}"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [f"{c}/{c}_{i:05d}.jpg" for c in ("bread", "dog") for i in range(3)]
    assert all((out / f).read_bytes()[:3] == b"\xff\xd8\xff" for f in files)  # JPEGs


def test_cli_manifest_writes_a_readable_manifest(tmp_path):
    from dogbread.synth import write_synthetic_tree

    data = tmp_path / "data"
    write_synthetic_tree(data, per_class=4, seed=2)
    (data / "bread" / "notes.txt").write_text("not an image")
    out = tmp_path / "m.parquet"
    result = dogbread("manifest", str(data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote 8 files to {out}: {{'train': ")
    manifest = read_manifest(str(out))
    assert manifest.class_names == ("bread", "dog")
    assert manifest.table.num_rows == 8
    assert sorted(manifest.table["relpath"].to_pylist()) == sorted(
        f"{c}/{c}_{i:05d}.jpg" for c in ("bread", "dog") for i in range(4)
    )
    counts = {s: manifest.split(s).num_rows for s in ("train", "val", "test")}
    assert result.stdout.strip() == f"wrote 8 files to {out}: {counts}"


@pytest.mark.parametrize(
    "actors, pool", [("1", (1, 1)), ("4", (4, 4)), ("1:8", (1, 8)), (3, (3, 3)), ("2:2", (2, 2))]
)
def test_label_actors_is_a_fixed_pool_or_min_max(actors, pool, tmp_path):
    path = tmp_path / "label.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "input": "i", "output": "o", "actors": actors}))
    assert load_config(LabelConfig, str(path)).actor_pool() == pool


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"actors": "0"}, "actors must be at least 1, and MIN at most MAX"),
        ({"actors": "4:2"}, "actors must be at least 1, and MIN at most MAX"),
        ({"actors": "many"}, "actors must be N or MIN:MAX, got 'many'"),
        ({"plan": "gpu"}, "plan must be auto or fused or split"),
        ({"actor_cpus": 0}, "actor_cpus must be positive"),
    ],
)
def test_label_pool_and_plan_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        LabelConfig(model="m", input="i", output="o", **overrides)
