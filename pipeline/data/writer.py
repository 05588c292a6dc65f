"""Streaming one planned split into WebDataset tar shards: one shard's worth of members read at a time, each
stored as the task's spec says (:mod:`.images`), the train split's mean/std summed on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from .arrays import ArraySplit
from .benchmarks import TaskSpec
from ..errors import ConfigError
from .images import DEFAULT_QUALITY, STATS_MAX_IMAGES, BadImage, RunningStats, image_format, store_array, store_bytes
from .manifest import sample_key, sha256_file
from .members import MemberError
from .plan import SplitPlan


class ShardSink:
    """One split's shards, written one sample at a time: a new tar every ``max_samples`` samples, each closed
    (and hashed) as soon as it is full. Keys count the samples written (a skipped member leaves no gap)."""

    def __init__(self, folder: Path, split: str, max_samples: int):
        self.folder, self.split, self.max_samples = folder, split, max_samples
        self.written = 0
        self.out: dict[str, Any] = {"shards": [], "sizes": {}, "counts": {}, "sha256": {}}
        self._tar: wds.TarWriter | None = None
        self._rel = ""
        self._in_shard = 0

    def write(self, ext: str, data: bytes, label: int) -> None:
        if self._tar is None:
            self._rel = f"{self.split}-{len(self.out['shards']):06d}.tar"
            self._tar = wds.TarWriter(str(self.folder / self._rel), encoder=False, mtime=0)  # int: no PAX headers
            self._in_shard = 0
        self._tar.write({"__key__": sample_key(self.written), ext: data, "cls": str(int(label)).encode()})
        self.written += 1
        self._in_shard += 1
        if self._in_shard == self.max_samples:
            self._close()

    def _close(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        rel, path = self._rel, self.folder / self._rel
        self.out["shards"].append(rel)
        self.out["sizes"][rel] = path.stat().st_size
        self.out["counts"][rel] = self._in_shard
        self.out["sha256"][rel] = sha256_file(path)

    def close(self) -> dict[str, Any]:
        """Close the last shard; relpaths (relative to ``folder``), sizes, counts and sha256s of every shard."""
        if self._tar is not None:
            self._close()
        return self.out


def write_split(data: ArraySplit, folder: Path, split: str, fmt: str, max_samples: int) -> dict[str, Any]:
    """Write an in-memory split as shards of at most ``max_samples`` into ``folder`` (``fmt``: npy, png, jpeg,
    webp); returns relpaths (relative to ``folder``), sizes, counts and sha256s."""
    sink = ShardSink(folder, split, max_samples)
    for x, y in zip(data.x, data.y):
        stored = store_array(x, fmt, DEFAULT_QUALITY)
        sink.write(stored.ext, stored.data, int(y))
    return sink.close()


class Written:
    """What streaming a task's splits found: stored format, shapes, skipped members, and the train mean/std."""

    def __init__(self, channels: int, every_image: bool):
        self.stats = RunningStats(channels, limit=None if every_image else STATS_MAX_IMAGES)
        self.fmt = ""
        self.shape: tuple[int, int, int] | None = None
        self.uniform = True
        self.skipped: list[str] = []
        self._pending: list[np.ndarray] = []

    def seen(self, shape: tuple[int, int, int]) -> None:
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            self.uniform = False

    def how(self, mode: str) -> str:
        """How a decoded image counts: by histogram (exact and cheap) unless RGB must become the model's grey
        (luma mixes the channels, so it needs the pixels)."""
        return "pixels" if mode != "L" and self.stats.channels == 1 else "hist"

    def wants(self) -> bool:
        """Whether the next train image's pixels still count toward the mean/std (then it is decoded in full)."""
        return self.stats.limit is None or self.stats.images + len(self._pending) < self.stats.limit

    def pixels(self, x: np.ndarray) -> None:
        if self.wants():
            self._pending.append(x)  # summed in batches: per-image numpy calls would dominate small images, and
            if sum(p.size for p in self._pending) >= 1 << 20:  # a batch's float64 copy stays under ~8 MB
                self.flush()

    def flush(self) -> None:
        by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
        for x in self._pending:
            by_shape.setdefault(x.shape, []).append(x)
        for group in by_shape.values():
            room = len(group) if self.stats.limit is None else self.stats.limit - self.stats.images
            if room > 0:
                self.stats.add(np.stack(group[:room]))
        self._pending.clear()


def write_members(plan: SplitPlan, spec: TaskSpec, folder: Path, split: str, found: Written, *, stats: bool
                  ) -> dict[str, Any]:
    """Stream one split of a planned task into shards: one shard's worth of members read at a time (in the order
    the source reads fastest), each stored as the spec says and written in the plan's order."""
    fmt, quality = spec.shard["format"], int(spec.shard.get("quality", DEFAULT_QUALITY))
    mode, size = str(spec.source.get("mode", "RGB")), spec.source.get("size")
    skip = spec.source.get("on_corrupt", "fail") == "skip"
    members, n = plan.members, spec.shard["max_samples"]
    sink = ShardSink(folder, split, n)
    for start in range(0, len(plan), n):
        rows, labels = plan.rows[start:start + n], plan.labels[start:start + n]
        got = dict(members.read(rows))  # at most one shard's worth of encoded bytes (or array rows) in memory
        for row, label in zip(rows.tolist(), labels.tolist()):
            payload = got.pop(row)
            try:
                if isinstance(payload, MemberError):
                    raise payload
                if isinstance(payload, np.ndarray):
                    stored = store_array(payload, image_format(fmt, payload.shape), quality)
                else:
                    stored = store_bytes(payload, fmt, quality, mode, size,
                                         stats=found.how(mode) if stats and found.wants() else "")
            except (MemberError, BadImage) as exc:
                why = str(exc) if isinstance(exc, MemberError) else f"{members.name(row)}: {exc}"
                if not skip:
                    raise MemberError(f"task {spec.name!r}, {split} split: {why}; fix or remove it, or set the "
                                      "source's `on_corrupt: skip` to leave such members out") from None
                found.skipped.append(why)
                continue
            found.fmt = found.fmt or ("source" if fmt == "source" else
                                      {"jpg": "jpeg"}.get(stored.ext, stored.ext))
            found.seen(stored.shape)
            if stats and stored.hist is not None:
                found.stats.add_hist(stored.hist, len(stored.hist) // 256)
            elif stats and stored.pixels is not None:
                found.pixels(stored.pixels)
            sink.write(stored.ext, stored.data, label)
    found.flush()
    if sink.written == 0:
        raise ConfigError(f"task {spec.name!r} has no {split} samples left: every one of its {len(plan)} members "
                          f"was skipped as unusable (first: {found.skipped[0] if found.skipped else '?'})")
    return sink.close()
