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
