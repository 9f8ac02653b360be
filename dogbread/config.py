"""Frozen job configs: defaults here, overridden by a YAML file, overridden by CLI flags.

Every job writes its resolved config as config.yaml beside its output, so a run can be repeated.
Configs never hold credentials: S3 keys come from the standard AWS chain at run time.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dogbread.errors import ConfigError

T = TypeVar("T")
CONFIG_FILENAME = "config.yaml"
RECIPES = Path(__file__).parent / "recipes"  # named TrainConfig bases: `train --recipe NAME`


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    out: str
    per_class: int = 100
    seed: int = 0
    classes: tuple[str, ...] = ("bread", "dog")

    def __post_init__(self) -> None:
        _require(self.per_class >= 1, "per_class must be at least 1")
        _require(len(self.classes) >= 2, "at least two classes are needed")


# dogbread.model builds them: two from scratch, then Keras Applications backbones
ARCHITECTURES = ("seed", "residual", "mobilenet_v3_small", "efficientnet_v2_b0")
BACKBONES = ARCHITECTURES[2:]
LR_SCHEDULES = ("constant", "cosine")
LABEL_PLANS = ("auto", "fused", "split")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str  # a labeled tree (local or s3://) or a manifest written by `dogbread manifest`
    out: str  # the run dir (local or s3://)
    workers: int = 2
    use_gpu: bool = False
    epochs: int = 10
    batch_size: int = 32  # per worker: a step of N workers sees N * batch_size images
    learning_rate: float = 1e-3  # for one worker's batch; N workers train at N times it
    warmup_epochs: int = 1  # with N > 1 workers, the rate rises from 1x to Nx over these epochs
    image_size: int = 256
    augment: bool = False
    architecture: str = "seed"  # or "residual": stronger from scratch, not the seed's
    lr_schedule: str = "constant"  # or "cosine": decays to 0 over `epochs`
    patience: int = 3  # early stopping on validation loss
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int | None = None  # None: drawn when the run starts; config.yaml records the one used
    max_failures: int = 2  # worker failures Ray Train retries from the last checkpoint
    # Distillation: a model dir (a run or an ensemble) whose probabilities on the same augmented
    # images the student also learns from; the loss is (1 - distill_weight) * cross-entropy on
    # the labels + distill_weight * T^2 * KL(teacher || student), both softened by T.
    teacher: str | None = None
    distill_temperature: float = 2.0
    distill_weight: float = 0.5
    # A backbone architecture starts from these weights (a .h5 or .weights.h5 file, local or
    # s3://; "imagenet": Keras fetches its own file), frozen for freeze_epochs while the head
    # learns, then fine-tuned whole at a tenth of the rate.
    backbone_weights: str | None = None
    freeze_epochs: int = 0
    # A worker reads its decoded shards once and keeps them in memory when they fit (0: never)
    worker_cache_mib: int = 2048
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        _require(self.workers >= 1, "workers must be at least 1")
        _require(self.epochs >= 1, "epochs must be at least 1")
        _require(self.batch_size >= 1, "batch_size must be at least 1")
        _require(self.warmup_epochs >= 0, "warmup_epochs must be at least 0")
        _require(self.learning_rate > 0, "learning_rate must be positive")
        # Three 3x3 convolutions with 2x2 pooling need at least 22 pixels; 32 leaves margin.
        _require(self.image_size >= 32, "image_size must be at least 32")
        _require(self.patience >= 1, "patience must be at least 1")
        _require(
            self.architecture in ARCHITECTURES, f"architecture must be {' or '.join(ARCHITECTURES)}"
        )
        _require(
            self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be {' or '.join(LR_SCHEDULES)}"
        )
        _require(self.max_failures >= 0, "max_failures must not be negative")
        _require(self.distill_temperature > 0, "distill_temperature must be positive")
        _require(0 <= self.distill_weight <= 1, "distill_weight must be in [0, 1]")
        backbone = self.architecture in BACKBONES
        _require(
            backbone or not (self.backbone_weights or self.freeze_epochs),
            f"backbone_weights and freeze_epochs need a backbone: {', '.join(BACKBONES)}",
        )
        _require(self.freeze_epochs >= 0, "freeze_epochs must not be negative")
        _require(  # its rate, then a tenth of it, replaces the schedule and the warmup
            not (self.freeze_epochs and self.lr_schedule != "constant"),
            "freeze_epochs has a schedule of its own: lr_schedule must be constant",
        )
        _require(self.worker_cache_mib >= 0, "worker_cache_mib must not be negative")
        fractions = (self.val_fraction, self.test_fraction)
        _require(
            all(0 < f < 1 for f in fractions) and sum(fractions) < 1,
            "val_fraction and test_fraction must be between 0 and 1 and leave a training split",
        )


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    model: str
    input: str  # a folder, s3://bucket/prefix, or a manifest (.csv/.parquet) of paths
    output: str  # a folder or s3://bucket/prefix that receives Parquet files
    batch_size: int = 128  # images per inference call and per kept batch
    # Inputs per shard, the unit of commit: its rows become one data file (one per label with
    # partition_by), ~30 MiB at 1M rows. A crash redoes only the batches in flight.
    rows_per_file: int = 1_000_000
    # Where images are decoded: "fused" in the labeling actors (one machine: no pixels through
    # the object store), "split" in CPU tasks on every node, the actors only infer (clusters,
    # GPUs); "auto" splits on --gpu or a cluster of several CPU nodes (label.py).
    plan: str = "auto"
    actors: str = "1"  # labeling actors: N, or MIN:MAX for a pool that grows with the work
    # CPUs each labeling actor reserves and uses (its LiteRT threads); None: the plan's default
    actor_cpus: float | None = None
    use_gpu: bool = False
    threshold: float | None = None  # below it the label is "uncertain"
    partition_by: str | None = None  # "label" writes Hive-style label=... folders
    s3_endpoint: str | None = None
    report: bool = True  # write _report.html into the output at the end
    dry_run: bool = False  # plan and count, print the JSON, label nothing and write nothing

    def actor_pool(self) -> tuple[int, int]:
        """(min, max) labeling actors from `actors`: "4" is (4, 4), "1:8" is (1, 8)."""
        low, _, high = self.actors.partition(":")
        try:
            sizes = int(low), int(high or low)
        except ValueError:
            raise ConfigError(f"actors must be N or MIN:MAX, got {self.actors!r}") from None
        _require(1 <= sizes[0] <= sizes[1], "actors must be at least 1, and MIN at most MAX")
        return sizes

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size must be at least 1")
        _require(self.plan in LABEL_PLANS, f"plan must be {' or '.join(LABEL_PLANS)}")
        self.actor_pool()  # raises on a malformed --actors
        _require(self.actor_cpus is None or self.actor_cpus > 0, "actor_cpus must be positive")
        _require(self.rows_per_file >= 1, "rows_per_file must be at least 1")
        _require(self.threshold is None or 0 <= self.threshold <= 1, "threshold must be in [0, 1]")
        _require(self.partition_by in (None, "label"), "partition_by can only be label")


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    members: tuple[str, ...]  # run dirs (or model.keras files), local or s3://
    out: str  # the ensemble's model dir (local or s3://)
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        _require(len(self.members) >= 2, "an ensemble needs at least two members")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def load_config(
    cls: type[T],
    path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    recipe: str | None = None,
) -> T:
    """Build `cls` from defaults, then the recipe named `recipe`, then the YAML file at `path`,
    then non-None `overrides`."""
    values: dict[str, Any] = {}
    if recipe:
        values.update(_read_yaml(recipe_path(recipe)))
    if path:
        values.update(_read_yaml(path))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required {cls.__name__} key(s): {', '.join(missing)}")
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def recipe_names() -> list[str]:
    """The shipped recipes (dogbread/recipes/NAME.yaml), sorted."""
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def recipe_path(name: str) -> str:
    """The shipped recipe file of that name."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no recipe {name!r}: the recipes are {', '.join(recipe_names())}")
    return str(path)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    return loaded or {}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):  # `X | None`
        if value is None:
            return None
        return _coerce(name, value, next(a for a in args if a is not type(None)))
    if typing.get_origin(hint) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(name, item, args[0]) for item in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:  # YAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value).strip()
    raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")


def config_to_dict(config: Any) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def dump_config(config: Any) -> str:
    """The resolved config as YAML text, with the job's name as a comment."""
    return f"# dogbread {type(config).__name__}\n" + yaml.safe_dump(
        config_to_dict(config), sort_keys=False
    )
