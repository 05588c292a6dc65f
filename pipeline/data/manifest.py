"""The shard manifest: what a stream's shards hold and how to check them.

One JSON file, ``<shard_root>/<benchmark>/manifest.json``, lists every task (class names, counts, image shape,
per-channel mean/std of its train split) and every shard (path relative to the manifest's folder, e.g.
``../tasks/t1-<key>/train-000000.tar``; byte size, sample count, sha256), plus the benchmark spec that made it
and that spec's hash. Ray jobs receive the manifest (or its path) and stream
the shards it lists; :meth:`Manifest.verify` re-hashes them.

The shard folder may also live behind a URL that every node can read (a cluster without a shared disk): an
``http(s)://`` folder (e.g. ``python -m http.server`` over the shard root, or a bucket's public/presigned HTTP
endpoint), a ``file:`` URL, or a ``pipe:`` command template with ``{rel}`` (``pipe:aws s3 cp
s3://bucket/shards/{rel} -``). :meth:`Manifest.load` reads the manifest from there and :meth:`Manifest.url`
turns each shard's relative path into a URL the loader streams (webdataset's ``gopen``: ``curl`` for http).
Shards are only ever *written* to a local folder; publishing that folder is up to the operator.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SHARDS_COMMAND, ConfigError, UnsafeInputError, corrupt_shard, missing_shard, unknown_name

MANIFEST_NAME = "manifest.json"
#: seconds to wait for a remote manifest (the shards themselves are streamed by webdataset's gopen)
URL_TIMEOUT = 10.0
#: bumped whenever the shard layout or encoding changes, so old shards are rewritten rather than misread
#: (2: one content-addressed folder per task under <shard root>/tasks/, the stream's manifest points there)
FORMAT_VERSION = 2
#: the folder under the shard root that holds every task's folder
TASKS_DIR = "tasks"
#: a task's name: it names the task's shard folder (``<task>-<key>``), so one path segment of plain characters,
#: short enough for the writer's temp-folder name to fit a file name (``\Z``, not ``$``: no trailing newline)
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
#: a shard file as the writer names it (``write_split``), relative to its task's folder
SHARD_FILE = re.compile(r"^(?P<split>train|test)-\d{6,}\.tar\Z")
#: a shard as a stream's manifest lists it, relative to the stream's folder: ``../tasks/<task>-<key>/<file>``
STREAM_SHARD = re.compile(rf"^\.\./{TASKS_DIR}/(?P<task>[^/]+)-[0-9a-f]{{16}}/(?P<file>[^/]+)\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
#: one segment of a path joined to a shard root: nothing a shell or a URL reads specially
_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+\Z")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, or of anything webdataset's ``gopen`` reads (``pipe:``, ``http(s):``), in chunks."""
    import webdataset as wds

    h = hashlib.sha256()
    with wds.gopen(str(path), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_local(url: str) -> bool:
    """Whether a shard URL is a plain local path (not ``file:``, ``pipe:``, ``http(s):`` ...)."""
    return not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url)


def join_url(root: str, relpath: str) -> str:
    """``root/relpath``, or ``root`` with ``{rel}`` replaced by ``relpath`` (``pipe:`` command templates).

    ``relpath`` comes from data (a manifest, a task.json), so it must be what the shard writer makes: plain
    segments (letters, digits, ``.``, ``_``, ``-``) joined by ``/``, with at most one leading ``../`` (a stream's
    manifest lists its shards as ``../tasks/...``: from the stream's folder up to the shard root). That one ``..``
    is folded away here, against the root's last segment, because object stores (S3 keys behind ``pipe:aws s3
    cp``) do not resolve ``..`` the way a file system or curl does; it never climbs above the shard root, into a
    host or a bucket. Anything else is refused before it reaches a shell (``pipe:`` runs through ``sh -c``) or a
    URL; in a ``pipe:`` template the path is also shell-quoted. A ``pipe:`` root itself only ever comes from the
    config (``paths.shards``), never from data."""
    parts = relpath.split("/")
    up = 1 if parts[:1] == [".."] else 0
    rest = parts[up:]
    if not rest or any(p in (".", "..") or not _SEGMENT.match(p) for p in rest):
        raise UnsafeInputError(
            f"refusing to read {relpath!r} under {root}: a shard path is plain names (letters, digits, '.', '_', "
            "'-') joined by '/', with at most one leading '../'; this one could reach a shell or leave the shard "
            f"root, so nothing was read. Rewrite the shards with `{SHARDS_COMMAND}` and publish them again")
    template = "{rel}" in root
    head, tail = root.split("{rel}", 1) if template else (root.rstrip("/") + "/", "")
    head = _fold(head)  # the root's own `seg/..` (it comes from the config)
    if up:
        seg = re.search(r"([^/\s]*)/\Z", head)  # the last folder (in a command: after its "/" or a space)
        above = head[: seg.start()] if seg else ""  # ends with its "/" or space (or is "": a relative root)
        # the segment climbed over must be a folder, not a host (`http://host/`), a scheme or nothing
        if (seg is None or seg[1] in ("", ".", "..") or ":" in seg[1]
                or (above.endswith("//") and not above.endswith("///"))):
            raise UnsafeInputError(f"refusing to read {relpath!r} under {root}: its '../' would climb above the "
                                   f"shard root; give the stream's folder (<shard root>/<stream>) as the root")
        head = above
    rel = "/".join(rest)
    return head + (shlex.quote(rel) if root.startswith("pipe:") else rel) + tail


