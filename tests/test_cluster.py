"""dogbread's jobs on a real Ray cluster, submitted through the Jobs API as `ray job submit` and
`dogbread submit` do: a head started with `ray start --head` on this machine, token auth on.

Token auth: since Ray 2.52 `ray start --head` turns token authentication on by itself whenever a
token exists on the machine (~/.ray/auth_token, which any local `ray.init()` creates), while a
client only sends one when RAY_AUTH_MODE=token. So the head gets an explicit mode and its own
token, and every client here presents it: the tests do not depend on what ~/.ray holds.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from dogbread import cli, submit
from dogbread.errors import ConfigError
from dogbread.seaweed import free_ports

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PORT_FLAGS = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
)
TRAIN_FLAGS = ["--image-size", "32", "--epochs", "1", "--workers", "1", "--batch-size", "8"]
slow = pytest.mark.slow


class Head(NamedTuple):
    address: str  # the dashboard: where jobs are submitted
    token: str
    gcs: str  # what a driver joins (RAY_ADDRESS inside a job)

    def client_env(self) -> dict[str, str]:
        """A client's environment as a user sets it for a token-auth cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C to `ray start --block` stops the processes it started; then kill stragglers.

    Not `ray stop`: it kills every Ray on the machine, other test sessions' included. Not SIGTERM:
    the head then drains itself first, which takes about 30 s here. Ctrl-C alone ends it in ~4 s,
    but in the full suite it did not within 60 s: after 3 s the group is killed (the tests are
    over, nothing of the head is needed any more).
    """
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    try:  # what is left of the head's own process group (start_new_session)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    token = secrets.token_hex(32)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    # Short and outside pytest's tmp dirs: Ray's socket paths under it must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="dbray-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The job's `python` is the first on the head's PATH. TF_USE_LEGACY_KERAS is left out so that
    # the jobs can only get it from cluster/runtime_env.yaml, as on a real cluster.
    env.pop("TF_USE_LEGACY_KERAS", None)
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}", RAY_AUTH_MODE="token")
    env["RAY_AUTH_TOKEN"] = token
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        f"--object-store-memory={512 * 2**20}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"--{flag}={port}" for flag, port in ports.items()),
    ]
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    dashboard, gcs = (f"127.0.0.1:{ports[name]}" for name in ("dashboard-port", "port"))
    head = Head(f"http://{dashboard}", token, gcs)
    try:
        _wait_for_jobs_api(head, process, log_path)
        yield head
    finally:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(head: Head, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            _client(head).list_jobs()
            return
        except Exception as exc:  # not up yet: connection refused, or the dashboard starting
            if time.monotonic() > deadline:
                pytest.fail(f"the Jobs API did not answer: {exc}\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)


def _client(head: Head):
    from ray.job_submission import JobSubmissionClient

    # An explicit header, not RAY_AUTH_MODE in this process: a local ray.init() elsewhere in the
    # session sets RAY_AUTH_MODE=token here with ~/.ray's token, which is not this head's.
    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})


def run_job(head: Head, job: str, args: list[str], timeout: float) -> str:
    """Submit jobs/<job>.py with the checkout as working dir; wait; return its logs."""
    from ray.job_submission import JobStatus

    client = _client(head)
    deadline = time.monotonic() + timeout
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=shlex.join(["python", f"jobs/{job}.py", *args]),
                runtime_env=submit.runtime_env(ROOT),
            )
            break
        except RuntimeError as exc:
            # The dashboard answers before the head's job agent has registered with it (seen
            # in CI on a loaded machine): the submission is refused until then.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(
                f"{job} job still {status} after {timeout}s:\n{client.get_job_logs(job_id)}"
            )
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    return logs


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 synthetic images per class: enough for a train/val/test split holding both classes."""
    from dogbread.synth import write_synthetic_tree

    root = tmp_path_factory.mktemp("cluster-data") / "tree"
    write_synthetic_tree(root, per_class=30, seed=1)
    return root


