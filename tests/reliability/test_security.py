"""Secrets and hostile files: what dogbread promises about what it writes and what it runs.

Promises:
1. AWS secret keys never appear in logs, Parquet, summaries, saved configs or any other output,
   through a whole `train` + `label` on S3 (a server whose secret key is distinctive).
2. A session token is never shipped to Ray workers nor printed (a token cannot be used against
   the test's SeaweedFS server, which refuses temporary credentials, so a full run with one is
   out of reach here: we check what would carry it instead).
3. Models are loaded in Keras safe mode: a model file with a Lambda layer is refused with one
   clear line and exit code 2, by `dogbread label` and by `dogbread predict`, and its code never
   runs.
4. No path taken from the input makes a write escape the output root: class names such as
   '../../../x' or '/tmp/x' become quoted Hive folder names, and S3 keys (even with encoded '..'
   segments) only ever name inputs, never outputs.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from urllib.parse import unquote

import pytest

from .conftest import BUCKET, SECRET_KEY, all_keys, files_under, s3_env

pytestmark = pytest.mark.slow

SESSION_TOKEN = "dogbreadSESSIONtoken" + "7f3a9c" * 4


def test_secret_keys_never_appear_in_logs_parquet_summaries_or_saved_configs(s3_world):
    server, secret = s3_world["server"], SECRET_KEY.encode()
    assert server.secret_key == SECRET_KEY  # the runs really authenticated with it
    for run in (s3_world["train"], s3_world["label"]):
        assert run.returncode == 0, run.explain()
        assert secret not in (run.stdout + run.stderr).encode(), run.args[0]

    client, searched = server.client(), []
    for key in all_keys(server):
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert secret not in body, key
        searched.append(key)
    # What was searched: every kind of output the two jobs write.
    for wanted in (
        "run/config.yaml",
        "run/model_card.json",
        "run/metrics.json",
        "run/manifest.parquet",
        "labels/_config.yaml",
        "labels/_summary.json",
        "labels/_report.html",
        "labels/_dogbread/plan.json",
    ):
        assert wanted in searched
    assert any(k.startswith("run/checkpoints/") for k in searched)
    assert any(k.startswith("labels/label=") and k.endswith(".parquet") for k in searched)
    assert any(k.startswith("labels/_dogbread/shards/") for k in searched)

    # Ray's own files on this node (logs of the driver, raylet, workers and actors), and the log
    # file of each command (what a quiet command did not print).
    ray_files, command_logs = 0, 0
    for run in (s3_world["train"], s3_world["label"]):
        for path in run.ray_tmpdir.rglob("*"):
            if path.is_file() and not path.is_symlink() and not path.name.endswith(".sock"):
                ray_files += path.parent.name != "dogbread-logs"
                command_logs += path.parent.name == "dogbread-logs"
                with open(path, "rb") as f:
                    assert secret not in f.read(), path
    assert ray_files > 0 and command_logs == 2


def test_a_session_token_is_never_shipped_to_workers_or_printed(
    local_s3, small_model_dir, cli, monkeypatch
):
    from dogbread import storage

    # With temporary credentials the AWS chain keeps them: the filesystem dogbread hands to Ray
    # (pickled into every task and actor) carries neither the token nor the secret key.
    for name, value in s3_env(local_s3, AWS_SESSION_TOKEN=SESSION_TOKEN).items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    shipped = pickle.dumps(storage.s3_filesystem(local_s3.endpoint))
    assert SESSION_TOKEN.encode() not in shipped and SECRET_KEY.encode() not in shipped

    # A run with them: SeaweedFS refuses temporary credentials, so the job stops at listing, with
    # one line that names neither.
    run = cli.run(
        "label",
        "--model", small_model_dir,
        "--input", f"s3://{BUCKET}/inbox",
        "--output", f"s3://{BUCKET}/token-out",
        "--s3-endpoint", local_s3.endpoint,
        env=s3_env(local_s3, AWS_SESSION_TOKEN=SESSION_TOKEN),
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.explain()
    assert len(run.error_lines()) == 1 and "Traceback" not in run.stderr
    for text in (SESSION_TOKEN, SECRET_KEY):
        assert text not in run.stdout + run.stderr
    assert not [k for k in all_keys(local_s3) if k.startswith("token-out/")]


@pytest.fixture(scope="module")
def lambda_model(tmp_path_factory) -> dict:
    """A model dir whose model.keras holds a Lambda layer that, if run, creates a marker file."""
    import tf_keras as keras

    from dogbread.model import CARD_FILENAME, MODEL_FILENAME, ModelCard

    base = tmp_path_factory.mktemp("lambda-model")
    marker = base / "the-lambda-ran"
    # The code is in the file (marshalled bytecode): loading it unsafely would run it.
    touch = eval(f"lambda t: (open({str(marker)!r}, 'w').close(), t)[1]")  # noqa: S307
    inputs = keras.Input(shape=(64, 64, 3))
    x = keras.layers.Lambda(touch)(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    directory = base / "run"
    directory.mkdir()
    keras.Model(inputs, outputs).save(directory / MODEL_FILENAME)
    (directory / CARD_FILENAME).write_text(ModelCard(("bread", "dog"), 64, 0).to_json())
    marker.unlink()  # building the model ran the lambda once; from now on nothing may
    return {"dir": directory, "marker": marker}


def test_a_model_with_a_lambda_layer_is_refused_by_label_and_predict_with_exit_2(
    lambda_model, synthetic_tree, cli, tmp_path
):
    image = str(Path(synthetic_tree) / "dog" / "dog_00000.jpg")
    model = str(lambda_model["dir"])
    label_args = ["label", "--model", model, "--input", synthetic_tree, "--output", str(tmp_path)]
    label, predict = cli.run_all([(label_args, None), (["predict", "--model", model, image], None)])
    for run in (label, predict):
        assert run.returncode == 2, run.explain()
        (line,) = run.error_lines()
        assert line.startswith("dogbread: error: cannot load model") and "Lambda" in line, line
        assert "Traceback" not in run.stderr
        assert not run.ray_started
    assert not lambda_model["marker"].exists(), "the Lambda layer's code ran"
    assert not any(tmp_path.iterdir())  # label wrote nothing


def test_no_label_value_makes_a_write_escape_the_output_root(catalog_run):
    run, out, base = catalog_run["run"], catalog_run["out"], catalog_run["base"]
    assert run.returncode == 0, run.explain()
    summary = json.loads((out / "_summary.json").read_text())
    # Both hostile names really were labels, so both became partition values.
    assert set(summary["labels"]) == set(catalog_run["class_names"])

    written = files_under(base) - catalog_run["files_before"]
    assert written
    root = os.path.realpath(out)
    for path in written:
        assert os.path.realpath(path).startswith(root + os.sep), path
    for path in out.rglob("part-*.parquet"):
        folder = path.parent
        assert folder.parent == out and folder.name.startswith("label="), path
        value = unquote(folder.name.removeprefix("label="))
        assert value in (*catalog_run["class_names"], "__error__"), value
    tag = catalog_run["tag"]
    assert not Path(f"/tmp/dogbread-escaped-{tag}").exists()
    assert not [p for p in base.parent.rglob(f"escaped-{tag}*")], "a label climbed out"


def test_no_input_key_makes_a_write_escape_the_output_prefix(s3_world):
    assert s3_world["train"].returncode == 0 and s3_world["label"].returncode == 0
    new = set(all_keys(s3_world["server"])) - s3_world["keys_before"]
    assert new
    outside = sorted(k for k in new if not k.startswith(("run/", "labels/")))
    assert not outside, outside
    # Inputs are untouched: the same keys as before, none added under them.
    assert not [k for k in new if k.startswith(("inbox/", "train/"))]
