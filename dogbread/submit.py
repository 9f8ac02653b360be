"""`dogbread submit train|label ARGS`: run a job on a Ray cluster through its Jobs API.

Uploads a dogbread checkout as the job's working dir (minus the excludes of
cluster/runtime_env.yaml), runs `python jobs/<job>.py ARGS` there, prints the job's logs as they
come, and returns 0 if the job SUCCEEDED, 1 otherwise. Ctrl-C stops following, not the job.

Token auth: Ray's client sends the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)
only when RAY_AUTH_MODE=token. No --token flag, on purpose: command lines are visible to all users.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dogbread import console
from dogbread.errors import ConfigError, DogbreadError

JOBS = ("train", "label")
# The checkout this dogbread is imported from: jobs/ and cluster/ sit beside dogbread/.
CHECKOUT = Path(__file__).resolve().parent.parent


class ClusterError(DogbreadError):
    """A Ray cluster that cannot be reached, refuses the job, or drops its log stream."""


def build_parser(job: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"dogbread submit {job}",
        description=f"Run `dogbread {job}` on a Ray cluster; other flags go to the job.",
        allow_abbrev=False,  # an abbreviated job flag must not be taken for one of these
    )
    parser.add_argument("--address", help="http://HEAD:8265 (default: RAY_ADDRESS)")
    parser.add_argument("--working-dir", type=Path, default=CHECKOUT, help=f"({CHECKOUT})")
    parser.add_argument("--runtime-env", type=Path, help="(WORKING_DIR/cluster/runtime_env.yaml)")
    return parser


def main(job: str, argv: Sequence[str]) -> int:
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    opts, job_args = build_parser(job).parse_known_args(argv[:cut])
    job_args += argv[cut + 1 :]
    return submit(job, job_args, opts.address, opts.working_dir, opts.runtime_env)


def runtime_env(working_dir: Path, path: Path | None = None) -> dict[str, Any]:
    """The runtime env file (env vars, upload excludes) with `working_dir` set."""
    path = path or working_dir / "cluster" / "runtime_env.yaml"
    try:
        env = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read runtime env {path}: {exc.strerror}") from None
    return {**env, "working_dir": str(working_dir.resolve())}


def submit(
    job: str,
    job_args: Sequence[str],
    address: str | None = None,
    working_dir: Path = CHECKOUT,
    runtime_env_file: Path | None = None,
) -> int:
    """Submit `python jobs/<job>.py job_args`, print its logs; 0 if it SUCCEEDED, else 1."""
    if job not in JOBS or not (working_dir / "jobs" / f"{job}.py").is_file():
        raise ConfigError(f"no jobs/{job}.py in {working_dir}: is it a dogbread checkout?")
    # Ray's client lets these variables override its address argument: refuse to guess.
    env_address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if address and env_address and env_address != address:
        raise ConfigError(f"--address {address} conflicts with {env_address} in the environment")
    env = runtime_env(working_dir, runtime_env_file)

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    job_id = f"dogbread-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        client = JobSubmissionClient(address)
        client.submit_job(
            entrypoint=shlex.join(["python", f"jobs/{job}.py", *job_args]),
            runtime_env=env,
            submission_id=job_id,
            metadata={"dogbread_job": job},
        )
    except AuthenticationError as exc:
        hint = "set RAY_AUTH_MODE=token, and the cluster's token in RAY_AUTH_TOKEN or ~/.ray"
        raise ClusterError(f"{str(exc).splitlines()[0]}: {hint}") from None
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(str(exc).splitlines()[0]) from None
    where = client.get_address()
    print(f"dogbread: submitted {job_id} to {where}", file=console.terminal(), flush=True)
    try:
        asyncio.run(_print_logs(client, job_id))
        status = client.get_job_status(job_id)
        while not status.is_terminal():  # the log stream can end a moment before the status
            time.sleep(0.5)
            status = client.get_job_status(job_id)
    except KeyboardInterrupt:
        print(
            f"dogbread: {job_id} goes on; ray job stop --address {where} {job_id}",
            file=console.terminal(),
        )
        raise
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"lost job {job_id} on {where}: {str(exc).splitlines()[0]}") from None
    print(f"dogbread: job {job_id} {status.value}", file=console.terminal(), flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


async def _print_logs(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
