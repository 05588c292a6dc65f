"""The hold-out split: which train samples of a task are held out for validation, by a stable hash of the task
and the sample key, and how many samples a part selects, counted from the keys without reading a shard."""

from __future__ import annotations

import hashlib

from .manifest import TaskInfo, sample_key

#: what a loader's ``part`` may select: the whole split, the rest after the hold-out, or the hold-out
PARTS = ("all", "fit", "holdout")


def in_holdout(task: str, key: str, fraction: float) -> bool:
    """Whether sample ``key`` of ``task``'s train split is held out: a stable hash of both, below ``fraction``.

    Stable across processes and machines (blake2b, not Python's salted ``hash``), so every Ray Tune trial
    holds out the same samples.
    """
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{task}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


def part_size(task: TaskInfo, split: str, holdout: float, part: str) -> int:
    """Number of samples of ``split`` that ``part`` selects (counted from the keys, without reading shards)."""
    n = task.counts[split]
    if part == "all":
        return n
    held = sum(in_holdout(task.name, sample_key(i), holdout) for i in range(n))
    return held if part == "holdout" else n - held
