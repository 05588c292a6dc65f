"""Benchmarks: how sources are cut into a task sequence, as data (``configs/benchmark/<name>.yaml``).

A benchmark config is a plain dict (what ``OmegaConf.to_container(cfg.benchmark, resolve=True)`` gives).
Keys common to every kind::

    name: split_fashion_mnist      # also the shard folder's name
    kind: class_split              # a key of BENCHMARK_KINDS
    caps: {train: 1000, test: 400, seed: 0}        # per new task; null or a null entry = no cap
    initial_caps: {train: 4000, test: 1000}         # the first task (it trains the backbone); default: caps
    task_caps: {t3: {train: 200}}                   # per-task overrides by task name (optional)
    channels: 3                    # model input channels; mean/std are computed for these
    flip: null                     # random horizontal flips in training: null = the source's default
    seed: 0                        # order in which train samples are written to shards
    shard: {max_samples: 2000, format: npy}         # format: npy | png | auto

Kinds (see each builder's docstring): ``class_split``, ``sequence``, ``cifar100_superclass``. The first task
trains the backbone; the rest are the new tasks, in order. Caps take a seeded, stratified subset, so a
capped task keeps its class balance; the train split is then written in a seeded random order.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import ArraySplit, TaskData, cap_split, resolve_classes, select_classes, shuffle_split
from .cifar100 import CPG_ORDER, superclass_split
from ..errors import ConfigError, unknown_name
from .sources import SPLITS, load_source, source_kind

#: configs/benchmark/ of this project (where :func:`load_benchmark_config` looks by default)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "benchmark"

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

KindBuilder = Callable[[dict[str, Any]], list[TaskData]]

#: benchmark kind name -> builder(benchmark) -> uncapped tasks (first = the backbone's task)
BENCHMARK_KINDS: dict[str, KindBuilder] = {}


def register_kind(name: str) -> Callable[[KindBuilder], KindBuilder]:
    """Decorator: register ``build(benchmark) -> list[TaskData]`` as benchmark kind ``name``."""

    def wrap(build: KindBuilder) -> KindBuilder:
        BENCHMARK_KINDS[name] = build
        return build

    return wrap


def list_benchmarks(config_dir: str | Path | None = None) -> list[str]:
    """Names of the benchmark configs (``*.yaml`` stems) in ``config_dir`` (default: configs/benchmark)."""
    return sorted(p.stem for p in Path(config_dir or CONFIG_DIR).glob("*.yaml"))


def load_benchmark_config(name: str | Path, config_dir: str | Path | None = None) -> dict[str, Any]:
    """A benchmark config as a plain dict, by name (configs/benchmark/<name>.yaml) or by path."""
    import yaml

    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(config_dir or CONFIG_DIR) / f"{name}.yaml"
    if not path.is_file():
        raise unknown_name("benchmark", str(name), list_benchmarks(config_dir))
    with open(path) as f:
        return yaml.safe_load(f)


def spec_of(benchmark: dict[str, Any]) -> dict[str, Any]:
    """The benchmark as canonical JSON-able data (copies, so callers may keep mutating theirs), with a stream
    kind (``catalogue``, ``class_subsets``) expanded into the fixed list of tasks it holds now."""
    return expand(json.loads(json.dumps(benchmark, sort_keys=True)))[0]


# ------------------------------------------------------------------------------------------------ streams
#: stream kinds: benchmark -> (the same stream as a fixed benchmark of a built-in kind, problems found)
Expander = Callable[[dict[str, Any]], tuple[dict[str, Any], list[str]]]
STREAM_KINDS: dict[str, Expander] = {}


def expand(bench: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A stream (``catalogue``: a JSONL file that grows; ``class_subsets``: N seeded class subsets of one
    source) as the fixed benchmark it is right now, and the problems found on the way (a malformed catalogue
    line: named by its line number and left out, so the other lines still run)."""
    kind = bench.get("kind")
    return STREAM_KINDS[kind](bench) if kind in STREAM_KINDS else (bench, [])


