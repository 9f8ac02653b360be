"""How `dogbread label` runs its stages on Ray: where images are decoded, what each actor
reserves, and the Ray Data pipeline from shards to kept batches (label.py drives it).

    shards ─► expand (plan.paths_to_label) into blocks of batch_size paths
           ─► split plan only: decode_block tasks, one CPU each, on any node
           ─► Labeler actor pool (MIN:MAX): label, keep a batch file ─► {shard, rows, where}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from dogbread import plan
from dogbread.config import LabelConfig
from dogbread.labeler import Labeler, decode_block
from dogbread.output import Output
from dogbread.plan import Plan

SMALL_TASK_CPUS = 0.25  # expanding a shard's paths, committing a shard: mostly waiting on I/O
DECODE_CPUS = 1.0  # a decode_block task decodes on one thread
MIN_ACTOR_CPUS = 0.5  # a fused actor's share when many share a small machine
SPLIT_ACTOR_CPUS = 1.0  # a split actor only infers (or feeds its GPU)


def dataset(job: Job, shards: list[int], retried: set[int]) -> Any:
    """The Ray Data pipeline labeling the rows still to label of `shards` (`retried`: committed
    shards whose failed reads are labeled again); it yields one row per kept batch and shard."""
    import ray

    ds = ray.data.from_items(
        [{"shard": s} for s in shards], override_num_blocks=max(1, len(shards))
    )
    ds = ds.map_batches(
        plan.paths_to_label,
        batch_size=1,  # a shard a task: its paths are read once, then go on in blocks
        batch_format="pyarrow",
        fn_kwargs={"out": job.out, "retried": retried},
        num_cpus=SMALL_TASK_CPUS,
    )
    ds = _labeling_stages(job, _in_batches(ds, job.config.batch_size))
    # This dataset's own copy of the context: Ray's bars would fight with our line.
    ds.context.enable_progress_bars = ds.context.print_on_execution_start = False
    return ds


def _in_batches(ds: Any, rows: int) -> Any:
    """`ds` in blocks of `rows` rows, re-cut in the tasks that made them.

    Ray Data buffers what a task yields into blocks of up to 128 MiB: a shard would reach one
    actor as one block. Blocks of a batch each spread the work over the pool and keep progress.
    The repartition would run as tasks of its own, and Ray Data gives those a whole CPU, which a
    machine whose actors hold all but the small tasks' share never has free: the job would wait
    forever. Given the small tasks' resources it fuses into them (Ray 2.60's repartition takes no
    resource arguments, hence the one private field).
    """
    ds = ds.repartition(target_num_rows_per_block=rows)
    ds._logical_plan.dag.ray_remote_args["num_cpus"] = SMALL_TASK_CPUS
    return ds


def _labeling_stages(job: Job, ds: Any) -> Any:
    """Blocks of paths ─► (split plan: decode_block tasks on any node's CPUs ─►) the Labeler
    pool, which labels and keeps each block; yields the Labeler's counts per kept batch."""
    import ray

    config, resources = job.config, job.resources
    if resources.plan == "split":
        ds = ds.map_batches(
            decode_block,
            batch_format="pyarrow",
            fn_kwargs={"in_fs": job.in_fs, "image_size": job.card.image_size},
            num_cpus=DECODE_CPUS,
        )
    low, high = config.actor_pool()
    labeler_args = (job.model_file, job.card.to_json(), job.inference, job.in_fs, config.threshold)
    return ds.map_batches(
        Labeler,
        # A block is a batch. Ray refuses GPU map_batches without a batch_size; the blocks
        # already hold that many rows, so it is the same batching.
        batch_size=config.batch_size if config.use_gpu else None,
        batch_format="pyarrow",
        # Two batches in flight per actor: one's decoding and Parquet write overlap the
        # other's model calls (~7% more images/s here); the model runs one call at a time.
        # Not on GPUs, where two Keras calls at once would need twice the GPU memory.
        # min < max: Ray Data adds actors while blocks wait for one, up to max, and removes
        # idle ones; on an autoscaling cluster, actors that do not fit bring up nodes.
        compute=ray.data.ActorPoolStrategy(
            min_size=low,
            max_size=high,
            max_concurrent_calls_per_actor=1 if config.use_gpu else 2,
            enable_true_multi_threading=not config.use_gpu,
        ),
        num_cpus=resources.actor_cpus,
        num_gpus=1 if config.use_gpu else 0,
        fn_constructor_args=(*labeler_args, job.out, resources.actor_cpus),
    )


@dataclass(frozen=True)
class Resources:
    """Where decoding runs and what each labeling actor reserves (and uses)."""

    plan: str  # "fused" or "split"
    actor_cpus: float


def resources(config: LabelConfig) -> Resources:
    """--plan auto: fused on one machine without --gpu (no pixels through the object store:
    fastest there, bench/README), split on a cluster of several nodes or a head without CPUs,
    and with --gpu (the GPU's node alone cannot decode as fast as the GPU infers).

    A fused actor decodes and infers in its threads: by default the actors share the machine's
    CPUs but those kept for the small tasks. A split actor only infers: one CPU by default.
    """
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    plan = decode_plan(
        config, one_machine=len(nodes) == 1 and nodes[0]["Resources"].get("CPU", 0) > 0
    )
    if plan == "split":
        return Resources(plan, config.actor_cpus or SPLIT_ACTOR_CPUS)
    cpus = max(node["Resources"].get("CPU", 0) for node in nodes)
    return Resources(plan, fused_actor_cpus(cpus, config))


def decode_plan(config: LabelConfig, one_machine: bool) -> str:
    """--plan, with auto resolved: "fused" on one machine without --gpu, else "split"."""
    if config.plan != "auto":
        return config.plan
    return "fused" if one_machine and not config.use_gpu else "split"


def fused_actor_cpus(cpus: float, config: LabelConfig) -> float:
    """What each fused actor reserves on a machine of `cpus` CPUs: an equal share of all but
    the small tasks' (or --actor-cpus)."""
    if config.actor_cpus is not None:
        return config.actor_cpus
    per_actor = (cpus - 2 * SMALL_TASK_CPUS) / config.actor_pool()[1]
    return max(MIN_ACTOR_CPUS, per_actor)


@dataclass(frozen=True)
class Job:
    """What the labeling stages need, resolved once."""

    config: LabelConfig
    shards: Plan
    in_fs: pafs.FileSystem
    out: Output
    model_file: tuple[pafs.FileSystem, str]
    card: Any
    inference: Any  # a LiteRTModel, or None: each actor loads the Keras model itself
    ray_started: str | None  # as ensure_ray said
    resources: Resources


def label_in_driver(labeler: Labeler, out: Output, shard: int, rows: int) -> None:
    """Label the first `rows` paths of `shard` in this process, as an actor would keep them:
    the pipeline then skips them. label.py runs it while a local Ray starts."""
    first = next(plan.paths_to_label(pa.table({"shard": [shard]}), out, set()), None)
    if first is not None:
        labeler(first.slice(0, rows))
