"""A task before any image is read: which members of its source make each split, picked from labels alone.

:func:`plan_task` is what the shard writer streams from; :func:`build_task` decodes the same members into memory
(tests, notebooks), so the two hold the same samples in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import ArraySplit, TaskData
from .benchmarks import TaskSpec, task_specs
from ..errors import ConfigError
from .members import ArrayMembers, Members, Subset, pick
from .sources import decode_members, list_members, source_kind


def build_tasks(benchmark: dict[str, Any]) -> list[TaskData]:
    """All tasks of a benchmark in memory, caps applied, train split in shard order; the first is the initial task.
    (For tests and notebooks: the shard writer builds one task at a time, see :func:`build_task`.)"""
    return [build_task(spec) for spec in task_specs(benchmark)]


@dataclass(frozen=True)
class SplitPlan:
    """One split of a task as the writer reads it: the source's listed members, and the rows it keeps, in write
    order, with their task labels."""

    members: Members
    rows: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class TaskPlan:
    """A task before any image is read: its class names and the members of each split (see :func:`plan_task`)."""

    spec: TaskSpec
    class_names: list[str]
    splits: dict[str, SplitPlan]
    source: str
    flip_default: bool

    @property
    def flip(self) -> bool:
        return self.flip_default if self.spec.flip is None else bool(self.spec.flip)


def plan_task(spec: TaskSpec, cache_dir: Path | None = None) -> TaskPlan:
    """Which members make the task, from the source's listing alone (nothing decoded): its classes (or CIFAR-100
    superclass), capped (seeded, stratified; test with seed + 1), the train split in its seeded shard order. A
    class of the task without members in a split is refused here, before any image is read. ``cache_dir``: where
    a source keeps an index (a corpus's), None for its default."""
    kind = source_kind(spec.source)
    splits: dict[str, SplitPlan] = {}
    for split, seed, order in (("train", spec.caps["seed"], spec.order_seed), ("test", spec.caps["seed"] + 1, None)):
        members = list_members(spec.source, split, cache_dir)
        rows, labels, names = pick(members, classes=spec.classes, superclass=spec.superclass, cap=spec.caps[split],
                                   cap_seed=seed, order_seed=order,
                                   what=f"task {spec.name!r} ({split} split of its {kind.name} source)")
        if len(rows) == 0:
            raise ConfigError(f"task {spec.name!r} has no {split} samples; check its classes and source")
        splits[split] = SplitPlan(members, rows, labels)
    return TaskPlan(spec, names, splits, kind.name, kind.flip)


def build_task(spec: TaskSpec) -> TaskData:
    """One task's arrays from its spec (see :func:`plan_task`), every image decoded into memory: for tests and
    notebooks (the shard writer streams the same members instead)."""
    plan = plan_task(spec)
    data = {split: _materialize(p, spec.source, plan.class_names) for split, p in plan.splits.items()}
    return TaskData(
        name=spec.name,
        train=data["train"],
        test=data["test"],
        flip=plan.flip,
        source=plan.source,
        meta={"caps": {k: spec.caps[k] for k in ("train", "test")}, "flip_default": plan.flip_default},
    )


def _materialize(plan: SplitPlan, source: dict[str, Any], names: list[str]) -> ArraySplit:
    if isinstance(plan.members, ArrayMembers):
        return ArraySplit(plan.members.x[plan.rows], plan.labels, names)
    x = decode_members(Subset.take(plan.members, plan.rows), source, f"source {source.get('name')}").x
    return ArraySplit(x, plan.labels, names)


