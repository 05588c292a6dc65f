"""A source's split as *members*: listed cheaply (labels in source order, no image decoded), read one by one.

The task writer never holds a split: it lists the split's members, picks the task's rows from their labels alone
(:func:`pick`: classes, caps, order), then reads only those rows, one shard's worth at a time. Three kinds:

- :class:`ArrayMembers`: a small in-memory source (Fashion-MNIST, digits, CIFAR-100, npz); a member is a row.
- :class:`FileMembers`: image files (an ImageFolder tree); a member is a path, read as its bytes. Folder listings
  are cached in-process per directory, keyed by the directory's mtime and inode, so a second task of the same
  tree lists only what changed (:func:`list_images`).
- ``corpus.CorpusMembers``: members of a WebDataset corpus, read by byte offset through its index.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .arrays import ArraySplit, cap_split, select_classes, shuffle_split
from .cifar100 import superclass_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ON_CORRUPT = ("fail", "skip")


class MemberError(DataError):
    """One member of a source (a file, a corpus sample) that cannot be read, decoded or labelled; the message
    names it (file path, or corpus shard + key) and says what to do."""


#: what reading one member gives: its bytes (file sources), its pixels (array sources), or why it failed
Payload = bytes | np.ndarray | MemberError


@dataclass
class Members(ABC):
    """One split of a source, listed: ``labels[i]`` indexes ``class_names``; ``problems`` names members that were
    found unusable while listing (a corpus sample without a label) and left out."""

    class_names: list[str]
    labels: np.ndarray
    problems: list[str] = field(default_factory=list)

    #: whether :meth:`read` gives encoded bytes (True) or uint8 arrays (False)
    encoded = True

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def name(self, row: int) -> str:
        """How an error names member ``row``: a file path, or a corpus shard and key."""

    @abstractmethod
    def read(self, rows: Sequence[int]) -> Iterator[tuple[int, Payload]]:
        """(row, payload) for each of ``rows``, in whatever order reads them fastest; a member that cannot be read
        gives a :class:`MemberError` as its payload (the caller fails or skips it), never stops the others."""


@dataclass
class ArrayMembers(Members):
    """An in-memory split; a member is a row of ``x``."""

    x: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 1), np.uint8))
    encoded = False

    @classmethod
    def of(cls, split: ArraySplit) -> ArrayMembers:
        return cls(list(split.class_names), split.y, x=split.x)

    def name(self, row: int) -> str:
        return f"row {row}"

    def read(self, rows: Sequence[int]) -> Iterator[tuple[int, Payload]]:
        for row in rows:
            yield int(row), self.x[int(row)]


@dataclass
class FileMembers(Members):
    """Image files; a member is a path, read as its bytes."""

    paths: list[str] = field(default_factory=list)

    def name(self, row: int) -> str:
        return self.paths[row]

    def read(self, rows: Sequence[int]) -> Iterator[tuple[int, Payload]]:
        for row in sorted(int(r) for r in rows):  # path order: neighbours on disk
            try:
                with open(self.paths[row], "rb") as f:
                    yield row, f.read()
            except OSError as exc:
                yield row, MemberError(f"cannot read image file {self.paths[row]}: {exc.strerror or exc}; fix its "
                                       "permissions or remove it (or set the source's `on_corrupt: skip`)")


@dataclass
class Subset(Members):
    """Rows ``rows`` of another split's members (a source's own train/test hold-out)."""

    of: Members | None = None
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def take(cls, members: Members, rows: np.ndarray) -> Subset:
        sub = cls(list(members.class_names), members.labels[rows], list(members.problems), of=members, rows=rows)
        sub.encoded = members.encoded
        return sub

    def name(self, row: int) -> str:
        return self.of.name(int(self.rows[row]))

    def read(self, rows: Sequence[int]) -> Iterator[tuple[int, Payload]]:
        back = {int(self.rows[r]): int(r) for r in rows}
        for inner, payload in self.of.read(list(back)):
            yield back[inner], payload


# ------------------------------------------------------------------------------------------ folder listing


@dataclass(frozen=True)
class _Dir:
    stamp: tuple[int, int]          # (st_mtime_ns, st_ino): adding, removing or renaming an entry changes it
    files: tuple[str, ...]          # image files (by suffix)
    dirs: tuple[str, ...]


#: directory path -> its last listing; bounded so a long-lived worker over many trees does not grow without end
_DIRS: dict[str, _Dir] = {}
_MAX_DIRS = 100_000


def _scan(path: str) -> _Dir:
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_ino)
    hit = _DIRS.get(path)
    if hit is not None and hit.stamp == stamp:
        return hit
    files, dirs = [], []
    with os.scandir(path) as it:
        for e in it:
            if e.is_dir():
                dirs.append(e.name)
            elif e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES:
                files.append(e.name)
    if len(_DIRS) >= _MAX_DIRS:
        _DIRS.clear()
    _DIRS[path] = entry = _Dir(stamp, tuple(files), tuple(dirs))
    return entry


def list_images(folder: Path) -> list[str]:
    """Every image file under ``folder`` (recursively), in the order ``sorted(folder.rglob("*"))`` gives (path
    components compared in turn). Cached per directory by its mtime: no file is opened."""
    found: list[tuple[str, ...]] = []

    def walk(path: str, parts: tuple[str, ...]) -> None:
        d = _scan(path)
        found.extend(parts + (f,) for f in d.files)
        for sub in d.dirs:
            walk(os.path.join(path, sub), parts + (sub,))

    walk(str(folder), ())
    return [os.path.join(str(folder), *p) for p in sorted(found)]


def class_dirs(folder: Path) -> list[str]:
    """The class folders of an ImageFolder tree, sorted (class label = position)."""
    return sorted(_scan(str(folder)).dirs)


# ---------------------------------------------------------------------------------------------- picking


def pick(members: Members, *, classes: Sequence[int] | None = None, superclass: str | None = None,
         cap: int | None = None, cap_seed: int = 0, order_seed: int | None = None, what: str = "task"
         ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The rows of a task's split, in write order, with their task labels and the task's class names.

    The rows are chosen by exactly the functions that cut an in-memory task (``select_classes`` or
    ``superclass_split``, ``cap_split``, ``shuffle_split``): they run on an :class:`ArraySplit` whose "images" are
    the member row numbers (8 bytes each) and whose labels are the members', so a streamed task holds the same
    samples in the same order as the same task built in memory. A class the task lists (``classes``) with no
    member in this split is refused here, before any member is read, naming it and the classes that have members
    (a CIFAR-100 superclass keeps its five classes whatever a sample of it holds)."""
    n = len(members)
    rows = ArraySplit(np.arange(n, dtype=np.int64).view(np.uint8).reshape(n, 1, 1, 8), members.labels,
                      list(members.class_names))
    if superclass is not None:
        rows = superclass_split(rows, superclass)
    elif classes is not None:
        rows = select_classes(rows, classes)
    empty = [c for c, k in rows.counts().items() if k == 0] if classes is not None else []
    if empty:
        have = [c for c, k in zip(members.class_names, np.bincount(members.labels, minlength=len(members.class_names)))
                if k > 0]
        raise ConfigError(f"{what}: class {empty[0]!r} has no members in this split of its source, so the task "
                          f"cannot hold it; classes with members: {have}. Pick classes from those (or add images "
                          "of the class to the source)")
    rows = cap_split(rows, cap, cap_seed)
    if order_seed is not None:
        rows = shuffle_split(rows, order_seed)
    return np.ascontiguousarray(rows.x).reshape(-1, 8).view(np.int64)[:, 0], rows.y, list(rows.class_names)