def _catalogue(bench: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``kind: catalogue``: ``path`` is a JSONL file, one task per line, the first the initial (backbone) task::

        {"name": "shirts", "source": {"name": "fashion_mnist"}, "classes": ["Shirt", "Coat"], "caps": {"train": 500}}

    Becomes a ``sequence`` benchmark; a line's ``caps`` become its ``task_caps`` entry."""
    _require(bench, "path")
    path = Path(str(bench["path"])).expanduser()
    if not path.is_file():
        raise ConfigError(f"catalogue {path} does not exist; set benchmark.path to a JSONL file with one task per "
                          'line, e.g. {"name": "t1", "source": {"name": "fashion_mnist"}, "classes": [0, 1]}')
    entries: list[dict[str, Any]] = []
    lines: dict[str, tuple[int, str]] = {}
    problems: list[str] = []
    for no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
            unknown = set(entry) - {"name", "source", "classes", "caps", "flip"}
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)}; valid: name, source, classes, caps, flip")
            if not isinstance(entry.get("name"), str) or not TASK_NAME.match(entry["name"]):
                raise ValueError(f"`name` must be a string matching {TASK_NAME.pattern}")
            if not isinstance(entry.get("source"), dict):
                raise ValueError("`source` must be a mapping such as {\"name\": \"fashion_mnist\"}")
        except ValueError as exc:
            if not entries:
                raise ConfigError(f"catalogue {path} line {no} (the initial task: it trains the backbone) is "
                                  f"malformed: {exc}") from None
            problems.append(f"catalogue {path} line {no} is malformed ({exc}); left out, the other lines run")
            continue
        name = entry["name"]
        if name in lines:
            first_no, first = lines[name]
            if json.loads(first) != entry:
                raise ConfigError(f"catalogue {path}: task {name!r} is on line {first_no} and line {no} with "
                                  "different specs; give one of them another name")
            problems.append(f"catalogue {path} line {no} repeats line {first_no} ({name!r}); left out")
            continue
        lines[name] = (no, line)
        entries.append(entry)
    if not entries:
        raise ConfigError(f"catalogue {path} has no task; add one JSON object per line")
    fixed = {k: v for k, v in bench.items() if k not in ("kind", "path")}
    fixed.update(kind="sequence", catalogue=str(path.absolute()),
                 tasks=[{k: e[k] for k in ("name", "source", "classes", "flip") if k in e} for e in entries],
                 task_caps={e["name"]: e["caps"] for e in entries if e.get("caps")} or None)
    return fixed, problems


