"""A WebDataset corpus as a source: its shards are indexed once, then a task reads only its members, by offset.

::

    {name: webdataset, urls: "/data/corpus-{000000..000099}.tar", image_key: jpg, label_key: cls,
     classes_file: /data/classes.txt, test_fraction: 0.2, split_seed: 0}

- ``urls``: a brace pattern, a list, or ``{train: ..., test: ...}`` for a corpus with its own split (otherwise the
  split is a seeded, stratified hold-out of ``test_fraction``, like the other sources). Local paths and
  ``file:`` are read with a seek per member; ``http(s)://`` with a Range request per member (a server that ignores
  Range is read through once per shard instead); any other URL webdataset's ``gopen`` opens (``pipe:``: only ever
  from the config, never a catalogue line) is read through once per shard.
- ``image_key``: the image entry's extension (``jpg``; alternatives as ``jpg;png``). ``label_key``: the label
  entry (``cls``: its text, an integer or a class name) or a JSON field (``json.label``, nested ``json.a.b``).
- ``classes_file``: one class name per line; an integer label indexes it, a text label must be one of its lines.
  Without it the classes are ``0..max`` (integer labels) or the sorted label names.

The index (in the spirit of webdataset's ``wids``: each sample's image entry as shard + byte offset + size, and its
label) is one JSON file per corpus shard under the index folder (the shard root's ``index/`` for the writer),
named by the shard's URL and what would change it (local: size + mtime; http: ETag, else size + Last-Modified),
so a shard that changed is indexed again and never read through a stale index; a streamed (``pipe:``) shard cannot
be stat'ed, so each member's tar header is checked against the index as it is read. Indexing is one job per
corpus shard through ``map_fn`` (in-process by default; the driver may pass Ray's). No index is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, Log, SourceNotFoundError
from ..redact import redact_text
from .members import MemberError, Members, Payload
from .sources import data_home, decode_members, register_source, split_members

INDEX_VERSION = 1
#: the folder under the shard root that holds corpus indexes
INDEX_DIR = "index"
TIMEOUT_S = 30.0
#: map_fn(index_shard, [(url, fingerprint, image_key, label_key), ...]) -> each shard's index, in order
IndexMap = Callable[[Callable[..., dict[str, Any]], list[tuple[Any, ...]]], Iterable[dict[str, Any]]]


def _in_process(fn: Callable[..., dict[str, Any]], items: list[tuple[Any, ...]]) -> Iterable[dict[str, Any]]:
    return (fn(*args) for args in items)


# ---------------------------------------------------------------------------------------------- urls


def split_urls(cfg: dict[str, Any]) -> dict[str, list[str]] | list[str]:
    """The corpus's shard URLs, brace patterns expanded: per split for ``{train, test}``, else one list."""
    from webdataset.shardlists import expand_urls

    urls = cfg.get("urls")
    if not urls:
        raise ConfigError("a webdataset source needs `urls`: a shard pattern such as /data/corpus-{000000..000099}.tar,"
                          " a list of shards, or {train: ..., test: ...}")
    if isinstance(urls, dict):
        if set(urls) != {"train", "test"}:
            raise ConfigError(f"webdataset `urls` as a mapping needs exactly `train` and `test`, got {sorted(urls)}")
        return {split: _expand(expand_urls, v) for split, v in urls.items()}
    return _expand(expand_urls, urls)


def _expand(expand_urls: Callable[[Any], list[str]], urls: Any) -> list[str]:
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u for item in items for u in expand_urls(str(item))]
    if not out:
        raise ConfigError(f"webdataset `urls` {urls!r} names no shard")
    return out


def _local(url: str) -> str | None:
    """The file path of a local shard URL (a path or ``file:``), else None."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("file:"):
        return url[len("file:"):]
    return url if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url) else None


def _http(url: str) -> bool:
    return bool(re.match(r"^https?://", url))


def fingerprint(url: str) -> dict[str, Any]:
    """What would change if the shard changed: local size + mtime; http ETag (else size + Last-Modified); a
    streamed URL: nothing cheap (its members' headers are checked as they are read)."""
    path = _local(url)
    if path is not None:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise SourceNotFoundError(f"corpus shard {path} is not readable ({exc.strerror}); fix the source's `urls`"
                                      ) from None
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if _http(url):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT_S) as r:
                etag, size, modified = r.headers.get("ETag"), r.headers.get("Content-Length"), r.headers.get(
                    "Last-Modified")
        except OSError as exc:
            raise SourceNotFoundError(f"corpus shard {redact_text(url)} is not reachable ({exc}); fix the source's "
                                      "`urls` or the server") from None
        return {"etag": etag} if etag else {"size": size, "last_modified": modified}
    return {}


