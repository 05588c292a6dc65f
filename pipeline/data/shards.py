"""Shard writer: a benchmark's tasks -> WebDataset tar shards + manifest, written once and reused.

Layout under ``<shard_root>/<benchmark>/``::

    manifest.json
    <task>/train-000000.tar, train-000001.tar, ...
    <task>/test-000000.tar, ...

Each sample is ``<key>.npy`` (raw uint8 [H, W, C], saved without pickle) or ``<key>.png``, plus ``<key>.cls``
(the label as ASCII digits). Keys are the sample's row number in its split (``0000042``). Tar headers carry
a fixed integer mtime (a float one would add a PAX header per file, doubling small shards), so the same spec
gives byte-identical shards and checksums.

:func:`ensure_shards` is idempotent: a manifest whose spec hash matches (and whose shards have their recorded
sizes, or sha256 with ``verify="sha256"``) is reused; anything else is rewritten. Writing goes to a hidden
temp folder that is renamed into place only when complete, so a killed run never leaves a manifest that
looks valid over half-written shards.

A URL shard root (``http(s)://host/shards``, ``file:``, or a ``pipe:`` template with ``{rel}``, see
:mod:`.manifest`) is read-only: :func:`ensure_shards` reads ``<url>/<benchmark>/manifest.json``, checks that it
was made from the same spec (and with ``verify="sha256"`` re-hashes every shard through the URL), and never
writes. Publish shards by writing them to a folder (``python run_pipeline.py mode=shards
paths.shards=/some/folder``) and serving or uploading that folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from .arrays import ArraySplit, TaskData, channel_stats
from .benchmarks import build_tasks, expand, spec_of
from ..errors import ConfigError, unknown_name
from .manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, TaskInfo, is_local, join_url, sample_key, sha256_file

#: benchmark keys that only change how shards are read, not what they hold: not part of the spec hash
LOADER_KEYS = ("flip",)
IMAGE_FORMATS = ("npy", "png", "auto")
#: ``format: auto`` stores images with at least this many values (64x64x3) as PNG, smaller ones as npy: PNG
#: decoding costs ~2.5x the whole npy path per image (measured on Fashion-MNIST) and tiny images barely compress
AUTO_PNG_MIN_VALUES = 64 * 64 * 3
DEFAULT_MAX_SAMPLES = 2000

Log = Callable[[str], Any]


def spec_hash(benchmark: dict[str, Any]) -> str:
    """Hash of everything that decides the shards' contents (the spec minus loader-only keys, the format)."""
    spec = {k: v for k, v in spec_of(benchmark).items() if k not in LOADER_KEYS}
    blob = json.dumps({"format_version": FORMAT_VERSION, "spec": spec}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- encoding


def encode_npy(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] -> .npy bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 1|3] -> lossless PNG bytes (grey stored as mode L)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {"npy": encode_npy, "png": encode_png}


def image_format(fmt: str, image_shape: Sequence[int]) -> str:
    """The concrete format ("npy" or "png") for a configured one, resolving "auto" by image size."""
    if fmt not in IMAGE_FORMATS:
        raise unknown_name("shard image format", fmt, IMAGE_FORMATS)
    if fmt == "auto":
        return "png" if int(np.prod(image_shape)) >= AUTO_PNG_MIN_VALUES else "npy"
    return fmt


# -------------------------------------------------------------------------------------------- writing


def write_split(data: ArraySplit, folder: Path, task: str, split: str, fmt: str, max_samples: int) -> dict[str, Any]:
    """Write one split as shards of at most ``max_samples``; returns relpaths, sizes, counts and sha256s."""
    encode = ENCODERS[fmt]
    out: dict[str, Any] = {"shards": [], "sizes": {}, "counts": {}, "sha256": {}}
    (folder / task).mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(data), max_samples)):
        rel = f"{task}/{split}-{shard:06d}.tar"
        stop = min(start + max_samples, len(data))
        with wds.TarWriter(str(folder / rel), encoder=False, mtime=0) as sink:  # int: no PAX headers
            for i in range(start, stop):
                sink.write({"__key__": sample_key(i), fmt: encode(data.x[i]), "cls": str(int(data.y[i])).encode()})
        out["shards"].append(rel)
        out["sizes"][rel] = (folder / rel).stat().st_size
        out["counts"][rel] = stop - start
        out["sha256"][rel] = sha256_file(folder / rel)
    return out


def write_task(task: TaskData, folder: Path, *, fmt: str, max_samples: int, channels: int) -> TaskInfo:
    """Write both splits of one task under ``folder/<task>/`` and describe them as a :class:`TaskInfo`."""
    concrete = image_format(fmt, task.train.image_shape)
    splits = {
        split: write_split(task.split(split), folder, task.name, split, concrete, max_samples)
        for split in ("train", "test")
    }
    mean, std = channel_stats(task.train.x, channels)
    return TaskInfo(
        name=task.name,
        class_names=list(task.class_names),
        num_classes=len(task.class_names),
        counts={split: len(task.split(split)) for split in splits},
        image_shape=task.train.image_shape,
        mean=mean,
        std=std,
        shards={split: s["shards"] for split, s in splits.items()},
        sha256={k: v for s in splits.values() for k, v in s["sha256"].items()},
        sizes={k: v for s in splits.values() for k, v in s["sizes"].items()},
        shard_counts={k: v for s in splits.values() for k, v in s["counts"].items()},
        flip=task.flip,
        flip_default=bool(task.meta.get("flip_default", task.flip)),
        source=task.source,
        image_format=concrete,
    )


