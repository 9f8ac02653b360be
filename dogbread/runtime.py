"""Joining or starting Ray, the one place that knows how.

Jobs join an existing cluster when there is one (inside `ray job submit`, or RAY_ADDRESS set) and
start a local Ray otherwise, so the same command runs on a laptop and on a cluster.
"""

from __future__ import annotations

import logging
import os
import socket

import ray

from dogbread import console
from dogbread.errors import ClusterError

log = logging.getLogger(__name__)

# Workers must use tf-keras too, and must know it before TensorFlow is imported.
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
REACH_TIMEOUT_S = 5.0  # a head that does not accept a TCP connection in this long is not there


def ensure_ray() -> str | None:
    """Connect to Ray: "local" when this call started a Ray of its own, "joined" when it joined a
    cluster (the caller shuts down either), None when Ray was up already.

    A local Ray has no autoscaler: what it lacks (GPUs, CPUs for more workers) never comes, so
    callers refuse such work on it at once, where a cluster may still grow.
    """
    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_address(address)
        # A cluster's workers get WORKER_ENV from the job's runtime_env (cluster/runtime_env.yaml).
        try:
            ray.init(
                address=address, logging_level=logging.WARNING, log_to_driver=console.verbose()
            )
        except ConnectionError as exc:  # reachable, but it would not let us in
            raise ClusterError(
                f"cannot join the Ray cluster at {address} (RAY_ADDRESS): {exc}; if it has token "
                "authentication on, set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or "
                "~/.ray/auth_token (cluster/README.md)"
            ) from None
    else:
        ray.init(
            runtime_env={
                "env_vars": WORKER_ENV,
                "worker_process_setup_hook": "dogbread.runtime.quiet_train_cleaner",
            },
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=console.verbose(),  # quiet: workers' output stays in Ray's log files
        )
    started = "local" if address in (None, "", "local") else "joined"  # "local": a new one
    log.info("Ray %s: %s", started, ray.cluster_resources())
    return started


def _check_address(address: str) -> None:
    """Fail in seconds on an address that cannot be joined: ray.init retries a head that is not
    there for minutes, and answers a dashboard address with a traceback.

    Only host:port addresses (ray:// too) are tried; "auto" and "local" are Ray's to resolve.
    """
    if address.startswith(("http://", "https://")):  # what `ray job submit` reads from it
        raise ClusterError(
            f"RAY_ADDRESS={address} is a dashboard (Jobs API) address, which `dogbread submit "
            "--address` takes; to run here on a cluster, set it to the head's GCS address "
            "(HEAD:6379), or unset it to run on a local Ray"
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or "://" in host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), REACH_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__  # "Connection refused", or "TimeoutError"
        raise ClusterError(
            f"no Ray cluster answers at {address} (RAY_ADDRESS): {reason}; start one, fix the "
            "address, or unset RAY_ADDRESS to run on a local Ray"
        ) from None


def quiet_train_cleaner() -> None:
    """Run in each worker of a local Ray: Ray Train's placement group cleaner asks the state API,
    which needs the dashboard, once a second whether the run's controller lives. A local Ray runs
    without the dashboard (seconds of start-up and a busy process on a laptop), so every ask
    failed with a warning: ~800 lines in a 14-minute training. The cleaner is for controllers
    that die and leave their placement group behind, which a local Ray does not outlive."""
    cleaner = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    logging.getLogger(cleaner).setLevel(logging.ERROR)
