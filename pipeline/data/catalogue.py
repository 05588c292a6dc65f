"""The ``catalogue`` stream kind: a JSONL file that grows, one task per line, as a fixed ``sequence`` benchmark.

Hostile input: anyone who can append to the file writes these lines, and ``mode=follow`` trains them unattended,
so every line is checked on its own (:func:`_check_line`) and a bad one costs only itself (named by its number,
left out, the other lines run). Registered into :data:`.benchmarks.STREAM_KINDS` on import (the package imports
this module).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, UnsafeInputError
from .arrays import resolve_classes
from .benchmarks import STREAM_KINDS, check_cap, class_names, is_int, require
from .manifest import TASK_NAME
from .sources import source_kind

#: what a catalogue line may hold
LINE_KEYS = ("name", "source", "classes", "caps", "flip")
CAP_KEYS = ("train", "test", "seed")
#: the benchmark key that lets a catalogue line's source say ``download: true`` (default: refused)
ALLOW_DOWNLOAD = "allow_download"
EXAMPLE_LINE = '{"name": "t1", "source": {"name": "fashion_mnist"}, "classes": [0, 1]}'


def _catalogue(bench: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``kind: catalogue``: ``path`` is a JSONL file, one task per line, the first the initial (backbone) task::

        {"name": "shirts", "source": {"name": "fashion_mnist"}, "classes": ["Shirt", "Coat"], "caps": {"train": 500}}

    Becomes a ``sequence`` benchmark; a line's ``caps`` become its ``task_caps`` entry.

    Anyone who can append to the file writes these lines (``mode=follow`` trains them unattended), so every check
    a line can fail runs here, per line (:func:`_check_line`): a bad line is named by its number, with what is
    wrong and what to do, and left out; the other lines run. Only the first line is different: it trains the
    backbone, so the stream cannot go on without it and it being bad is an error."""
    require(bench, "path")
    path = Path(str(bench["path"])).expanduser()
    if not path.is_file():
        raise ConfigError(f"catalogue {path} does not exist; set benchmark.path to a JSONL file with one task per "
                          f"line, e.g. {EXAMPLE_LINE}")
    allow_download = bench.get(ALLOW_DOWNLOAD) is True
    entries: list[dict[str, Any]] = []
    lines: dict[str, tuple[int, dict[str, Any]]] = {}
    problems: list[str] = []
    # bytes, split on \n / \r only: each line is decoded on its own, so one stray byte costs only its line
    for no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = _check_line(raw, allow_download)
        except Exception as exc:  # whatever a line holds, it costs that line only
            said = isinstance(exc, (DataError, ValueError, LookupError, OSError))  # these name what is wrong
            why = str(exc) if said else f"{type(exc).__name__}: {exc}"
            if not entries:
                raise ConfigError(f"catalogue {path} line {no} (the initial task: it trains the backbone) is "
                                  f"malformed: {why}") from None
            problems.append(f"catalogue {path} line {no} is malformed ({why}); left out, the other lines run. "
                            "Fix the line (or delete it) and the next run, or a following driver, picks it up")
            continue
        name = entry["name"]
        if name in lines:
            first_no, first = lines[name]
            if first != entry:
                raise ConfigError(f"catalogue {path}: task {name!r} is on line {first_no} and line {no} with "
                                  "different specs; give one of them another name")
            problems.append(f"catalogue {path} line {no} repeats line {first_no} ({name!r}); left out")
            continue
        lines[name] = (no, entry)
        entries.append(entry)
    if not entries:
        raise ConfigError(f"catalogue {path} has no task; add one JSON object per line, e.g. {EXAMPLE_LINE}")
    fixed = {k: v for k, v in bench.items() if k not in ("kind", "path", ALLOW_DOWNLOAD)}
    # the stream's manifest folder: one per catalogue file, so two catalogues left at the default name do not
    # take turns rewriting one manifest (their tasks' shard folders are shared anyway, by content)
    where = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:8]
    fixed.update(name=f"{bench.get('name') or 'catalogue'}-{where}")
    fixed.update(kind="sequence", catalogue=str(path.absolute()),
                 tasks=[{k: e[k] for k in ("name", "source", "classes", "flip") if k in e} for e in entries],
                 task_caps={e["name"]: e["caps"] for e in entries if e.get("caps")} or None)
    return fixed, problems


