"""Where bytes live: local paths and s3:// URIs behind one pyarrow filesystem interface.

The S3 filesystem is built explicitly (endpoint, region, credentials from the standard AWS chain)
because AWS_ENDPOINT_URL is not honoured everywhere in the Ray/pyarrow stack. Credentials are
handed to pyarrow and never written to configs, logs or outputs.
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from dogbread.errors import StorageError, first_line


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint_from_env(explicit: str | None = None) -> str | None:
    """The S3 endpoint: the explicit option, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem from the standard AWS credential chain (env, profile, role)."""
    import boto3  # imported here: local-only runs never need it

    session = boto3.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise StorageError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
        )
    frozen = credentials.get_frozen_credentials()
    kwargs = {}
    if frozen.token is None:
        # Static keys are handed over explicitly, so every Ray worker that unpickles this
        # filesystem can use them. Temporary ones (a role, IRSA, SSO) would expire inside a long
        # job: those are left to the AWS chain on each node, which refreshes them.
        kwargs = {"access_key": frozen.access_key, "secret_key": frozen.secret_key}
    endpoint = s3_endpoint_from_env(endpoint)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return _S3FileSystem(
        region=session.region_name or os.environ.get("AWS_REGION") or "us-east-1",
        # A store that goes away for a while is retried rather than failing the job: 11 retries,
        # 50 ms to 51 s apart, ride out ~100 s. Not the "standard" strategy: its retry quota,
        # shared by a process's parallel reads, ran dry in a 7 s outage and then every read
        # failed at once, without a retry.
        retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=12),
        **kwargs,
    )


class _S3FileSystem(pafs.S3FileSystem):
    """An S3FileSystem that keeps its retry strategy when pickled.

    pyarrow (26) leaves `retry_strategy` out of the pickled state, so the copies Ray ships to its
    workers fell back to 3 attempts and a store away for a second failed the job there.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._retry_strategy = kwargs.get("retry_strategy")

    def __reduce__(self):
        _, (state,) = super().__reduce__()
        return _rebuild_s3_filesystem, ({**state, "retry_strategy": self._retry_strategy},)


def _rebuild_s3_filesystem(kwargs: dict) -> _S3FileSystem:
    return _S3FileSystem(**kwargs)


def fs_path(uri: str) -> str:
    """The path of `uri` inside its filesystem: bucket/key for S3, an absolute local path."""
    if is_s3(uri):
        return uri[len("s3://") :].rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def resolve(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3://bucket/key URI."""
    fs = s3_filesystem(s3_endpoint) if is_s3(uri) else pafs.LocalFileSystem()
    return fs, fs_path(uri)


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The user-facing name of a path inside `fs` (s3://... for S3, the plain path locally)."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_atomic(
    fs: pafs.FileSystem, path: str, data: bytes | pa.Table, row_group_size: int | None = None
) -> None:
    """Write a whole file or nothing: an S3 PUT is atomic; locally a hidden temp file (never
    taken for data) is synced, then renamed. A Table is written as Parquet."""
    import pyarrow.parquet as pq

    target = path
    if not isinstance(fs, pafs.S3FileSystem):
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        name = f".{posixpath.basename(path)}.tmp-{os.getpid()}"
        target = posixpath.join(posixpath.dirname(path), name)
    with fs.open_output_stream(target) as out:
        if isinstance(data, pa.Table):
            pq.write_table(data, out, row_group_size=row_group_size)
        else:
            out.write(data)
    if target != path:
        with open(target, "rb+") as f:
            os.fsync(f.fileno())  # or a machine crash could leave a renamed but empty file
        os.replace(target, path)


def write_bytes(uri: str, data: bytes, s3_endpoint: str | None = None) -> None:
    """Write a small file whole (see write_atomic), with one line if it cannot be written."""
    fs, path = resolve(uri, s3_endpoint)
    try:
        write_atomic(fs, path, data)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {first_line(exc)}") from None


def write_text(uri: str, text: str, s3_endpoint: str | None = None) -> None:
    write_bytes(uri, text.encode(), s3_endpoint)


def read_text(uri: str, s3_endpoint: str | None = None) -> str:
    fs, path = resolve(uri, s3_endpoint)
    try:
        return read_bytes(fs, path).decode()
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {first_line(exc)}") from None


def exists(uri: str, s3_endpoint: str | None = None) -> bool:
    fs, path = resolve(uri, s3_endpoint)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_writable(uri: str, s3_endpoint: str | None = None) -> None:
    """Fail early with one line when an output location cannot be written (before heavy work)."""
    probe = join(uri, f".dogbread-write-check-{os.getpid()}")
    write_bytes(probe, b"", s3_endpoint)
    fs, path = resolve(probe, s3_endpoint)
    fs.delete_file(path)