def index_id(url: str, fp: dict[str, Any], image_key: str, label_key: str) -> str:
    """The index file's name: the shard's URL (first part: older indexes of the same shard are found by it) and
    what the index depends on."""
    where = hashlib.sha256(url.encode()).hexdigest()[:16]
    what = json.dumps([INDEX_VERSION, fp, image_key, label_key], sort_keys=True)
    return f"{where}-{hashlib.sha256(what.encode()).hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------- indexing


def _label_of(entries: dict[str, bytes], label_key: str) -> str:
    """A sample's label as text, from its label entry or a JSON field; raises ValueError saying what is missing."""
    if label_key.startswith("json."):
        if "json" not in entries:
            raise ValueError(f"no 'json' entry (label_key {label_key!r})")
        try:
            value: Any = json.loads(entries["json"])
        except ValueError as exc:
            raise ValueError(f"its 'json' entry is not JSON ({exc})") from None
        for part in label_key.split(".")[1:]:
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"its 'json' entry has no field {label_key[5:]!r}")
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"its label {label_key[5:]!r} is {value!r}, not an integer or a class name")
        return str(value)
    if label_key not in entries:
        raise ValueError(f"no {label_key!r} entry (label_key)")
    try:
        return entries[label_key].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"its {label_key!r} entry is not UTF-8 text") from None


def index_shard(url: str, fp: dict[str, Any], image_key: str, label_key: str) -> dict[str, Any]:
    """Index one corpus shard (one job): every sample's image entry (offset, size, extension) and label text, and
    the samples that cannot be used (no image entry, no label) named by key. Reads headers and label entries only:
    a local shard's image bytes are skipped by seeking."""
    from webdataset import gopen
    from webdataset.tariterators import base_plus_ext

    images = [e.strip().lower() for e in image_key.split(";") if e.strip()]
    label_ext = "json" if label_key.startswith("json.") else label_key
    samples: dict[str, dict[str, Any]] = {}
    path = _local(url)
    try:
        stream = open(path, "rb") if path is not None else gopen(url, "rb")
        with stream, tarfile.open(fileobj=stream, mode="r:" if path is not None else "r|") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None or os.path.basename(key).startswith("__"):  # webdataset's meta entries
                    continue
                s = samples.setdefault(key, {"labels": {}})
                ext = ext.lower()
                if ext in images and "offset" not in s:
                    s.update(offset=m.offset_data, size=m.size, ext=ext)
                elif ext == label_ext:
                    s["labels"][ext] = tf.extractfile(m).read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"corpus shard {redact_text(url)} is not a readable tar ({type(exc).__name__}: {exc}); fix or "
                        "remove it from the source's `urls`") from None
    out: dict[str, Any] = {"version": INDEX_VERSION, "url": url, "fingerprint": fp, "image_key": image_key,
                           "label_key": label_key, "keys": [], "exts": [], "offsets": [], "sizes": [], "labels": [],
                           "problems": []}
    for key, s in samples.items():
        try:
            if "offset" not in s:
                raise ValueError(f"no {image_key!r} entry (image_key)")
            label = _label_of(s["labels"], label_key)
        except ValueError as exc:
            out["problems"].append([key, str(exc)])
            continue
        for name, value in (("keys", key), ("exts", s["ext"]), ("offsets", s["offset"]), ("sizes", s["size"]),
                            ("labels", label)):
            out[name].append(value)
    if path is not None and fingerprint(url) != fp:
        raise DataError(f"corpus shard {path} changed while it was being indexed; run again once it is written")
    return out


#: index id -> a shard's index, for this process (a worker that writes many tasks of one corpus reads it once)
_MEMO: dict[str, dict[str, Any]] = {}


def _index_root(cfg: dict[str, Any], index_dir: str | os.PathLike | None) -> Path:
    if index_dir is not None:
        return Path(index_dir)
    if cfg.get("index_dir"):
        return Path(str(cfg["index_dir"])).expanduser()
    return data_home() / INDEX_DIR


