"""Task streams for the pipeline: sources -> benchmark task splits -> WebDataset shards -> streaming loader.

Typical use (driver, then each Ray job)::

    manifest = ensure_shards(benchmark_cfg, "data/shards")       # writes each task once, then reuses
    loader = make_loader(manifest, manifest.new_tasks[0], "train", batch_size=64)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader: ...

``build_tasks`` / ``load_source`` give the same data as in-memory arrays. The writer itself streams: a source
lists its members (``list_members``: labels, nothing decoded), ``plan_task`` picks a task's rows from the labels,
and ``write_task`` reads one shard's worth at a time; a WebDataset corpus (``webdataset`` source, :mod:`.corpus`)
is indexed once (``ensure_index``) and read by offset.
"""

from .arrays import ArraySplit, TaskData, stratified_split, stratified_subset
from .benchmarks import (BENCHMARK_KINDS, TaskSpec, list_benchmarks, load_benchmark_config, register_kind, task_names,
                         task_specs)
from . import catalogue  # noqa: F401  (registers the catalogue stream kind)
from .plan import TaskPlan, build_task, build_tasks, plan_task
from .cifar100 import CPG_ORDER, FINE_NAMES, SUPERCLASSES, superclass_of
from ..errors import ConfigError, DataError, ShardCorruptError, SourceNotFoundError, UnknownNameError
from .holdout import in_holdout
from .loader import Loader, iter_samples, make_loader
from .manifest import Manifest, TaskInfo, sha256_file
from .shards import TASKS_DIR, ensure_shards, in_process, spec_hash, write_task
from .sources import SOURCES, data_home, list_members, load_source, register_source
from .corpus import ensure_index
from .members import MemberError, Members

__all__ = [
    "ArraySplit",
    "BENCHMARK_KINDS",
    "CPG_ORDER",
    "ConfigError",
    "DataError",
    "FINE_NAMES",
    "Loader",
    "Manifest",
    "SOURCES",
    "SUPERCLASSES",
    "ShardCorruptError",
    "SourceNotFoundError",
    "TaskData",
    "TaskInfo",
    "UnknownNameError",
    "build_task",
    "build_tasks",
    "data_home",
    "ensure_index",
    "list_members",
    "MemberError",
    "Members",
    "plan_task",
    "TaskPlan",
    "ensure_shards",
    "in_holdout",
    "iter_samples",
    "list_benchmarks",
    "load_benchmark_config",
    "load_source",
    "make_loader",
    "register_kind",
    "register_source",
    "sha256_file",
    "spec_hash",
    "stratified_split",
    "stratified_subset",
    "superclass_of",
    "task_names",
    "task_specs",
    "TaskSpec",
    "TASKS_DIR",
    "write_task",
    "in_process",
]