@pytest.fixture(scope="module")
def run_dir(head: Head, tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cluster-runs") / "run"
    run_job(head, "train", ["--data", str(tree), "--out", str(out), *TRAIN_FLAGS], timeout=300)
    return out


@slow
def test_train_job_writes_a_run_dir(run_dir: Path) -> None:
    assert (run_dir / "model.keras").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["workers"]) == 1 and metrics["epochs_run"] == 1
    assert 0 <= metrics["accuracy"] <= 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["image_size"] == 32


@slow
def test_label_job_writes_one_row_per_input(
    head: Head, run_dir: Path, tree: Path, tmp_path: Path
) -> None:
    from dogbread.label import read_labels

    out = tmp_path / "labels"
    logs = run_job(
        head, "label", ["--model", str(run_dir), "--input", str(tree), "--output", str(out)], 180
    )
    # The job's log is what the command prints on a terminal: its progress lines, then the
    # summary. Ray's, Ray Data's, TensorFlow's and LiteRT's notices stay in the log files. (Ray's
    # job supervisor writes two lines of its own: "Runtime env is setting up", "Running ...".)
    ours = [
        line
        for line in logs.splitlines()
        if "job_manager.py" not in line and not line.startswith("Running entrypoint for job ")
    ]
    progress, summary = ours[: ours.index("{")], json.loads("\n".join(ours[ours.index("{") :]))
    assert progress[0] == "labeling 60 images", logs
    assert progress[-1].startswith("labeled 60/60 (100%)"), logs
    assert all(line.startswith("labeled ") for line in progress[1:]), logs
    assert summary["labeled"] == 60
    table = read_labels(str(out))
    inputs = {str(p) for p in tree.rglob("*.jpg")}
    assert table.num_rows == len(inputs) == 60
    assert {Path(p).as_posix() for p in table["path"].to_pylist()} == inputs
    assert table["error"].null_count == table.num_rows


