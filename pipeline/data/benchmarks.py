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
    shard: {max_samples: 2000, format: npy, quality: 90}    # format: npy | png | jpeg | webp | auto
    on_corrupt: fail               # a member that does not decode: fail (default) | skip; a source's own wins

A file source (``image_folder``, ``webdataset``) without ``size`` keeps each image's own bytes in the shards
(format ``source``: JPEG stays JPEG); ``shard.format`` applies to array sources and to resized images.

Kinds (see each builder's docstring): ``class_split``, ``sequence``, ``cifar100_superclass``. The first task
trains the backbone; the rest are the new tasks, in order. Caps take a seeded, stratified subset, so a
capped task keeps its class balance; the train split is then written in a seeded random order.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import resolve_classes
from .cifar100 import CPG_ORDER
from ..errors import ConfigError, unknown_name
from .images import DEFAULT_QUALITY, IMAGE_FORMATS
from .manifest import TASK_NAME
from .members import ON_CORRUPT
from .sources import list_members, source_kind

#: configs/benchmark/ of this project (where :func:`load_benchmark_config` looks by default)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "benchmark"

KindPlanner = Callable[[dict[str, Any]], "list[TaskEntry]"]

#: benchmark kind name -> planner(benchmark) -> its tasks as entries, read from the config (first = the backbone's)
BENCHMARK_KINDS: dict[str, KindPlanner] = {}


def register_kind(name: str) -> Callable[[KindPlanner], KindPlanner]:
    """Decorator: register ``plan(benchmark) -> list[TaskEntry]`` as benchmark kind ``name``."""

    def wrap(build: KindPlanner) -> KindPlanner:
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
#: stream kinds: benchmark -> (the same stream as a fixed benchmark of a built-in kind, problems found);
#: ``class_subsets`` below, ``catalogue`` in :mod:`.catalogue` (registered as the package imports it)
Expander = Callable[[dict[str, Any]], tuple[dict[str, Any], list[str]]]
STREAM_KINDS: dict[str, Expander] = {}


def expand(bench: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A stream (``catalogue``: a JSONL file that grows; ``class_subsets``: N seeded class subsets of one
    source) as the fixed benchmark it is right now, and the problems found on the way (a malformed catalogue
    line: named by its line number and left out, so the other lines still run)."""
    kind = bench.get("kind")
    return STREAM_KINDS[kind](bench) if kind in STREAM_KINDS else (bench, [])


def is_int(v: Any) -> bool:
    """A whole number, not a bool (JSON and YAML give both)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_cap(what: str, v: Any) -> None:
    """A cap is a positive whole number or None (no cap); a ValueError naming ``what`` otherwise."""
    if v is not None and (not is_int(v) or v <= 0):
        raise ValueError(f"`{what}` must be a positive whole number of samples or null (no cap), got {v!r}")


def _class_subsets(bench: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``kind: class_subsets``: ``num_tasks`` tasks of ``classes_per_task`` classes of ``source``, each drawn
    with its own seed (``seed`` + its index), so raising ``num_tasks`` appends tasks and leaves the earlier
    ones as they were. The initial task t0 has ``initial_classes`` (default: every class of the source)."""
    require(bench, "source", "num_tasks", "classes_per_task")
    n, k = int(bench["num_tasks"]), int(bench["classes_per_task"])
    total = len(class_names(bench["source"]))
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


STREAM_KINDS.update(class_subsets=_class_subsets)


# ------------------------------------------------------------------------------------------- task specs
#: bumped whenever what a TaskSpec means for the shards changes (how caps, order or selection are applied).
#: Streaming the writer (issue #21) kept it: every spec that could be written before gives the same bytes; the
#: one new behaviour, a file source's own bytes, has its own format ("source") and so its own key
SPEC_VERSION = 2
DEFAULT_MAX_SAMPLES = 2000


@dataclass(frozen=True)
class TaskEntry:
    """One task as a benchmark kind lists it, before caps: its name, its source, and which of the source's
    classes it keeps (labels, in this order; None = all) or which CIFAR-100 superclass it is."""

    name: str
    source: dict[str, Any]
    classes: list[int] | None = None
    superclass: str | None = None
    flip: bool | None = None


@dataclass(frozen=True)
class TaskSpec:
    """One task of a stream as data: everything that decides its shards, and its (loader-only) flip.

    Made from the benchmark config without reading any image, so the driver can plan a 1000-task stream
    cheaply. ``key`` hashes the content fields only: the same task in two streams, or at another position
    of one, has the same key and shares one shard folder (``folder``); change its caps or classes and it gets
    a new one, leaving every other task's shards as they were.
    """

    name: str
    source: dict[str, Any]
    classes: list[int] | None
    superclass: str | None
    caps: dict[str, Any]            # {"train": n | None, "test": n | None, "seed": int}
    order_seed: int                 # order of the train split in the shards
    channels: int                   # mean/std are computed for these model channels
    shard: dict[str, Any]           # {"format": source | npy | png | jpeg | webp | auto, "max_samples": n,
                                    #  "quality": q (jpeg and webp only)}
    flip: bool | None = None        # loader-only: None = the source's default

    def content(self) -> dict[str, Any]:
        """The fields that decide the shards' bytes (not ``flip``), as JSON-able data."""
        return {"version": SPEC_VERSION, "name": self.name, "source": self.source, "classes": self.classes,
                "superclass": self.superclass, "caps": self.caps, "order_seed": self.order_seed,
                "channels": self.channels, "shard": self.shard}

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.content(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def folder(self) -> str:
        """The task's content-addressed shard folder name (under ``<shard root>/tasks/``)."""
        return f"{self.name}-{self.key}"


def task_specs(benchmark: dict[str, Any]) -> list[TaskSpec]:
    """The benchmark's tasks as specs, initial task first, checked (names, classes, caps) without building any."""
    bench = spec_of(benchmark)
    kind = bench.get("kind")
    if kind not in BENCHMARK_KINDS:
        raise unknown_name("benchmark kind", kind, sorted(BENCHMARK_KINDS))
    entries = BENCHMARK_KINDS[kind](bench)
    _check_task_names(bench, [e.name for e in entries])
    shard = _shard_options(bench.get("shard") or {})
    on_corrupt = bench.get("on_corrupt") or "fail"
    if on_corrupt not in ON_CORRUPT:
        raise unknown_name("benchmark.on_corrupt", on_corrupt, ON_CORRUPT)
    order = int(bench.get("seed", 0))
    flip = bench.get("flip")
    specs = []
    for i, e in enumerate(entries):
        caps = _caps_for(bench, i, e.name)
        for split in ("train", "test"):
            try:
                check_cap(f"caps.{split}", caps.get(split))
            except ValueError as exc:
                raise ConfigError(f"task {e.name!r}: {exc}") from None
        source = _canonical_source({"on_corrupt": on_corrupt, **e.source})
        if source.get("on_corrupt", "fail") not in ON_CORRUPT:
            raise unknown_name(f"task {e.name!r}: source.on_corrupt", source["on_corrupt"], ON_CORRUPT)
        specs.append(TaskSpec(
            name=e.name, source=source, classes=e.classes, superclass=e.superclass,
            caps={"train": caps.get("train"), "test": caps.get("test"), "seed": int(caps.get("seed", order))},
            # from the task's own name, not its position: the same task anywhere in any stream is the same bytes
            order_seed=_name_seed(order, e.name),
            channels=int(bench.get("channels", 3)), shard=_stored_as(shard, source),
            flip=e.flip if flip is None else bool(flip)))
    return specs


def _shard_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """``shard`` checked: ``format`` one of IMAGE_FORMATS, ``max_samples`` > 0, ``quality`` in 1..100."""
    fmt = cfg.get("format", "npy")
    if fmt not in IMAGE_FORMATS:
        raise unknown_name("shard.format", fmt, IMAGE_FORMATS)
    shard = {"format": fmt, "max_samples": int(cfg.get("max_samples") or DEFAULT_MAX_SAMPLES)}
    if shard["max_samples"] <= 0:
        raise ConfigError(f"shard.max_samples must be positive, got {shard['max_samples']}")
    quality = cfg.get("quality", DEFAULT_QUALITY)
    if not is_int(quality) or not 1 <= quality <= 100:
        raise ConfigError(f"shard.quality must be a whole number in 1..100 (JPEG/WebP quality), got {quality!r}")
    if fmt in ("jpeg", "webp"):  # only where it changes the bytes: other formats keep their old task keys
        shard["quality"] = quality
    return shard


def _stored_as(shard: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """What one task stores: a file source asked for no resize keeps its own bytes (``source``), else ``shard``."""
    if source_kind(source).encoded and source.get("size") is None:
        return {"format": "source", "max_samples": shard["max_samples"]}
    return shard


# ------------------------------------------------------------------------------------------ common steps


def _check_task_names(bench: dict[str, Any], names: list[str]) -> None:
    if not names:
        raise ConfigError(f"benchmark {bench.get('name')!r} has no tasks")
    for name in names:
        if not isinstance(name, str) or not TASK_NAME.match(name):
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


def _name_seed(seed: int, name: str) -> int:
    return int(hashlib.sha256(f"{seed}/{name}".encode()).hexdigest()[:8], 16)


def _canonical_source(source: dict[str, Any]) -> dict[str, Any]:
    """A source config without what does not change its data (``download``, where an index is kept, unset keys,
    ``on_corrupt`` at its default), so ``{"name": "fashion_mnist"}`` and ``{name: fashion_mnist, root: null,
    download: false}`` are one source."""
    return {k: v for k, v in sorted(source.items())
            if k not in ("download", "index_dir") and v is not None and not (k == "on_corrupt" and v == "fail")}


@functools.lru_cache(maxsize=8)
def _class_names_of(source_json: str) -> tuple[str, ...]:
    source = json.loads(source_json)
    return tuple(source_kind(source).names(source) or list_members(source, "test").class_names)


def class_names(source: dict[str, Any]) -> list[str]:
    """A source's class names: from its config when it says them, else from listing its test split (once per
    driver: folders listed, a corpus indexed, an array source loaded into its cache; no image decoded)."""
    return list(_class_names_of(json.dumps(source, sort_keys=True)))


def require(bench: dict[str, Any], *keys: str) -> None:
    """A ConfigError naming the benchmark's ``keys`` that are unset."""
    missing = [k for k in keys if bench.get(k) is None]
    if missing:
        raise ConfigError(f"benchmark {bench.get('name')!r} (kind {bench.get('kind')!r}) needs {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------------- kinds


@register_kind("class_split")
def class_split(bench: dict[str, Any]) -> list[TaskEntry]:
    """One source cut into tasks of classes: ``num_tasks`` x ``classes_per_task`` in label order, or
    explicit ``class_lists`` (names or labels). Tasks are named t0, t1, ...; labels within a task follow
    the order of its class list."""
    require(bench, "source")
    source = bench["source"]
    source_kind(source)
    names = class_names(source)
    lists = bench.get("class_lists")
    if lists is None:
        require(bench, "num_tasks", "classes_per_task")
        n, k = int(bench["num_tasks"]), int(bench["classes_per_task"])
        if n * k > len(names):
            raise ConfigError(f"{n} tasks x {k} classes needs {n * k} classes; source {source['name']!r} has "
                              f"{len(names)}")
        lists = [list(range(i * k, (i + 1) * k)) for i in range(n)]
    return [TaskEntry(_class_split_name(i), source, resolve_classes(wanted, names)) for i, wanted in enumerate(lists)]


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
def sequence(bench: dict[str, Any]) -> list[TaskEntry]:
    """Several sources one after the other: ``tasks`` is a list of ``{name, source, classes}`` where
    ``classes`` (optional) keeps a subset of the source's classes, relabelled in the order given."""
    require(bench, "tasks")
    entries = []
    for entry in bench["tasks"]:
        if not isinstance(entry, dict) or "source" not in entry:
            raise ConfigError(f"each sequence entry needs a `source`, got {entry!r}")
        kind = source_kind(entry["source"])
        classes = entry.get("classes")
        labels = None if classes is None else resolve_classes(classes, class_names(entry["source"]))
        flip = None if entry.get("flip") is None else bool(entry["flip"])
        entries.append(TaskEntry(str(entry.get("name") or kind.name), entry["source"], labels, None, flip))
    return entries


@register_kind("cifar100_superclass")
def cifar100_superclass(bench: dict[str, Any]) -> list[TaskEntry]:
    """CIFAR-100 cut into its 20 superclasses (CPG's order), one task each, labels 0-4 = the superclass's
    fine classes in alphabetical order (2500 train / 500 test per task); ``superclasses`` picks a subset."""
    source = bench.get("source") or {"name": "cifar100"}
    source_kind(source)
    chosen = bench.get("superclasses") or list(CPG_ORDER)
    for sup in chosen:
        if sup not in CPG_ORDER:
            raise unknown_name("CIFAR-100 superclass", sup, CPG_ORDER)
    return [TaskEntry(sup, source, None, sup) for sup in chosen]