def _class_subsets(bench: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``kind: class_subsets``: ``num_tasks`` tasks of ``classes_per_task`` classes of ``source``, each drawn
    with its own seed (``seed`` + its index), so raising ``num_tasks`` appends tasks and leaves the earlier
    ones as they were. The initial task t0 has ``initial_classes`` (default: every class of the source)."""
    _require(bench, "source", "num_tasks", "classes_per_task")
    n, k = int(bench["num_tasks"]), int(bench["classes_per_task"])
    total = _class_count(json.dumps(bench["source"], sort_keys=True))
    if not 1 <= k <= total:
        raise ConfigError(f"benchmark.classes_per_task={k} must be in [1, {total}] (source classes)")
    seed = int(bench.get("draw_seed", 0))
    lists = [bench.get("initial_classes") or list(range(total))]
    # task i's own stream of the seed (spawn_key): independent of how many tasks there are
    lists += [sorted(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
                     .choice(total, size=k, replace=False).tolist()) for i in range(1, n + 1)]
    fixed = {key: v for key, v in bench.items() if key not in ("kind", "num_tasks", "classes_per_task",
                                                                "initial_classes", "draw_seed")}
    fixed.update(kind="class_split", class_lists=lists)
    return fixed, []


@functools.lru_cache(maxsize=8)
def _class_count(source_json: str) -> int:
    return len(load_source(json.loads(source_json), "test").class_names)


STREAM_KINDS.update(catalogue=_catalogue, class_subsets=_class_subsets)


def build_tasks(benchmark: dict[str, Any]) -> list[TaskData]:
    """All tasks of a benchmark in memory, caps applied, train split in shard order; the first is the initial task."""
    bench = spec_of(benchmark)
    kind = bench.get("kind")
    if kind not in BENCHMARK_KINDS:
        raise unknown_name("benchmark kind", kind, sorted(BENCHMARK_KINDS))
    tasks = BENCHMARK_KINDS[kind](bench)
    _check_task_names(bench, tasks)
    return [_finish(task, i, bench) for i, task in enumerate(tasks)]


# ------------------------------------------------------------------------------------------ common steps


def _check_task_names(bench: dict[str, Any], tasks: list[TaskData]) -> None:
    if not tasks:
        raise ConfigError(f"benchmark {bench.get('name')!r} has no tasks")
    names = [t.name for t in tasks]
    for name in names:
        if not TASK_NAME.match(name):
            raise ConfigError(f"task name {name!r} must match {TASK_NAME.pattern} (it names a shard folder)")
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}; give sequence entries distinct `name`s")
    unknown = set(bench.get("task_caps") or {}) - set(names)
    if unknown:
        raise unknown_name("task in task_caps", sorted(unknown)[0], names)


def _caps_for(bench: dict[str, Any], index: int, name: str) -> dict[str, Any]:
    """The caps for one task: task_caps[name] over initial_caps (first task) over caps."""
    caps = dict(bench.get("caps") or {})
    if index == 0 and bench.get("initial_caps") is not None:
        caps.update(bench["initial_caps"])
    caps.update((bench.get("task_caps") or {}).get(name) or {})
    return caps


def _finish(task: TaskData, index: int, bench: dict[str, Any]) -> TaskData:
    """Apply caps (seeded, stratified), order the train split for writing, settle the flip default."""
    caps = _caps_for(bench, index, task.name)
    seed = int(caps.get("seed", bench.get("seed", 0)))
    train = cap_split(task.train, caps.get("train"), seed)
    test = cap_split(task.test, caps.get("test"), seed + 1)
    for split, data in (("train", train), ("test", test)):
        if len(data) == 0:
            raise ConfigError(f"task {task.name!r} has no {split} samples; check its classes and source")
    train = shuffle_split(train, int(bench.get("seed", 0)) + index)
    flip = bench.get("flip")
    return TaskData(
        name=task.name,
        train=train,
        test=test,
        flip=task.flip if flip is None else bool(flip),
        source=task.source,
        meta={**task.meta, "caps": {k: caps.get(k) for k in ("train", "test")}, "flip_default": task.flip},
    )


def _load_both(source: dict[str, Any]) -> dict[str, ArraySplit]:
    return {split: load_source(source, split) for split in SPLITS}


def _require(bench: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if bench.get(k) is None]
    if missing:
        raise ConfigError(f"benchmark {bench.get('name')!r} (kind {bench.get('kind')!r}) needs {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------------- kinds


@register_kind("class_split")
def class_split(bench: dict[str, Any]) -> list[TaskData]:
    """One source cut into tasks of classes: ``num_tasks`` x ``classes_per_task`` in label order, or
    explicit ``class_lists`` (names or labels). Tasks are named t0, t1, ...; labels within a task follow
    the order of its class list."""
    _require(bench, "source")
    source = bench["source"]
    kind = source_kind(source)
    data = _load_both(source)
    names = data["train"].class_names
    lists = bench.get("class_lists")
    if lists is None:
        _require(bench, "num_tasks", "classes_per_task")
        n, k = int(bench["num_tasks"]), int(bench["classes_per_task"])
        if n * k > len(names):
            raise ConfigError(f"{n} tasks x {k} classes needs {n * k} classes; source {kind.name!r} has {len(names)}")
        lists = [list(range(i * k, (i + 1) * k)) for i in range(n)]
    tasks = []
    for i, wanted in enumerate(lists):
        labels = resolve_classes(wanted, names)
        splits = {split: select_classes(d, labels) for split, d in data.items()}
        tasks.append(TaskData(_class_split_name(i), splits["train"], splits["test"], kind.flip, kind.name))
    return tasks


def _class_split_name(i: int) -> str:
    return f"t{i}"


def task_names(bench: dict[str, Any]) -> list[str] | None:
    """The benchmark's task names (initial task first) as far as its config says without loading any data;
    None where only the data knows (e.g. sequence entries named after their source)."""
    bench = spec_of(bench)
    kind = bench.get("kind")
    if kind == "class_split":
        lists = bench.get("class_lists")
        n = len(lists) if lists is not None else bench.get("num_tasks")
        return [_class_split_name(i) for i in range(n)] if isinstance(n, int) else None
    if kind == "sequence":
        entries = bench.get("tasks") or []
        if entries and all(isinstance(e, dict) and e.get("name") for e in entries):
            return [str(e["name"]) for e in entries]
        return None
    if kind == "cifar100_superclass":
        return list(bench.get("superclasses") or CPG_ORDER)
    return None


@register_kind("sequence")
def sequence(bench: dict[str, Any]) -> list[TaskData]:
    """Several sources one after the other: ``tasks`` is a list of ``{name, source, classes}`` where
    ``classes`` (optional) keeps a subset of the source's classes, relabelled in the order given."""
    _require(bench, "tasks")
    tasks = []
    for entry in bench["tasks"]:
        if not isinstance(entry, dict) or "source" not in entry:
            raise ConfigError(f"each sequence entry needs a `source`, got {entry!r}")
        kind = source_kind(entry["source"])
        data = _load_both(entry["source"])
        if entry.get("classes") is not None:
            labels = resolve_classes(entry["classes"], data["train"].class_names)
            data = {split: select_classes(d, labels) for split, d in data.items()}
        name = str(entry.get("name") or kind.name)
        flip = kind.flip if entry.get("flip") is None else bool(entry["flip"])
        tasks.append(TaskData(name, data["train"], data["test"], flip, kind.name))
    return tasks


@register_kind("cifar100_superclass")
def cifar100_superclass(bench: dict[str, Any]) -> list[TaskData]:
    """CIFAR-100 cut into its 20 superclasses (CPG's order), one task each, labels 0-4 = the superclass's
    fine classes in alphabetical order (2500 train / 500 test per task); ``superclasses`` picks a subset."""
    source = bench.get("source") or {"name": "cifar100"}
    kind = source_kind(source)
    chosen = bench.get("superclasses") or list(CPG_ORDER)
    for sup in chosen:
        if sup not in CPG_ORDER:
            raise unknown_name("CIFAR-100 superclass", sup, CPG_ORDER)
    data = _load_both(source)
    return [
        TaskData(sup, superclass_split(data["train"], sup), superclass_split(data["test"], sup), kind.flip, kind.name)
        for sup in chosen
    ]