def _fold(url: str) -> str:
    while True:
        folded = _DOT_DOT.sub("/", url, count=1)
        if folded == url:
            return url
        url = folded


#: one ``/<segment>/../`` (a segment that is not itself ``..``)
_DOT_DOT = re.compile(r"/(?!\.\./)[^/]+/\.\./")


def check_shard_paths(info: TaskInfo, where: str, *, in_stream: bool) -> None:
    """Hold a TaskInfo read from a file (a stream's manifest: ``in_stream``; a task's ``task.json``: not) to the
    exact shape the writer gives it: a plain task name, shard paths ``<split>-NNNNNN.tar`` (a manifest:
    ``../tasks/<task>-<key>/<split>-NNNNNN.tar``) under the split that lists them, each with its sha256. Anything
    else raises an :class:`UnsafeInputError` naming ``where``, the task and the path: these paths are joined to
    the shard root and opened (through a shell, for a ``pipe:`` root)."""
    fix = f"rewrite the shards with `{SHARDS_COMMAND}` (and publish them again)"
    if not isinstance(info.shards, dict) or not isinstance(info.sha256, dict):
        raise ConfigError(f"{where}: task {info.name!r} has no `shards` / `sha256` mappings; {fix}")
    if not isinstance(info.name, str) or not TASK_NAME.match(info.name):
        raise UnsafeInputError(f"{where}: task name {info.name!r} is not one the shard writer makes "
                               f"({TASK_NAME.pattern}); {fix}")
    for split, rels in info.shards.items():
        for rel in rels if isinstance(rels, list) else [rels]:
            ok = isinstance(rel, str)
            file = rel
            if ok and in_stream:
                m = STREAM_SHARD.match(rel)
                ok, file = m is not None and m["task"] == info.name, m["file"] if m else rel
            m = SHARD_FILE.match(file) if ok else None
            if m is None or m["split"] != split:
                shape = f"../{TASKS_DIR}/{info.name}-<key>/{split}-NNNNNN.tar" if in_stream else f"{split}-NNNNNN.tar"
                raise UnsafeInputError(f"{where}: task {info.name!r} lists the {split} shard {rel!r}, which is not a "
                                       f"path the shard writer makes ({shape}); refused, nothing was read. {fix}")
            if not isinstance(info.sha256.get(rel), str) or not _SHA256.match(info.sha256[rel]):
                raise ConfigError(f"{where}: task {info.name!r} has no sha256 for shard {rel!r}; {fix}")