def _check_line(raw: bytes, allow_download: bool) -> dict[str, Any]:
    """One catalogue line as a task entry, or an exception saying what is wrong with it and what to do: JSON
    object, keys, a name that can name a folder, a known source (no download without the config's consent),
    caps of whole positive numbers, a non-empty class list whose classes the source has."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"byte {raw[exc.start]:#04x} at column {exc.start + 1} is not UTF-8; save the file as "
                         "UTF-8") from None
    try:
        entry = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc}); write one JSON object per line, e.g. {EXAMPLE_LINE}") from None
    if not isinstance(entry, dict):
        raise ValueError(f"not a JSON object; write one per line, e.g. {EXAMPLE_LINE}")
    unknown = set(entry) - set(LINE_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; valid: {', '.join(LINE_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise ValueError(f"`name` {name!r} must be a string matching {TASK_NAME.pattern} (it names the task's "
                         "shard folder), e.g. \"shoes-2\"")
    source = entry.get("source")
    if not isinstance(source, dict):
        raise ValueError("`source` must be a mapping such as {\"name\": \"fashion_mnist\"}")
    for key, value in _strings(source, "source"):
        # a source reads local files only; a command (webdataset's `pipe:`) may come from the config, never a line
        if value.lstrip().startswith("pipe:"):
            raise UnsafeInputError(f"`{key}` is a `pipe:` command; a catalogue line may name folders and "
                                   "files, never commands")
    if source.get("download") not in (None, False):
        if source.get("download") is not True:
            raise ValueError(f"`source.download` must be true or false, got {source['download']!r}")
        if not allow_download:
            raise ValueError("`source.download: true` would fetch data from the network on the driver, and a "
                             "catalogue line may do that only with the config's consent: set "
                             f"benchmark.{ALLOW_DOWNLOAD}=true, or put the files in place and drop `download`")
    caps = entry.get("caps")
    if caps is not None:
        if not isinstance(caps, dict):
            raise ValueError(f"`caps` must be a mapping such as {{\"train\": 500, \"test\": 200}}, got {caps!r}")
        bad = set(caps) - set(CAP_KEYS)
        if bad:
            raise ValueError(f"unknown key(s) {sorted(bad)} in `caps`; valid: {', '.join(CAP_KEYS)}")
        for split in ("train", "test"):
            check_cap(f"caps.{split}", caps.get(split))
        if "seed" in caps and not is_int(caps["seed"]):
            raise ValueError(f"`caps.seed` must be a whole number, got {caps['seed']!r}")
    if entry.get("flip") is not None and not isinstance(entry["flip"], bool):
        raise ValueError(f"`flip` must be true, false or null, got {entry['flip']!r}")
    classes = entry.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes):
        raise ValueError(f"`classes` must be a non-empty list of class names or labels (leave it out to keep every "
                         f"class), got {classes!r}")
    source_kind(source)
    # the source's class names (read once per source and driver; CIFAR-100's pickles through a data-only reader):
    # an unknown class, or a source that is not there, is this line's problem
    names = class_names(source)
    if classes is not None:
        resolve_classes(classes, names)
    return entry


def _strings(value: Any, where: str) -> list[tuple[str, str]]:
    """Every string in a nested value, with where it is (``source.urls.train[0]``): a corpus's `urls` may be a
    list or a mapping, and a command hidden one level down is still a command."""
    if isinstance(value, str):
        return [(where, value)]
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _strings(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in _strings(v, f"{where}[{i}]")]
    return []


STREAM_KINDS.update(catalogue=_catalogue)