def ensure_index(cfg: dict[str, Any], index_dir: str | os.PathLike | None = None, *, map_fn: IndexMap = _in_process,
                 log: Log | None = None) -> list[dict[str, Any]]:
    """Every shard's index of the corpus ``cfg`` (all splits), current: each is read from the index folder (or this
    process's memory) when its shard is unchanged, else built through ``map_fn`` (one job per shard) and stored.
    The index folder: ``index_dir``, else the source's ``index_dir``, else ``<data home>/index``."""
    urls = split_urls(cfg)
    every = list(dict.fromkeys(u for us in (urls.values() if isinstance(urls, dict) else [urls]) for u in us))
    image_key, label_key = str(cfg.get("image_key", "jpg")), str(cfg.get("label_key", "cls"))
    root = _index_root(cfg, index_dir)
    fps = [fingerprint(u) for u in every]
    ids = [index_id(u, fp, image_key, label_key) for u, fp in zip(every, fps)]
    todo = []
    for url, fp, iid in zip(every, fps, ids):
        path = root / f"{iid}.json"
        if iid not in _MEMO and path.is_file():
            try:
                d = json.loads(path.read_text())
                if d.get("version") == INDEX_VERSION and d.get("url") == url and d.get("fingerprint") == fp:
                    _MEMO[iid] = d
            except (OSError, ValueError):
                pass  # unreadable: indexed again below
        if iid not in _MEMO:
            todo.append((url, fp, image_key, label_key))
        elif not path.is_file():
            _store(root, iid, _MEMO[iid])  # built in this process for another folder: keep a copy beside the shards
    if todo:
        if log is not None:
            log(f"[corpus] indexing {len(todo)} of {len(every)} corpus shard(s) into {root}")
        for args, d in zip(todo, map_fn(index_shard, todo)):
            iid = index_id(args[0], args[1], image_key, label_key)
            _MEMO[iid] = d
            _store(root, iid, d)
    return [_MEMO[i] for i in ids]