def read_url(url: str, timeout: float = URL_TIMEOUT) -> bytes:
    """The bytes at a remote URL: ``http(s)`` through urllib (fails within ``timeout``, naming the URL and the
    HTTP status), anything else through webdataset's ``gopen``. Raises FileNotFoundError when it is not there."""
    if re.match(r"^https?://", url):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"{url}: HTTP 404 Not Found") from None
            raise OSError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise OSError(f"{url} is not reachable ({getattr(exc, 'reason', exc)})") from None
    import webdataset as wds

    try:
        with wds.gopen(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None
    except Exception as exc:  # a pipe: command that failed, an unknown scheme ...
        raise OSError(f"{url} is not readable ({exc})") from None


def sample_key(index: int) -> str:
    """The WebDataset key of row ``index`` of a split (no dots: WebDataset splits keys at the first dot)."""
    return f"{index:07d}"


@dataclass
class TaskInfo:
    """One task's entry in the manifest.

    ``mean``/``std`` are per model channel (grey data repeated to 3 channels has 3 equal values), computed on
    the task's (capped) train split scaled to [0, 1]. ``shards`` maps split -> shard paths relative to the
    manifest's folder; ``sha256``, ``sizes`` and ``shard_counts`` are keyed by those relative paths.
    ``flip`` is the task's training-time flip setting (the benchmark's ``flip``, else ``flip_default``, which
    comes from the source: on for natural images, off for digits and Fashion-MNIST).

    ``image_format`` is how images are stored: ``source`` (each image's own bytes: entries ``jpg``, ``png`` or
    ``webp``), else ``npy``, ``png``, ``jpeg`` or ``webp``. ``uniform_shape`` is False when the images differ in
    size (a ``source`` task of photos); ``image_shape`` is then the first train image's. ``mean``/``std`` of a
    task stored from encoded images come from its first 1024 train images in shard order. ``skipped`` names the
    source members left out as unusable (the source's ``on_corrupt: skip``). Manifests written before these fields
    existed read as uniform, with nothing skipped.
    """

    name: str
    class_names: list[str]
    num_classes: int
    counts: dict[str, int]
    image_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    shards: dict[str, list[str]]
    sha256: dict[str, str]
    sizes: dict[str, int] = field(default_factory=dict)
    shard_counts: dict[str, int] = field(default_factory=dict)
    flip: bool = False
    flip_default: bool = False
    source: str = ""
    image_format: str = "npy"
    uniform_shape: bool = True
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskInfo:
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @property
    def identity(self) -> str:
        """The task's content identity: a hash of its name, classes, image format and every shard's sha256, in
        order. The same task written for any stream hashes the same (shards are byte-identical for the same
        data); any change to its data, caps or order changes it. Results are found by it, not by the stream."""
        blob = json.dumps({"name": self.name, "classes": self.class_names, "format": self.image_format,
                           "shards": {split: [self.sha256[rel] for rel in rels]
                                      for split, rels in sorted(self.shards.items())}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def split_shards(self, split: str) -> list[str]:
        """Relative paths of the shards of ``split``; an unknown split lists the known ones."""
        if split not in self.shards:
            raise unknown_name(f"split of task {self.name!r}", split, sorted(self.shards))
        return self.shards[split]


@dataclass
class Manifest:
    """A benchmark's shards on disk (or in object storage): tasks, checksums, and the spec that made them.

    ``root`` is the folder (or URL prefix) that shard paths are relative to; ``path`` is the manifest file.
    For shards in object storage, build it with ``Manifest.from_dict(json, root=...)`` where root is a URL
    prefix (``"http://host/shards/<name>"``) or a template with ``{rel}`` (``"pipe:aws s3 cp
    s3://bucket/shards/<name>/{rel} -"``); the loader streams and checks whatever webdataset can open.
    """

    root: str
    benchmark: str
    spec_hash: str
    tasks: list[TaskInfo]
    spec: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: str = ""

    # ------------------------------------------------------------------------------------------ file I/O

    @property
    def is_remote(self) -> bool:
        """Whether the shards are read from a URL (``http(s):``, ``file:``, ``pipe:`` ...) rather than a folder."""
        return not is_local(self.root)

    @property
    def path(self) -> Path | str:
        """Where the manifest is: a ``Path`` for a local root; for a remote root a string that
        :meth:`load` accepts (the manifest's URL, or the ``{rel}`` template itself)."""
        if self.is_remote:
            return self.root if "{rel}" in self.root else join_url(self.root, MANIFEST_NAME)
        return Path(self.root) / MANIFEST_NAME

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read a manifest from its file or its folder; ``root`` becomes that folder.

        ``path`` may also be a URL: the manifest's own (``http://host/shards/<name>/manifest.json``), its folder
        (``http://host/shards/<name>``), or a ``{rel}`` template; ``root`` becomes the folder URL / template.
        """
        if isinstance(path, str) and not is_local(path):
            return cls.load_url(path)
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no shard manifest at {path}; run `{SHARDS_COMMAND}`")
        with open(path) as f:
            d = json.load(f)
        return cls.from_dict(d, root=str(path.parent.absolute()))

    @classmethod
    def load_url(cls, url: str, timeout: float = URL_TIMEOUT) -> Manifest:
        """Read a manifest from a URL (see :meth:`load`). Raises FileNotFoundError (not there) or OSError
        (server down, command failed), naming the URL."""
        if "{rel}" in url:
            root = url
        elif url.rstrip("/").endswith("/" + MANIFEST_NAME):
            root = url.rstrip("/")[: -len(MANIFEST_NAME) - 1]
        else:
            root = url.rstrip("/")
        where = join_url(root, MANIFEST_NAME)
        data = read_url(where, timeout)
        try:
            d = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{where} is not a shard manifest (invalid JSON: {exc})") from None
        return cls.from_dict(d, root=root)

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: str) -> Manifest:
        """A manifest read from JSON. Its shard paths are data that will be joined to ``root`` and opened, so each
        task is held to the writer's shapes first (:func:`check_shard_paths`)."""
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            version = d.get("format_version") if isinstance(d, dict) else None
            raise ConfigError(
                f"manifest under {root} has format {version}, this code reads {FORMAT_VERSION}; "
                f"run `{SHARDS_COMMAND}` to rewrite the shards"
            )
        try:
            m = cls(
                root=root,
                benchmark=d["benchmark"],
                spec_hash=d["spec_hash"],
                tasks=[TaskInfo.from_dict(t) for t in d["tasks"]],
                spec=d.get("spec", {}),
                format_version=d["format_version"],
                created=d.get("created", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"manifest under {root} is malformed ({type(exc).__name__}: {exc}); "
                              f"run `{SHARDS_COMMAND}` to rewrite the shards") from None
        for t in m.tasks:
            check_shard_paths(t, f"manifest under {root}", in_stream=True)
        return m

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (without ``root``, so a shard folder can be moved or uploaded as is)."""
        return {
            "format_version": self.format_version,
            "benchmark": self.benchmark,
            "spec_hash": self.spec_hash,
            "created": self.created,
            "initial_task": self.initial_task,
            "new_tasks": self.new_tasks,
            "spec": self.spec,
            "tasks": [t.to_dict() for t in self.tasks],
        }

    def save(self, root: str | os.PathLike | None = None) -> Path:
        """Write ``manifest.json`` under ``root`` (default: own root) atomically (temp file + rename)."""
        if root is None and self.is_remote:
            raise ConfigError(f"cannot write the manifest to {self.root}: shards are written to a local folder "
                              f"(`{SHARDS_COMMAND} paths.shards=/some/folder`) and then published at a URL")
        folder = Path(root or self.root)
        tmp = folder / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST_NAME)
        return folder / MANIFEST_NAME

    # ------------------------------------------------------------------------------------------- tasks

    def task(self, name: str) -> TaskInfo:
        """The task called ``name``; an unknown name lists the known ones."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise unknown_name(f"task of benchmark {self.benchmark!r}", name, [t.name for t in self.tasks])

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def initial_task(self) -> str:
        """The task that trains the backbone (the first)."""
        return self.tasks[0].name

    @property
    def new_tasks(self) -> list[str]:
        """The tasks learned on top of the frozen backbone, in order."""
        return [t.name for t in self.tasks[1:]]

    # ------------------------------------------------------------------------------------------ shards

    def url(self, relpath: str) -> str:
        """Where a shard is read from: ``root/relpath``, or ``root`` with ``{rel}`` replaced (``pipe:`` commands)."""
        return join_url(self.root, relpath)

    def all_shards(self, task: str | None = None) -> list[tuple[TaskInfo, str]]:
        """(task, relative path) of every shard, or of one task's shards."""
        tasks = self.tasks if task is None else [self.task(task)]
        return [(t, rel) for t in tasks for split in sorted(t.shards) for rel in t.shards[split]]

    def check_sizes(self) -> str | None:
        """Cheap check that every local shard exists with its recorded size; returns the first problem or None."""
        for t, rel in self.all_shards():
            if not is_local(self.url(rel)):
                continue
            path = Path(self.url(rel))
            if not path.is_file():
                return f"shard {path} is missing"
            if t.sizes and path.stat().st_size != t.sizes[rel]:
                return f"shard {path} has {path.stat().st_size} bytes, manifest says {t.sizes[rel]}"
        return None

    def verify(self, task: str | None = None) -> None:
        """Re-hash every shard (or one task's) against the manifest; raise naming the bad shard and the fix.

        Local shards are read from disk; remote ones (a URL root) are streamed through ``gopen``.
        """
        for t, rel in self.all_shards(task):
            url = self.url(rel)
            if is_local(url) and not Path(url).is_file():
                raise missing_shard(url)
            if sha256_file(url) != t.sha256[rel]:
                raise corrupt_shard(url, "sha256 mismatch")
