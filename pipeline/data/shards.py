"""Shard writer: each task of a stream -> its own content-addressed folder of WebDataset tar shards; the
stream -> a manifest listing its tasks. Written once, reused by every stream that holds the same task.

Layout under ``<shard_root>/``::

    tasks/<task>-<key>/task.json                      one task: its spec and its TaskInfo (shards, sha256, stats)
    tasks/<task>-<key>/train-000000.tar, test-000000.tar, ...
    <benchmark>/manifest.json                         the stream: its tasks, in order, shard paths ../tasks/...

``<key>`` hashes the task's :class:`~.benchmarks.TaskSpec` content (source, classes, caps, seeds, format), so
appending a task to a stream writes only that task, editing one writes only that one (its old folder stays for
the runs that used it), and the same task in another stream is not written again.

Each sample is ``<key>`` + one image entry + ``<key>.cls`` (the label as ASCII digits). The image entry is the
source's own bytes when a file source asks for no resize (``jpg``, ``png``, ``webp``: format ``source``), else
``npy`` (raw uint8 [H, W, C], saved without pickle), ``png``, ``jpg`` or ``webp`` per ``shard.format`` (see
:mod:`.images`). Keys are the sample's position in its split (``0000042``). Tar headers carry a fixed integer
mtime (a float one would add a PAX header per file, doubling small shards), so the same spec gives byte-identical
shards and checksums.

The writer streams: it plans the task from the source's listing (:func:`~.benchmarks.plan_task`: labels only),
then reads the planned members one shard's worth at a time, so it holds one shard, never the task or the
source (an array source's arrays excepted: they are small and already in memory). A member that does not decode
fails the task naming it, or with the source's ``on_corrupt: skip`` is left out and listed in the task's
``skipped``. The train split's mean/std come from running sums over its first :data:`~.images.STATS_MAX_IMAGES`
images in shard order (every image for an array source).

A task is written into a hidden temp folder beside its final one and renamed into place only when complete:
a killed writer never leaves a task that looks valid over half-written shards, and two launches writing the
same task at once both end with the one complete folder (the loser of the rename drops its copy). Tasks are
written by whatever ``map_tasks`` the caller passes: in-process one after another by default, as Ray jobs by the
driver (``runtime.ray_map``) so a cluster's nodes write in parallel. A WebDataset corpus source is indexed first
(one ``map_tasks`` job per corpus shard) into ``<shard_root>/index/``, which the writers then read.

A URL shard root (``http(s)://host/shards``, ``file:``, or a ``pipe:`` template with ``{rel}``, see
:mod:`.manifest`) is read-only: :func:`ensure_shards` reads ``<url>/<benchmark>/manifest.json``, checks that it
was made from the same spec (and with ``verify="sha256"`` re-hashes every shard through the URL), and never
writes. Publish shards by writing them to a folder (``python run_pipeline.py mode=shards
paths.shards=/some/folder``) and serving or uploading that whole folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .benchmarks import TaskSpec, expand, spec_of, task_specs
from . import corpus
from ..errors import ConfigError, DataError, Log, ShardWriteError, unknown_name
from .images import AUTO_PNG_MIN_VALUES, ENCODERS, IMAGE_FORMATS, encode_npy, encode_png, image_format
from .plan import plan_task
from ..redact import redact_text
from .writer import Written, write_members, write_split
from .manifest import (FORMAT_VERSION, MANIFEST_NAME, TASKS_DIR, Manifest, TaskInfo, check_shard_paths, is_local,
                       join_url, sha256_file)

__all__ = ["AUTO_PNG_MIN_VALUES", "ENCODERS", "IMAGE_FORMATS", "encode_npy", "encode_png", "ensure_shards",
           "image_format", "in_process", "spec_hash", "write_split", "write_task"]

#: benchmark keys that only change how shards are read, not what they hold: not part of the spec hash
LOADER_KEYS = ("flip",)
TASK_FILE = "task.json"
#: a writer's temp (or moved-aside) folder: .<folder>.tmp-<host>-<pid>-<ns>
TEMP_NAME = re.compile(r"\.(tmp|old)-(?P<host>.+)-(?P<pid>\d+)-(?P<ns>\d+)$")

#: map_tasks(write_task, [(spec, tasks_root), ...]) -> the TaskInfos, in order (in-process, or Ray jobs)
TaskMap = Callable[[Callable[..., TaskInfo], list[tuple[Any, ...]]], Iterable[TaskInfo]]


def spec_hash(benchmark: dict[str, Any]) -> str:
    """Hash of everything that decides the stream's shards (the spec minus loader-only keys, the format)."""
    spec = {k: v for k, v in spec_of(benchmark).items() if k not in LOADER_KEYS}
    blob = json.dumps({"format_version": FORMAT_VERSION, "spec": spec}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -------------------------------------------------------------------------------------------- writing


def write_task(spec: TaskSpec, tasks_root: str) -> TaskInfo:
    """Plan one task, stream its shards and ``task.json`` into ``<tasks_root>/<spec.folder>``, atomically (temp
    folder, then rename). Returns its TaskInfo, shard paths relative to its folder. Runs in the driver or in a Ray
    job: it needs nothing but the spec and the shared path (a corpus's index: ``<tasks_root>/../index``)."""
    root = Path(tasks_root)
    final = root / spec.folder
    tmp = root / f".{spec.folder}.tmp-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
    try:
        plan = plan_task(spec, root.parent / corpus.INDEX_DIR)  # every class checked before a byte is written
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        found = Written(spec.channels, every_image=not plan.splits["train"].members.encoded)
        splits = {split: write_members(plan.splits[split], spec, tmp, split, found, stats=split == "train")
                  for split in ("train", "test")}
        mean, std = found.stats.result()
        info = TaskInfo(
            name=spec.name,
            class_names=list(plan.class_names),
            num_classes=len(plan.class_names),
            counts={split: sum(s["counts"].values()) for split, s in splits.items()},
            image_shape=found.shape,
            mean=mean,
            std=std,
            shards={split: s["shards"] for split, s in splits.items()},
            sha256={k: v for s in splits.values() for k, v in s["sha256"].items()},
            sizes={k: v for s in splits.values() for k, v in s["sizes"].items()},
            shard_counts={k: v for s in splits.values() for k, v in s["counts"].items()},
            flip=plan.flip,
            flip_default=plan.flip_default,
            source=plan.source,
            image_format=found.fmt,
            uniform_shape=found.uniform,
            skipped=[*plan.splits["train"].members.problems, *found.skipped],
        )
        with open(tmp / TASK_FILE, "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "spec": spec.content(), "info": info.to_dict()}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / TASK_FILE).is_file():
                raise
            # another launch wrote the same task first: same spec, same bytes; keep theirs
        return info
    except DataError:  # a missing source, an unknown class, a corrupt member: already said in its own words
        raise
    except OSError as e:  # a full disk, a read-only folder: say where and what, keep nothing half-written
        code = errno.errorcode.get(e.errno or 0, str(e.errno))
        err = ShardWriteError(f"cannot write the shards of task {spec.name!r} under {root}: [{code}] "
                              f"{e.strerror} ({e.filename or tmp}); free space there or set paths.shards to another "
                              "folder. Nothing half-written is left: the task's temp folder is removed, and the "
                              "tasks written before it are kept")
        err.errno, err.path = e.errno, e.filename  # not .filename: OSError.__str__ would replace the message
        raise err from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def in_process(fn: Callable[..., TaskInfo], items: list[tuple[Any, ...]]) -> Iterable[TaskInfo]:
    """The default ``map_tasks``: one task after another in this process."""
    return (fn(*args) for args in items)


# ------------------------------------------------------------------------------------------ ensure_shards


def ensure_shards(
    benchmark: dict[str, Any],
    shard_root: str | os.PathLike,
    *,
    log: Log = print,
    verify: str = "size",
    map_tasks: TaskMap = in_process,
) -> Manifest:
    """The stream's manifest under ``shard_root/<name>/``, with every task's shards written if missing.

    Each task is looked up by its spec's key under ``shard_root/tasks/``: a folder whose ``task.json`` is there
    and whose shards have their recorded sizes (``verify="size"``, cheap) or sha256 (``verify="sha256"``) is
    reused; the rest are written through ``map_tasks``. The stream's manifest is rewritten only when it changes
    (a task appended or edited, a loader option such as ``flip``).

    A URL ``shard_root`` is only read (see the module doc): its manifest must exist with the same spec hash,
    else a ConfigError says how to write and publish the shards.
    """
    if verify not in ("size", "sha256"):
        raise unknown_name("verify mode", verify, ("size", "sha256"))
    spec = spec_of(benchmark)
    for problem in expand(benchmark)[1]:
        log(f"[shards] warning: {problem}")
    name = spec.get("name")
    if not name or not isinstance(name, str) or "/" in name or name.startswith(".") or name == TASKS_DIR:
        raise ConfigError(f"benchmark needs a plain `name` other than {TASKS_DIR!r} (it names the stream's folder), "
                          f"got {name!r}")
    remote = isinstance(shard_root, str) and not is_local(shard_root)
    root = Path(shard_root).absolute() if not remote else Path()  # Ray workers may run in another directory
    if not remote:  # a corpus is indexed once, one job per corpus shard, beside the tasks that read it
        for source in _corpus_sources(spec):
            corpus.ensure_index(source, root / corpus.INDEX_DIR, map_fn=map_tasks, log=log)
    specs = task_specs(spec)  # every config problem surfaces here, before a byte is written
    if remote:
        return remote_shards(spec, str(shard_root), verify=verify, log=log)
    tasks_root = root / TASKS_DIR
    _remove_stale_temps(tasks_root)
    infos: dict[str, TaskInfo] = {}
    for s in specs:
        info = _reusable(tasks_root / s.folder, verify, log)
        if info is not None:
            infos[s.name] = info
    missing = [s for s in specs if s.name not in infos]
    if missing:
        log(f"[shards] {name}: {len(specs) - len(missing)} task(s) reused, writing {len(missing)} under {tasks_root}")
        t0 = time.perf_counter()
        for s, info in zip(missing, map_tasks(write_task, [(s, str(tasks_root)) for s in missing])):
            infos[s.name] = info
            log(f"[shards] {name}/{s.name}: {info.counts['train']} train + {info.counts['test']} test "
                f"{info.image_shape}{'' if info.uniform_shape else ' (first; sizes vary)'} {info.image_format} in "
                f"{sum(len(v) for v in info.shards.values())} shards -> {TASKS_DIR}/{s.folder}")
            if info.skipped:
                log(f"[shards] warning: {name}/{s.name}: {len(info.skipped)} unusable member(s) left out "
                    f"(on_corrupt: skip; all listed in its task.json `skipped`): {'; '.join(info.skipped[:3])}")
        log(f"[shards] wrote {len(missing)} task(s) in {time.perf_counter() - t0:.1f}s")
    manifest = Manifest(root=str(root / name), benchmark=name, spec_hash=spec_hash(spec),
                        tasks=[_in_stream(infos[s.name], s) for s in specs], spec=spec,
                        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return _save_if_changed(manifest, log)


def _corpus_sources(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The distinct WebDataset corpus sources of a (expanded) benchmark spec."""
    sources = [spec.get("source")] + [t.get("source") for t in spec.get("tasks") or [] if isinstance(t, dict)]
    seen: dict[str, dict[str, Any]] = {}
    for s in sources:
        if isinstance(s, dict) and s.get("name") == "webdataset":
            seen.setdefault(json.dumps(s, sort_keys=True), s)
    return list(seen.values())


def _in_stream(info: TaskInfo, spec: TaskSpec) -> TaskInfo:
    """A task's TaskInfo as the stream's manifest lists it: shard paths relative to the stream's folder, and the
    stream's flip (the benchmark's, else the line's, else the source's default)."""
    prefix = f"../{TASKS_DIR}/{spec.folder}/"
    d = info.to_dict()
    d["shards"] = {split: [prefix + rel for rel in rels] for split, rels in info.shards.items()}
    for field in ("sha256", "sizes", "shard_counts"):
        d[field] = {prefix + rel: v for rel, v in getattr(info, field).items()}
    d["flip"] = info.flip_default if spec.flip is None else spec.flip
    return TaskInfo.from_dict(d)


def _save_if_changed(manifest: Manifest, log: Log) -> Manifest:
    """Write the stream's manifest unless the one there already says the same (its mtime then stays, so the
    workers' manifest cache stays warm). A folder from the old one-folder-per-stream layout is replaced."""
    folder = Path(manifest.root)
    if (folder / MANIFEST_NAME).is_file():
        try:
            old = Manifest.load(folder)
        except Exception as exc:
            log(f"[shards] {folder}: manifest unusable ({exc}); replacing it")
            old = None
            for child in folder.iterdir():  # the old layout kept each task's shards here
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
        if old is not None:
            same = {k: v for k, v in old.to_dict().items() if k != "created"} == \
                   {k: v for k, v in manifest.to_dict().items() if k != "created"}
            if same:
                log(f"[shards] reusing {folder} ({len(old.tasks)} tasks, spec {old.spec_hash})")
                return old
    folder.mkdir(parents=True, exist_ok=True)
    manifest.save()
    log(f"[shards] {folder / MANIFEST_NAME}: {len(manifest.tasks)} tasks (spec {manifest.spec_hash})")
    return manifest


def remote_shards(spec: dict[str, Any], shard_root: str, *, verify: str = "size", log: Log = print) -> Manifest:
    """The published shards of ``spec`` under the URL ``shard_root`` (read-only; see :func:`ensure_shards`)."""
    name = spec["name"]
    root = shard_root.replace("{rel}", f"{name}/{{rel}}") if "{rel}" in shard_root else join_url(shard_root, name)
    where = join_url(root, MANIFEST_NAME)
    publish = (f"shards are never written to a URL: write them with `python run_pipeline.py mode=shards "
               f"paths.shards=/some/folder` (same benchmark settings) and publish /some/folder/{name}/ at {root}")
    try:
        manifest = Manifest.load_url(root)
    except FileNotFoundError:
        raise ConfigError(f"no shard manifest at {where}; {publish}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the shard manifest: {exc}; check paths.shards={shard_root} "
                          "(is the server up and reachable from this machine and every Ray node?)") from None
    want = spec_hash(spec)
    if manifest.spec_hash != want:
        raise ConfigError(f"the shards at {root} were made from another benchmark spec (manifest {manifest.spec_hash}, "
                          f"config {want}); {publish}")
    if any(manifest.spec.get(k) != spec.get(k) for k in LOADER_KEYS):
        raise ConfigError(f"the shards at {root} were published with {', '.join(LOADER_KEYS)}="
                          f"{[manifest.spec.get(k) for k in LOADER_KEYS]}, the config says "
                          f"{[spec.get(k) for k in LOADER_KEYS]}; change the config, or re-write the manifest "
                          f"locally and publish it again")
    if verify == "sha256":
        manifest.verify()
    log(f"[shards] reading {redact_text(str(root))} (spec {manifest.spec_hash}{', sha256 verified' if verify == 'sha256' else ''})")
    return manifest


def _reusable(folder: Path, verify: str, log: Log) -> TaskInfo | None:
    """A task folder's TaskInfo if its ``task.json`` is there and its shards check out; else None (the reason
    logged, and the folder removed so the task is written again)."""
    path = folder / TASK_FILE
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            d = json.load(f)
        if d.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"format {d.get('format_version')}, this code writes {FORMAT_VERSION}")
        info = TaskInfo.from_dict(d["info"])
        # its shard paths are joined to the folder and later listed in the stream's manifest: the writer's shapes only
        check_shard_paths(info, str(path), in_stream=False)
        if folder.name.rsplit("-", 1)[0] != info.name:
            raise ConfigError(f"it names task {info.name!r}, its folder {folder.name!r}")
    except Exception as exc:  # unreadable, old-format or tampered task.json: rewrite
        log(f"[shards] {folder}: {TASK_FILE} unusable ({exc}); rewriting")
        return _discard(folder)
    for rel in (r for rels in info.shards.values() for r in rels):
        shard = folder / rel
        problem = None
        if not shard.is_file():
            problem = f"shard {shard} is missing"
        elif shard.stat().st_size != info.sizes[rel]:
            problem = f"shard {shard} has {shard.stat().st_size} bytes, {TASK_FILE} says {info.sizes[rel]}"
        elif verify == "sha256" and sha256_file(shard) != info.sha256[rel]:
            problem = f"shard {shard} is corrupt (sha256 mismatch)"
        if problem is not None:
            log(f"[shards] {problem}; rewriting task {info.name}")
            return _discard(folder)
    return info


def _discard(folder: Path) -> None:
    """Move a damaged task folder aside (atomically: no reader sees it half-deleted), then delete it."""
    aside = folder.with_name(f".{folder.name}.old-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(folder, aside)
    except OSError:
        return None  # someone else moved it first
    shutil.rmtree(aside, ignore_errors=True)
    return None


def _remove_stale_temps(tasks_root: Path) -> None:
    """Delete temp/old folders that killed writers on this host left behind. Another launch's temp folder (a live
    pid, or another host's) is left alone: it may be writing right now."""
    if not tasks_root.is_dir():
        return
    host = socket.gethostname()
    for stale in tasks_root.glob(".*"):
        m = TEMP_NAME.search(stale.name)
        if m and m["host"] == host and not _alive(int(m["pid"])):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