def _store(root: Path, iid: str, d: dict[str, Any]) -> None:
    """Write one shard's index atomically, and drop that shard's older indexes (same URL, other fingerprint)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{iid}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.write_text(json.dumps(d))
    os.replace(tmp, root / f"{iid}.json")
    for old in root.glob(f"{iid.split('-')[0]}-*.json"):
        if old.stem != iid:
            old.unlink(missing_ok=True)


def drop_index(url: str, cfg: dict[str, Any], index_dir: str | os.PathLike | None) -> None:
    """Forget every index of one shard (found stale while reading): the next run indexes it again."""
    where = hashlib.sha256(url.encode()).hexdigest()[:16]
    for iid in [i for i in _MEMO if i.startswith(where + "-")]:
        del _MEMO[iid]
    root = _index_root(cfg, index_dir)
    for old in root.glob(f"{where}-*.json") if root.is_dir() else []:
        old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- classes


def _classes_file(cfg: dict[str, Any]) -> list[str] | None:
    if not cfg.get("classes_file"):
        return None
    path = Path(str(cfg["classes_file"])).expanduser()
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceNotFoundError(f"classes_file {path} is not readable ({exc}); give one class name per line") from None
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"classes_file {path} must list distinct class names, one per line")
    return names


def class_names(cfg: dict[str, Any], indexes: list[dict[str, Any]] | None = None) -> list[str]:
    """The corpus's class names: its ``classes_file``, else from every label in its index (``0..max`` for integer
    labels, else the sorted names)."""
    names = _classes_file(cfg)
    if names is not None:
        return names
    labels = {lab for d in (indexes if indexes is not None else ensure_index(cfg)) for lab in d["labels"]}
    if labels and all(re.fullmatch(r"\d+", lab) for lab in labels):
        return [str(i) for i in range(max(int(lab) for lab in labels) + 1)]
    return sorted(labels)


# ---------------------------------------------------------------------------------------------- members


@dataclass
class CorpusMembers(Members):
    """Members of a corpus: image entries read by offset from their shard."""

    urls: list[str] = field(default_factory=list)
    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    keys: list[str] = field(default_factory=list)
    exts: list[str] = field(default_factory=list)
    cfg: dict[str, Any] = field(default_factory=dict)
    index_dir: str | None = None

    def name(self, row: int) -> str:
        return f"corpus shard {redact_text(self.urls[self.shard[row]])} member {self.keys[row]}.{self.exts[row]}"

    def read(self, rows: Sequence[int]) -> Iterator[tuple[int, Payload]]:
        by_shard: dict[int, list[int]] = {}
        for row in sorted((int(r) for r in rows), key=lambda r: (self.shard[r], self.offsets[r])):
            by_shard.setdefault(int(self.shard[row]), []).append(row)
        for s, wanted in by_shard.items():
            url = self.urls[s]
            path = _local(url)
            if path is not None:
                yield from self._read_file(path, wanted)
            elif _http(url):
                yield from self._read_http(url, wanted)
            else:
                yield from self._read_stream(url, wanted)

    def _check(self, header: bytes, row: int) -> None:
        """The tar header just before a member's data must name it with its size: else the shard changed since it
        was indexed, and its index is dropped so the next run builds it again."""
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            # a long name's header holds only part of it (the rest is in a GNU/PAX header before it)
            ok = info.size == int(self.sizes[row]) and (self._named(info.name, row) or len(info.name) >= 99)
        except tarfile.TarError:
            ok = False
        if not ok:
            url = self.urls[self.shard[row]]
            drop_index(url, self.cfg, self.index_dir)
            raise DataError(f"{self.name(row)} is not where the corpus index says: the shard changed since it was "
                            "indexed. Its index was dropped; run again to index it anew")

    def _named(self, name: str, row: int) -> bool:
        key = self.keys[row]
        return name.startswith(key + ".") and name[len(key) + 1:].lower() == self.exts[row]

    def _read_file(self, path: str, rows: list[int]) -> Iterator[tuple[int, Payload]]:
        with open(path, "rb") as f:
            for row in rows:
                f.seek(int(self.offsets[row]) - 512)
                block = f.read(512 + int(self.sizes[row]))
                if len(block) < 512:
                    self._check(block.ljust(512, b"\0"), row)
                self._check(block[:512], row)
                if len(block) != 512 + int(self.sizes[row]):
                    yield row, MemberError(f"{self.name(row)} is truncated; fix or remove the shard")
                    continue
                yield row, block[512:]

    def _read_http(self, url: str, rows: list[int]) -> Iterator[tuple[int, Payload]]:
        for i, row in enumerate(rows):
            start, stop = int(self.offsets[row]) - 512, int(self.offsets[row]) + int(self.sizes[row]) - 1
            req = urllib.request.Request(url, headers={"Range": f"bytes={start}-{stop}"})
            try:
                with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
                    if r.status != 206:  # the server ignores Range: read the shard through once instead
                        yield from self._read_stream(url, rows[i:])
                        return
                    block = r.read()
            except OSError as exc:
                raise DataError(f"{self.name(row)}: the corpus server did not answer ({exc}); check it and run "
                                "again") from None
            self._check(block[:512], row)
            yield row, block[512:]

    def _read_stream(self, url: str, rows: list[int]) -> Iterator[tuple[int, Payload]]:
        from webdataset import gopen

        want = {int(self.offsets[r]): r for r in rows}
        with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
            for m in tf:
                row = want.pop(m.offset_data, None)
                if row is None:
                    continue
                if m.size != int(self.sizes[row]) or not self._named(m.name, row):
                    self._check(b"\0" * 512, row)  # raises: not the indexed member
                yield row, tf.extractfile(m).read()
                if not want:
                    return
        for row in want.values():
            self._check(b"\0" * 512, row)  # the shard ended before it: it changed


def corpus_members(cfg: dict[str, Any], split: str, cache_dir: Path | None = None) -> Members:
    """``split`` of a corpus as members (its own train/test shards, else a seeded hold-out of every shard)."""
    indexes = ensure_index(cfg, cache_dir)
    names = class_names(cfg, indexes)
    urls = split_urls(cfg)
    if isinstance(urls, dict):
        mine = set(urls[split])
        return _members(cfg, [d for d in indexes if d["url"] in mine], names, cache_dir)
    return split_members(_members(cfg, indexes, names, cache_dir), split, cfg)


def _members(cfg: dict[str, Any], indexes: list[dict[str, Any]], names: list[str], cache_dir: Path | None
             ) -> CorpusMembers:
    by_name = {n: i for i, n in enumerate(names)}
    from_file = bool(cfg.get("classes_file"))
    problems = [f"corpus shard {redact_text(d['url'])} sample {key}: {why}" for d in indexes for key, why in
                d["problems"]]
    labels, shard, offsets, sizes, keys, exts = [], [], [], [], [], []
    for s, d in enumerate(indexes):
        for key, ext, off, size, lab in zip(d["keys"], d["exts"], d["offsets"], d["sizes"], d["labels"]):
            if lab in by_name and not (from_file and lab.isdigit()):
                label = by_name[lab]
            elif lab.isdigit() and int(lab) < len(names):
                label = int(lab)
            else:
                problems.append(f"corpus shard {redact_text(d['url'])} sample {key}: label {lab!r} is not one of the "
                                f"{len(names)} classes" + (" of classes_file" if from_file else ""))
                continue
            labels.append(label)
            shard.append(s)
            offsets.append(off)
            sizes.append(size)
            keys.append(key)
            exts.append(ext)
    if problems and cfg.get("on_corrupt", "fail") != "skip":
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MemberError(f"{problems[0]}{more}; fix the corpus, or set the source's `on_corrupt: skip` to leave such "
                          "samples out (they are then listed in the task's `skipped`)")
    return CorpusMembers(list(names), np.asarray(labels, dtype=np.int64), problems, urls=[d["url"] for d in indexes],
                         shard=np.asarray(shard, dtype=np.int32), offsets=np.asarray(offsets, dtype=np.int64),
                         sizes=np.asarray(sizes, dtype=np.int64), keys=keys, exts=exts, cfg=dict(cfg),
                         index_dir=None if cache_dir is None else str(cache_dir))


@register_source("webdataset", flip=True, members=corpus_members, names=_classes_file)
def webdataset_corpus(cfg: dict[str, Any], split: str) -> Any:
    """A WebDataset corpus (tar shards of image + label entries), indexed once, members read by offset."""
    return decode_members(corpus_members(cfg, split), cfg, f"webdataset corpus {redact_text(str(cfg.get('urls')))}")
