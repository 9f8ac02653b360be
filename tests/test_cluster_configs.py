"""The configs in cluster/: what must hold for them to run dogbread at all, checked offline.

Nothing here talks to Kubernetes or AWS; the Ray pieces (the launcher's schema, the working-dir
packager) are Ray's own code, at the pinned version.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from dogbread import cli
from dogbread.config import LabelConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CONFIGS = {"train": TrainConfig, "label": LabelConfig}


def _pinned_ray() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in dependencies:
        if match := re.fullmatch(r"ray(\[[\w,]*\])?==([\w.]+)", dependency.replace(" ", "")):
            return match.group(2)
    raise AssertionError("pyproject.toml does not pin ray with ==")


RAY = _pinned_ray()
DOCS = {
    path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for path in sorted(CLUSTER.glob("*.yaml"))
}
KUBERAY = [
    (name, doc)
    for name, docs in DOCS.items()
    for doc in docs
    if "ray.io" in doc.get("apiVersion", "")
]
RAY_JOBS = [(name, doc) for name, doc in KUBERAY if doc["kind"] == "RayJob"]
LABEL_JOB = next(doc for name, doc in RAY_JOBS if name == "kuberay-label-job.yaml")
# Every Ray cluster spec: a RayCluster's spec, or the one a RayJob creates.
CLUSTER_SPECS = [
    (name, doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"])
    for name, doc in KUBERAY
]
LAUNCHER = DOCS["aws.yaml"][0]
RUNTIME_ENV = DOCS["runtime_env.yaml"][0]


def _values(node: Any, key: str) -> list[Any]:
    """Every value of `key` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == key]
        return found + [x for v in node.values() for x in _values(v, key)]
    if isinstance(node, list):
        return [x for item in node for x in _values(item, key)]
    return []


def _containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in spec.get("workerGroupSpecs", [])]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifests_are_ray_io_v1_job_and_cluster_kinds() -> None:
    assert KUBERAY, "no KubeRay manifest in cluster/"
    assert {doc["apiVersion"] for _, doc in KUBERAY} == {"ray.io/v1"}
    kinds = sorted(doc["kind"] for _, doc in KUBERAY)
    assert kinds == ["RayCluster", "RayJob", "RayJob"]


def _entrypoint_config(name: str, doc: dict) -> Any:
    """The config a RayJob's entrypoint makes: parsed exactly as the job will on the cluster."""
    python, script, *args = shlex.split(doc["spec"]["entrypoint"])
    match = re.fullmatch(r"/home/ray/dogbread/jobs/(\w+)\.py", script)
    assert python == "python" and match, f"{name}: the entrypoint is not python <image>/jobs/X.py"
    job = match.group(1)
    assert (ROOT / "jobs" / f"{job}.py").is_file()
    return cli.config_from_args(CONFIGS[job], cli.build_parser().parse_args([job, *args]))


def _is_gpu_group(group: dict) -> bool:
    return bool(_values(group, "nvidia.com/gpu"))


@pytest.mark.parametrize("name, doc", RAY_JOBS, ids=[name for name, _ in RAY_JOBS])
def test_rayjob_entrypoint_runs_a_job_file_with_flags_dogbread_accepts(name, doc) -> None:
    config = _entrypoint_config(name, doc)  # the flags parse and make a valid config
    assert config.use_gpu, f"{name}: a GPU cluster whose job does not ask for GPUs"
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert env["env_vars"]["TF_USE_LEGACY_KERAS"] == "1"


def test_rayjobs_cover_train_and_label() -> None:
    scripts = {Path(shlex.split(doc["spec"]["entrypoint"])[1]).stem for _, doc in RAY_JOBS}
    assert scripts == {"train", "label"}


@pytest.mark.parametrize("name, spec", CLUSTER_SPECS, ids=[name for name, _ in CLUSTER_SPECS])
def test_gpu_workers_scale_from_zero_and_every_pod_requests_resources(name, spec) -> None:
    assert spec["rayVersion"] == RAY
    assert spec["enableInTreeAutoscaling"] is True, f"{name}: no autoscaler to add GPU workers"
    assert spec["authOptions"]["mode"] == "token"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _is_gpu_group(g)]
    assert gpu_groups, f"{name}: no GPU worker group"
    for group in spec["workerGroupSpecs"]:  # GPU and CPU groups alike: pods only for work
        assert group["minReplicas"] == 0 and group["replicas"] == 0, group["groupName"]
        assert group["maxReplicas"] >= 1
    gpu_names = {g["groupName"] for g in gpu_groups}
    for group_name, container in _containers(spec):
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), f"{name}/{group_name}"
        assert {"cpu", "memory"} <= set(resources["limits"]), f"{name}/{group_name}"
        if group_name in gpu_names:
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    head = dict(_containers(spec))["head"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"], f"{name}: a GPU for the head"


@pytest.mark.parametrize("name, spec", CLUSTER_SPECS, ids=[name for name, _ in CLUSTER_SPECS])
def test_ray_start_params_are_strings(name, spec) -> None:
    # KubeRay passes them to `ray start` as --key=value; its CRD wants strings ("0", not 0).
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{name}: {params}"


# The clusters that label: the decoding of the split plan needs CPU nodes besides the GPU ones.
LABELING_SPECS = [
    (name, spec)
    for name, spec in CLUSTER_SPECS
    if name in ("kuberay-label-job.yaml", "kuberay-cluster.yaml")
]


@pytest.mark.parametrize("name, spec", LABELING_SPECS, ids=[name for name, _ in LABELING_SPECS])
def test_labeling_clusters_have_a_cpu_only_group_for_decoding(name, spec) -> None:
    cpu_groups = [g for g in spec["workerGroupSpecs"] if not _is_gpu_group(g)]
    assert cpu_groups, f"{name}: no CPU-only worker group to decode on"
    for group in cpu_groups:
        assert not group["template"]["spec"].get("tolerations"), "a CPU pod on GPU nodes"
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["requests"]["cpu"]) >= 4