@slow
def test_dogbread_submit_follows_the_logs_and_exits_with_the_job_status(
    head: Head, run_dir: Path, tree: Path, tmp_path: Path
) -> None:
    def dogbread_submit(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "dogbread", "submit", "label", "--address", head.address]
        return subprocess.run(
            [*command, *args], env=head.client_env(), capture_output=True, text=True, timeout=300
        )

    out = tmp_path / "labels"
    done = dogbread_submit("--model", str(run_dir), "--input", str(tree), "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert '"images": 60' in done.stdout  # the job's summary, streamed as the job printed it
    assert "SUCCEEDED" in done.stderr.splitlines()[-1]

    no_model = ["--model", str(tmp_path / "no-model"), "--input", str(tree), "--output", str(out)]
    failed = dogbread_submit(*no_model)
    assert failed.returncode == 1
    assert "dogbread: error:" in failed.stdout  # the job's one-line error, streamed
    assert "FAILED" in failed.stderr.splitlines()[-1]


@slow
def test_a_client_without_the_token_is_refused(head: Head, tree: Path, tmp_path: Path) -> None:
    env = {**head.client_env(), "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "dogbread", "submit", "label", "--address", head.address]
    args = ["--model", str(tmp_path), "--input", str(tree), "--output", str(tmp_path / "out")]
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    error = done.stderr.splitlines()[-1]
    assert error.startswith("dogbread: error: Authentication required") and "RAY_AUTH_MODE" in error


def _failed_train(tree: Path, tmp_path: Path, env: dict[str, str]) -> str:
    """The stderr of `dogbread train` run with `env`, which must stop it with exit code 2."""
    command = [sys.executable, "-m", "dogbread", "train", "--data", str(tree)]
    command += ["--out", str(tmp_path / "run"), *TRAIN_FLAGS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    return done.stderr


@slow
def test_joining_with_a_wrong_token_fails_in_one_line(
    head: Head, tree: Path, tmp_path: Path
) -> None:
    # Ray retries a refused join once a second, 20 times by default; once is enough here.
    env = {**head.client_env(), "RAY_AUTH_TOKEN": "0" * 64, "RAY_ADDRESS": head.gcs}
    env["RAY_gcs_server_port_wait_time_s"] = "1"
    stderr = _failed_train(tree, tmp_path, env)
    error = stderr.splitlines()[-1]
    assert error.startswith(f"dogbread: error: cannot join the Ray cluster at {head.gcs}")
    assert "RAY_AUTH_TOKEN" in error and "0" * 64 not in stderr


@slow
def test_a_joined_cluster_is_not_taken_for_a_local_ray(head: Head) -> None:
    # Work a local Ray cannot place is refused (no autoscaler); a cluster's may still come.
    code = "from dogbread.runtime import ensure_ray; print(ensure_ray())"
    env = {**head.client_env(), "RAY_ADDRESS": head.gcs}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split()[-1:] == ["joined"], done.stderr[-3000:]


def test_a_ray_address_nobody_answers_on_fails_at_once(tree: Path, tmp_path: Path) -> None:
    # Ray by itself was still retrying such an address after two minutes.
    (port,) = free_ports(1)
    stderr = _failed_train(tree, tmp_path, {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert stderr.splitlines()[-1] == (
        f"dogbread: error: no Ray cluster answers at 127.0.0.1:{port} (RAY_ADDRESS): Connection "
        "refused; start one, fix the address, or unset RAY_ADDRESS to run on a local Ray"
    )


def test_a_dashboard_address_in_ray_address_is_explained(tree: Path, tmp_path: Path) -> None:
    # Ray's docs have users export it for `ray job submit`; ray.init answered with a traceback.
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"}
    error = _failed_train(tree, tmp_path, env).splitlines()[-1]
    assert error.startswith("dogbread: error: RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard")
    assert "dogbread submit --address" in error and "HEAD:6379" in error


# --- dogbread submit's own logic, without a cluster ----------------------------------------------


def test_submit_flags_go_anywhere_and_the_rest_goes_to_the_job(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(submit, "submit", lambda *args: calls.append(args) or 0)
    argv = ["submit", "train", "--data", "s3://b/t", "--address", "http://h:8265", "--gpu"]
    assert cli.main([*argv, "--", "--address", "job's own"]) == 0
    job, job_args, address, working_dir, runtime_env = calls[0]
    assert (job, address, working_dir, runtime_env) == ("train", "http://h:8265", ROOT, None)
    assert job_args == ["--data", "s3://b/t", "--gpu", "--address", "job's own"]


def test_submit_refuses_an_address_that_ray_would_override(monkeypatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    with pytest.raises(ConfigError, match="conflicts"):
        submit.submit("label", [], address="http://h:8265")


def test_submit_uploads_the_checkout_with_the_cluster_runtime_env() -> None:
    env = submit.runtime_env(ROOT)
    assert env["working_dir"] == str(ROOT)
    assert env["env_vars"]["TF_USE_LEGACY_KERAS"] == "1"
    assert "/.venv/" in env["excludes"]
    with pytest.raises(ConfigError, match="no jobs/train.py"):
        submit.submit("train", [], working_dir=ROOT / "cluster")


def test_train_job_smoke_test_draws_a_tree_and_lets_flags_override(monkeypatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    train_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_job)
    calls = []

    def fake_main(argv: list[str]) -> int:
        args = cli.build_parser().parse_args(argv)
        calls.append((args, len(list(Path(args.data).rglob("*.jpg")))))
        return 0

    monkeypatch.setattr(train_job, "main", fake_main)
    assert train_job.run(["--smoke-test", "--epochs", "2", "--gpu"]) == 0
    ((args, images),) = calls
    assert args.command == "train" and args.epochs == 2 and args.use_gpu  # given flags win
    assert (args.image_size, args.workers, args.batch_size) == (32, 1, 8)  # the smoke defaults
    assert images == 60 and not Path(args.data).exists()  # drawn, then cleaned up