def write_shards(
    tasks: Sequence[TaskData], folder: str | os.PathLike, benchmark: dict[str, Any], *, log: Log = print
) -> Manifest:
    """Write every task's shards and the manifest (last) into ``folder``; used by :func:`ensure_shards`."""
    folder = Path(folder)
    spec = spec_of(benchmark)
    shard_cfg = spec.get("shard") or {}
    max_samples = int(shard_cfg.get("max_samples") or DEFAULT_MAX_SAMPLES)
    if max_samples <= 0:
        raise ConfigError(f"shard.max_samples must be positive, got {max_samples}")
    infos = []
    for task in tasks:
        t0 = time.perf_counter()
        info = write_task(
            task,
            folder,
            fmt=shard_cfg.get("format", "npy"),
            max_samples=max_samples,
            channels=int(spec.get("channels", 3)),
        )
        log(
            f"[shards] {spec['name']}/{task.name}: {info.counts['train']} train + {info.counts['test']} test "
            f"{info.image_shape} {info.image_format} in {sum(len(v) for v in info.shards.values())} shards "
            f"({time.perf_counter() - t0:.1f}s)"
        )
        infos.append(info)
    manifest = Manifest(
        root=str(folder),
        benchmark=spec["name"],
        spec_hash=spec_hash(spec),
        tasks=infos,
        spec=spec,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    manifest.save()
    return manifest


# ------------------------------------------------------------------------------------------ ensure_shards


def ensure_shards(
    benchmark: dict[str, Any],
    shard_root: str | os.PathLike,
    *,
    log: Log = print,
    verify: str = "size",
) -> Manifest:
    """Shards for ``benchmark`` under ``shard_root/<name>/``: reused when up to date, else (re)written.

    Up to date means: a manifest with the same spec hash whose shards all exist with their recorded sizes
    (``verify="size"``, cheap) or also their sha256 (``verify="sha256"``). A changed spec, a missing or
    damaged shard, or a manifest from an older format leads to a full rewrite. Only loader options (``flip``)
    changed -> the manifest is updated in place and the shards kept.

    A URL ``shard_root`` is only read (see the module doc): its manifest must exist with the same spec hash,
    else a ConfigError says how to write and publish the shards.
    """
    if verify not in ("size", "sha256"):
        raise unknown_name("verify mode", verify, ("size", "sha256"))
    spec = spec_of(benchmark)
    for problem in expand(benchmark)[1]:
        log(f"[shards] warning: {problem}")
    name = spec.get("name")
    if not name or not isinstance(name, str) or "/" in name or name.startswith("."):
        raise ConfigError(f"benchmark needs a plain `name` (it names the shard folder), got {name!r}")
    if isinstance(shard_root, str) and not is_local(shard_root):
        return remote_shards(spec, shard_root, verify=verify, log=log)
    root = Path(shard_root).absolute()  # Ray workers may run in another directory
    final = root / name
    reused = _reusable(final, spec, verify, log)
    if reused is not None:
        return reused
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, name)
    tmp = root / f".{name}.tmp-{os.getpid()}-{time.time_ns()}"
    log(f"[shards] writing {final} (spec {spec_hash(spec)})")
    try:
        tasks = build_tasks(spec)
        write_shards(tasks, tmp, spec, log=log)
        _swap_in(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Manifest.load(final)


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
    log(f"[shards] reading {root} (spec {manifest.spec_hash}{', sha256 verified' if verify == 'sha256' else ''})")
    return manifest


def _reusable(final: Path, spec: dict[str, Any], verify: str, log: Log) -> Manifest | None:
    """The existing manifest if it matches ``spec`` and its shards check out; else None (with the reason logged)."""
    if not (final / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = Manifest.load(final)
    except Exception as exc:  # unreadable or old-format manifest: rewrite
        log(f"[shards] {final}: manifest unusable ({exc}); rewriting")
        return None
    if manifest.spec_hash != spec_hash(spec):
        log(f"[shards] {final}: spec changed ({manifest.spec_hash} -> {spec_hash(spec)}); rewriting")
        return None
    problem = manifest.check_sizes()
    if problem is None and verify == "sha256":
        try:
            manifest.verify()
        except Exception as exc:
            problem = str(exc)
    if problem is not None:
        log(f"[shards] {final}: {problem}; rewriting")
        return None
    if _update_loader_keys(manifest, spec):
        log(f"[shards] {final}: loader options changed ({', '.join(LOADER_KEYS)}); manifest updated, shards kept")
    else:
        log(f"[shards] reusing {final} (spec {manifest.spec_hash})")
    return manifest


def _update_loader_keys(manifest: Manifest, spec: dict[str, Any]) -> bool:
    """Bring loader-only options (per-task flip) of a reused manifest in line with ``spec``; True if changed."""
    if all(manifest.spec.get(k) == spec.get(k) for k in LOADER_KEYS):
        return False
    flip = spec.get("flip")
    for task in manifest.tasks:
        task.flip = task.flip_default if flip is None else bool(flip)
    manifest.spec = spec
    manifest.save()
    return True


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``tmp`` (old contents are moved aside, then deleted)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(root: Path, name: str) -> None:
    """Delete temp/old folders left by killed runs for this benchmark (one driver writes at a time)."""
    for stale in list(root.glob(f".{name}.tmp-*")) + list(root.glob(f".{name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
