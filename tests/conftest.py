"""Shared fixtures: synthetic image trees, a local Ray runtime, a small saved model.

Tests generate every image they use; nothing is downloaded and no data is committed.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The log files of the commands tests run (in-process and as subprocesses), removed at the end.
_command_logs = tempfile.mkdtemp(prefix="dogbread-test-logs-")
os.environ["DOGBREAD_LOG_DIR"] = _command_logs
atexit.register(shutil.rmtree, _command_logs, ignore_errors=True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs in two pytest-xdist processes. Each gets a Ray temp dir of its own: ray.init()
    # with no address joins the cluster recorded in <temp dir>/ray/ray_current_cluster, where the
    # other process's ray.cluster_utils.Cluster records itself. Short: socket paths <= 107 bytes.
    _ray_tmpdir = tempfile.mkdtemp(prefix=f"dbx-{os.environ['PYTEST_XDIST_WORKER']}-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = _ray_tmpdir
    atexit.register(shutil.rmtree, _ray_tmpdir, ignore_errors=True)

SMALL = 64  # tests train and label at 64x64: the same network, a fraction of the compute

# pytest-xdist (pyproject's addopts) runs the suite in two processes, one work unit at a time: a
# test file, so that a module's fixtures are built once, or all of tests/reliability, whose files
# share the costly session fixtures of its conftest. The longest units go first, so that neither
# process is left alone with a long one at the end (measured in one process: ~95 to ~150 s each).
LONGEST_FIRST = (
    "tests/reliability",
    "tests/test_train_faults.py",
    "tests/test_train.py",
    "tests/test_bench.py",
)


def _work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "tests/reliability" if path.startswith("tests/reliability/") else path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_work_unit(item.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    # Not --dist loadgroup with marks: xdist 3.8 renames the items for it in a way pytest 9.2
    # ignores, so the groups were silently dropped.
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return ByWorkUnit(config, log)


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory: pytest.TempPathFactory) -> str:
    """bread/ and dog/ with 60 synthetic JPEGs each, shared read-only by every test."""
    from dogbread.synth import write_synthetic_tree

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_tree(root, per_class=60, seed=1)
    return str(root)


PROJECT = Path(__file__).resolve().parents[1]


def subprocess_env(remove: tuple[str, ...] = (), **changes: str) -> dict[str, str]:
    """os.environ without RAY_ADDRESS (a run starts its own Ray) and `remove`, with `changes`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in remove}
    env["PYTHONPATH"] = str(PROJECT)
    env.update(changes)
    return env


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray runtime for the tests of one module (2 CPUs, like this machine)."""
    yield from _local_ray(num_gpus=0)


@pytest.fixture(scope="module")
def ray_local_gpu():
    """ray_local with one GPU, faked: Ray schedules on it, TensorFlow runs on the CPU."""
    yield from _local_ray(num_gpus=1)


def _local_ray(num_gpus: int):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        num_gpus=num_gpus,
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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """One real SeaweedFS S3 server on loopback for the session, with a random secret key.

    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_REGION point at it for the session (and are
    restored at the end), so code under test finds credentials the standard way. The endpoint is
    not put in the environment: tests pass it explicitly, as users do with --s3-endpoint.
    """
    from dogbread.seaweed import local_s3_server

    with local_s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