def test_label_job_head_runs_only_the_driver_and_the_plan_is_split() -> None:
    spec = LABEL_JOB["spec"]["rayClusterSpec"]
    # No task or actor on the head: decoding goes to the CPU group, inference to the GPU group.
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    config = _entrypoint_config("kuberay-label-job.yaml", LABEL_JOB)
    assert config.plan == "split" or (config.plan == "auto" and config.use_gpu)
    low, high = config.actor_pool()
    assert 1 <= low < high, "the actor pool does not grow with the work"
    # Every actor the pool may start fits a pod of the GPU group: 1 GPU and its CPUs.
    (gpu_group,) = [g for g in spec["workerGroupSpecs"] if _is_gpu_group(g)]
    assert high <= gpu_group["maxReplicas"]
    (container,) = gpu_group["template"]["spec"]["containers"]
    assert (config.actor_cpus or 1) <= int(container["resources"]["requests"]["cpu"])


def _tag(image: str) -> str:
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{image} has no tag"
    return tag


def test_every_image_and_the_dockerfile_base_are_the_pinned_ray() -> None:
    images = [image for docs in DOCS.values() for doc in docs for image in _values(doc, "image")]
    assert len(images) >= 7
    for image in images:
        assert _tag(image).startswith(f"{RAY}-"), f"{image} is not Ray {RAY}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert bases == [f"rayproject/ray:{RAY}-py311-gpu"]
    requires_python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert requires_python["requires-python"] == ">=3.11,<3.12"  # py311 in the tags
    assert re.search(r"^ENV TF_USE_LEGACY_KERAS=1\b", dockerfile, flags=re.MULTILINE)


def test_aws_launcher_has_a_head_and_autoscaling_gpu_and_cpu_workers() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert LAUNCHER["provider"]["type"] == "aws"
    types = LAUNCHER["available_node_types"]
    assert LAUNCHER["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != LAUNCHER["head_node_type"]}
    gpu = [t for t in workers.values() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    # CPU-only workers too, for the split label plan's decoding, also scaled from 0.
    cpu = [t for t in workers.values() if t not in gpu]
    assert cpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in cpu)
    assert all(not t["resources"].get("GPU") for t in cpu)
    # The cluster-wide cap leaves room for every type's maximum.
    assert LAUNCHER["max_workers"] >= sum(t["max_workers"] for t in workers.values())
    assert "--env RAY_AUTH_MODE=token" in LAUNCHER["docker"]["run_options"]
    validate_config(prepare_config(copy.deepcopy(LAUNCHER)))  # Ray's own schema


def test_runtime_env_sets_tf_keras_and_keeps_the_venv_out_of_the_upload(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import create_package

    assert RUNTIME_ENV["env_vars"]["TF_USE_LEGACY_KERAS"] == "1"
    assert set(RUNTIME_ENV) == {"env_vars", "excludes"}  # working_dir is the submitter's choice
    package = tmp_path / "working_dir.zip"
    # .gitignore not honoured: the excludes must do the job on their own.
    create_package(str(ROOT), package, include_gitignore=False, excludes=RUNTIME_ENV["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert {"jobs/train.py", "jobs/label.py", "dogbread/cli.py"} <= set(names)
    assert not [n for n in names if n.startswith((".venv/", ".git/")) or "__pycache__" in n]
    assert package.stat().st_size < 20 * 2**20


def test_no_credentials_in_cluster_files() -> None:
    # Key material, or a token given as a literal value (placeholders like `...` or `$(...)` pass).
    secrets = re.compile(
        r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*[\w/+]{16}"
        r"|RAY_AUTH_TOKEN\s*[:=]\s*[\w-]{16}|name:\s*RAY_AUTH_TOKEN\s+value:",
        flags=re.IGNORECASE,
    )
    for path in CLUSTER.iterdir():
        assert not secrets.search(path.read_text()), f"{path.name} holds a credential"
