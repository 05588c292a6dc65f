"""In-memory image arrays and the small, seeded operations on them (splits, caps, class selection, stats).

Everything a source loads and every task a benchmark builds is an :class:`ArraySplit`: uint8 images in
``[N, H, W, C]`` layout, int64 labels and the class names the labels index. Shards are written from these
arrays row for row, so the in-memory path and the streamed path see the same samples in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, unknown_name

#: ITU-R 601 luma weights (what PIL's ``convert("L")`` uses) for RGB -> grey.
LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class ArraySplit:
    """One split of one source or task: ``x`` uint8 [N, H, W, C], ``y`` int64 [N] indexing ``class_names``."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.x.dtype != np.uint8 or self.x.ndim != 4:
            raise ValueError(f"x must be uint8 [N, H, W, C], got {self.x.dtype} {self.x.shape}")
        if self.y.shape != (len(self.x),):
            raise ValueError(f"y must have shape ({len(self.x)},), got {self.y.shape}")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)}), got [{self.y.min()}, {self.y.max()}]")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    def take(self, index: np.ndarray) -> ArraySplit:
        """The rows ``index`` (in that order), same class names."""
        return ArraySplit(self.x[index], self.y[index], self.class_names)

    def counts(self) -> dict[str, int]:
        """Samples per class name (every class listed, zeros included)."""
        per = np.bincount(self.y, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, per)}


@dataclass
class TaskData:
    """One task of a benchmark, in memory: its train and test splits plus what the loader needs to know.

    ``flip`` is the task's default for random horizontal flips at training time (off for digits).
    """

    name: str
    train: ArraySplit
    test: ArraySplit
    flip: bool = False
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    def split(self, split: str) -> ArraySplit:
        """The split named ``split`` ("train" or "test")."""
        if split not in ("train", "test"):
            raise unknown_name("split", split, ("train", "test"))
        return self.train if split == "train" else self.test


def as_nhwc_uint8(x: np.ndarray) -> np.ndarray:
    """[N, H, W] or [N, H, W, C] images of any numeric type with values in 0..255 -> uint8 [N, H, W, C]."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {x.shape}")
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def stratified_order(y: np.ndarray, seed: int) -> np.ndarray:
    """A seeded order of all rows in which every prefix holds the classes in proportion to their sizes.

    Each row gets the fraction (rank within its class + 0.5) / class size under a seeded permutation;
    sorting by it interleaves the classes evenly, so "the first n rows" is a stratified sample of size n.
    """
    y = np.asarray(y)
    order = np.random.default_rng(seed).permutation(len(y))
    frac = np.empty(len(y), dtype=np.float64)
    for c in np.unique(y):
        rows = order[y[order] == c]
        frac[rows] = (np.arange(len(rows)) + 0.5) / len(rows)
    return order[np.argsort(frac[order], kind="stable")]


def stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, stratified sample of ``n`` rows (all rows when n >= len(y))."""
    if n >= len(y):
        return np.arange(len(y))
    return np.sort(stratified_order(y, seed)[:n])


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified (train_idx, test_idx), both sorted; used for sources with no official test split."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(test_fraction * len(y)))
    test = stratified_subset(y, n_test, seed)
    train = np.setdiff1d(np.arange(len(y)), test, assume_unique=True)
    return train, test


def resolve_classes(wanted: Sequence[str | int], class_names: Sequence[str]) -> list[int]:
    """Map class names (or integer labels) to label indices; unknown ones fail listing the known names."""
    index = {name: i for i, name in enumerate(class_names)}
    out: list[int] = []
    for c in wanted:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= int(c) < len(class_names):
            out.append(int(c))
        elif isinstance(c, str) and c in index:
            out.append(index[c])
        else:
            raise unknown_name("class", c, class_names)
    if len(set(out)) != len(out):
        raise ConfigError(f"class list {list(wanted)} names a class twice")
    return out


def select_classes(data: ArraySplit, labels: Sequence[int]) -> ArraySplit:
    """Keep the rows of ``labels`` and relabel them 0..k-1 in the order given (names follow)."""
    remap = np.full(len(data.class_names), -1, dtype=np.int64)
    remap[list(labels)] = np.arange(len(labels))
    keep = np.flatnonzero(remap[data.y] >= 0)
    return ArraySplit(data.x[keep], remap[data.y[keep]], [data.class_names[i] for i in labels])


def cap_split(data: ArraySplit, cap: int | None, seed: int) -> ArraySplit:
    """A seeded, stratified subset of at most ``cap`` rows (original order kept); ``None`` keeps all."""
    if cap is None or cap >= len(data):
        return data
    if cap <= 0:
        raise ConfigError(f"a cap must be a positive number of samples or null, got {cap}")
    return data.take(stratified_subset(data.y, cap, seed))


def shuffle_split(data: ArraySplit, seed: int) -> ArraySplit:
    """Rows in a seeded random order (shards are written in this order so their contents are mixed)."""
    return data.take(np.random.default_rng(seed).permutation(len(data)))


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [..., C] -> float64 [..., channels]: grey is repeated to 3, RGB is turned to luma for 1."""
    c = x.shape[-1]
    if c == channels:
        return x.astype(np.float64)
    if c == 1 and channels == 3:
        return np.repeat(x.astype(np.float64), 3, axis=-1)
    if c == 3 and channels == 1:
        return (x.astype(np.float64) @ LUMA)[..., None]
    raise ConfigError(f"cannot turn {c}-channel images into {channels} channels (supported: 1<->3)")


def channel_stats(x: np.ndarray, channels: int, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images scaled to [0, 1], after conversion to ``channels`` channels.

    Accumulated in float64 chunks so a full 60k-image split never needs a float copy of itself.
    """
    if len(x) == 0:
        raise ConfigError("cannot compute mean/std of an empty train split")
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(x), chunk):
        part = to_channels(x[start : start + chunk], channels) / 255.0
        total += part.sum(axis=(0, 1, 2))
        total_sq += np.square(part).sum(axis=(0, 1, 2))
    n = len(x) * x.shape[1] * x.shape[2]
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)  # a constant channel must not divide by zero
    return [float(m) for m in mean], [float(s) for s in std]
