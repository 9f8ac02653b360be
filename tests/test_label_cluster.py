"""`dogbread label --gpu` on a simulated cluster (`ray.cluster_utils.Cluster`): a head without
CPUs, two CPU-only nodes and one node with a fake GPU, on this one machine.

The split plan must decode on the CPU-only nodes and label on the GPU node only, as the summary's
per-node counts (recorded by the tasks and the actor themselves) say; and losing a CPU-only node
mid-run must cost neither a row nor add one: Ray retries the lost tasks and rebuilds lost blocks.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest
import ray

from dogbread import label
from dogbread.config import LabelConfig
from dogbread.runtime import WORKER_ENV

pytestmark = pytest.mark.slow
COPIES = 25  # of the 120 synthetic images: 3,000 inputs


class SimulatedCluster:
    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        # One CPU each: a GPU node whose actor holds its only CPU runs no decoding, so where the
        # decoding ran tells the plans apart.
        self.cpu_nodes = [self.cluster.add_node(num_cpus=1) for _ in range(2)]
        self.gpu_node = self.cluster.add_node(num_cpus=1, num_gpus=1)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, runtime_env={"env_vars": WORKER_ENV})
        self.cpu_ids = {node.node_id for node in self.cpu_nodes}

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def simulated() -> Iterator[SimulatedCluster]:
    cluster = SimulatedCluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def many_images(synthetic_tree: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("many")
    for i in range(COPIES):
        shutil.copytree(synthetic_tree, root / f"copy-{i:02d}")
    return str(root)


def _config(images: str, out: Path, small_model_dir: str) -> LabelConfig:
    return LabelConfig(
        model=small_model_dir,
        input=images,
        output=str(out),
        use_gpu=True,
        batch_size=32,
        rows_per_file=500,  # six shards, committed one by one while the rest is labeled
        report=False,
    )


def _assert_one_row_per_input(out: Path, images: str) -> None:
    rows = label.read_labels(str(out))
    inputs = {str(p) for p in Path(images).rglob("*.jpg")}
    assert rows.num_rows == len(inputs) == 120 * COPIES
    assert set(rows["path"].to_pylist()) == inputs  # every input, none twice
    assert pc.count(rows["label"]).as_py() == rows.num_rows  # all labeled, no error rows


def test_split_plan_decodes_on_cpu_nodes_and_labels_on_the_gpu_node(
    simulated, many_images, small_model_dir, tmp_path
):
    summary = label.run(_config(many_images, tmp_path / "out", small_model_dir))

    assert summary["complete"] and summary["labeled"] == summary["images"] == 120 * COPIES
    plan = summary["plan"]
    assert plan["decode"] == "split"  # auto: --gpu on a cluster
    assert set(plan["images_by_node"]["decoded"]) == simulated.cpu_ids  # every CPU node decodes
    assert set(plan["images_by_node"]["labeled"]) == {simulated.gpu_node.node_id}
    assert sum(plan["images_by_node"]["labeled"].values()) == summary["images"]
    _assert_one_row_per_input(tmp_path / "out", many_images)


def test_losing_a_cpu_node_mid_run_loses_and_duplicates_nothing(
    simulated, many_images, small_model_dir, tmp_path
):
    out = tmp_path / "out"
    removed: dict[str, int] = {}

    def remove_a_cpu_node_once_labeling_runs() -> None:
        # Once the first batch is kept, the work is under way: shards are still to commit.
        batches = out / "_dogbread" / "batches"
        while not any(batches.rglob("batch-*.pq")):
            if stop.wait(0.05):
                return
        removed["committed_before"] = len(list((out / "_dogbread" / "shards").glob("*.json")))
        simulated.cluster.remove_node(simulated.cpu_nodes[1])
        removed["node"] = 1

    stop = threading.Event()
    remover = threading.Thread(target=remove_a_cpu_node_once_labeling_runs)
    remover.start()
    try:
        summary = label.run(_config(many_images, out, small_model_dir))
    finally:
        stop.set()
        remover.join()

    assert removed.get("node") == 1, "the node was not removed while the job ran"
    assert removed["committed_before"] < summary["shards"]
    assert summary["complete"] and summary["labeled"] == summary["images"] == 120 * COPIES
    assert set(summary["plan"]["images_by_node"]["decoded"]) <= simulated.cpu_ids
    _assert_one_row_per_input(out, many_images)
