"""A stream's ledger: one small JSON artifact on the stream's parent run (``ledger/stream_ledger.json``) listing the
stream's own FINISHED task runs as a driver collected them, each with its result key and the :class:`TaskResult`
the driver rebuilds from it. A re-launch reads it instead of paging through the stream's runs: MLflow's search has no
field projection and returns each run with all its tags, params, metrics and dataset inputs (~10 KB of JSON and
~17 ms of server CPU a run: 13.7 s for a 1000-task stream on PostgreSQL at 10,000 runs, benchmarks/RESULTS.md).

A ledger is trusted only as far as the store confirms it (:func:`prove`), with searches that return (almost) no
runs:

1. the stream's FINISHED task runs that are *not* in it (``attributes.run_id NOT IN (...)``): runs another launch
   finished, or a driver killed before its last write;
2. that every run in it is still an active, FINISHED task run of the stream: per 1000 entries one search of those
   runs (``attributes.run_id IN (...)``) ordered by run id, from offset n - 1: it answers exactly the greatest id
   when all n match (the offset rides on MLflow's page token; a server that reads the token otherwise answers
   something else, and the ledger is not trusted);
3. only when (2) falls short: which of its runs were deleted (``ViewType.DELETED_ONLY``: "delete that run to
   retrain"), then (2) again without them.

What those cannot account for (a run whose status or stream tag was changed by hand, one removed by ``mlflow gc``)
makes the ledger untrusted, and the caller scans the stream instead. A run's result key is taken from the ledger as
its driver saw it (it is never changed by the pipeline).

The artifact is data from a server: JSON only (never pickle), size-capped, its format, version, stream key and parent
run checked, every field's type checked; anything else is refused with one log line, never raised and never
trusted. And it is a cache: a write that fails costs one log line, never the stream.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Log, TrackingUnreachable
from .records import TaskResult
from .redact import redact_text
from .tracking import Tracker, filter_value

__all__ = ["Entry", "Ledger", "LedgerBook", "LedgerError", "Proof", "read", "write", "prove", "entry_from_run",
           "ARTIFACT_DIR", "ARTIFACT_NAME", "FORMAT", "VERSION", "MAX_BYTES", "MAX_ENTRIES", "WRITE_EVERY_S"]

FORMAT = "ksm-stream-ledger"
VERSION = 1
ARTIFACT_DIR = "ledger"
ARTIFACT_NAME = "stream_ledger.json"
#: a ledger larger than this is not read (a 1000-task stream's is ~0.5-1 MB)
MAX_BYTES = 64 * 2**20
#: the most entries a ledger is proven for: its NOT IN search binds one value per entry (sqlite allows 32,766 a
#: statement, PostgreSQL 65,535)
MAX_ENTRIES = 25_000
#: a driver rewrites its ledger at most this often while a fan-out runs (and once at its end)
WRITE_EVERY_S = 60.0
_CHUNK = 1000  # run ids per IN list
_RUN_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")  # MLflow's are 32 hex digits; nothing here can break a filter
_MAX_STR = 20_000


class LedgerError(ValueError):
    """A ledger that is not one this code wrote for this stream (malformed, another version, another stream)."""


@dataclass(frozen=True)
class Entry:
    """One FINISHED task run of the stream: its result key, whether it was tagged superseded, and its result as the
    driver reports a reused one (status "reused")."""

    result_key: str
    result: TaskResult
    superseded: bool = False

    @property
    def run_id(self) -> str:
        return self.result.run_id


def entry_from_run(run: Any) -> Entry:
    """The entry of a task run as MLflow returns it."""
    tags = run.data.tags
    return Entry(tags.get("ksm_result", ""), TaskResult.from_run(run, "reused"), tags.get("ksm_superseded") == "true")


# ------------------------------------------------------------------------------------------------------- format
#: TaskResult's fields in a ledger (all but its status, which is "reused" when read back) and what each may hold
_STR, _OPT_NUM, _OPT_STR, _OPT_INT = "str", "number or null", "string or null", "integer or null"
_FIELDS: dict[str, str] = {
    "task": _STR, "run_id": _STR, "classes": _STR, "test_acc": _OPT_NUM, "train_seconds": _OPT_NUM,
    "compile_seconds": _OPT_NUM, "artifact_bytes": _OPT_NUM, "mask_ones": _OPT_NUM, "mask_soft": _OPT_NUM,
    "layers": "object of numbers", "node": _OPT_STR, "device": _STR, "skipped_samples": "integer",
    "skipped_shards": _STR, "warning": _STR, "retrained": "boolean", "start_time": _OPT_INT, "sequence": _STR,
}


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def _result_json(r: TaskResult) -> dict[str, Any]:
    return {"task": r.task, "run_id": r.run_id, "classes": r.classes, "test_acc": _num(r.test_acc),
            "train_seconds": _num(r.train_seconds), "compile_seconds": _num(r.compile_seconds),
            "artifact_bytes": _num(r.artifact_bytes), "mask_ones": _num(r.mask_ones), "mask_soft": _num(r.mask_soft),
            "layers": {str(k): float(v) for k, v in r.layers.items()}, "node": r.node, "device": r.device,
            "skipped_samples": int(r.skipped_samples), "skipped_shards": r.skipped_shards, "warning": r.warning,
            "retrained": bool(r.retrained), "start_time": None if r.start_time is None else int(r.start_time),
            "sequence": r.sequence}


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_field(name: str, kind: str, v: Any) -> None:
    ok = {_STR: lambda: isinstance(v, str) and len(v) <= _MAX_STR,
          _OPT_NUM: lambda: v is None or _is_num(v),
          _OPT_STR: lambda: v is None or isinstance(v, str) and len(v) <= _MAX_STR,
          _OPT_INT: lambda: v is None or isinstance(v, int) and not isinstance(v, bool),
          "integer": lambda: isinstance(v, int) and not isinstance(v, bool),
          "boolean": lambda: isinstance(v, bool),
          "object of numbers": lambda: isinstance(v, dict) and len(v) <= 10_000 and all(
              isinstance(k, str) and len(k) <= 1000 and _is_num(x) for k, x in v.items())}[kind]()
    if not ok:
        raise LedgerError(f"field {name!r} is not a {kind}")


def _result_from_json(d: Any) -> TaskResult:
    if not isinstance(d, dict) or set(d) != set(_FIELDS):
        got = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise LedgerError(f"a result's fields are not {sorted(_FIELDS)} (got {str(got)[:200]})")
    for name, kind in _FIELDS.items():
        _check_field(name, kind, d[name])
    if not _RUN_ID.match(d["run_id"]):
        raise LedgerError(f"run id {d['run_id'][:80]!r} is not one MLflow makes")
    return TaskResult(status="reused", **{k: (dict(v) if k == "layers" else v) for k, v in d.items()})


@dataclass(frozen=True)
class Ledger:
    """The artifact: whose stream it is (key and parent run), when it was written (the writer's clock, seconds since
    the epoch: what a log line says, never what a decision rests on) and its entries."""

    stream: str
    parent_run_id: str
    written_at: float
    entries: tuple[Entry, ...]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "stream": self.stream,
                           "parent_run_id": self.parent_run_id, "written_at": self.written_at,
                           "entries": [{"result_key": e.result_key, "superseded": e.superseded,
                                        "result": _result_json(e.result)} for e in self.entries]},
                          separators=(",", ":"), allow_nan=True)

    @classmethod
    def from_json(cls, text: str | bytes, stream: str, parent_run_id: str) -> Ledger:
        """The ledger in ``text``, checked whole: its format and version, that it is this stream's (key and parent
        run), every entry's fields and types, no run twice. Anything else: :class:`LedgerError`."""
        if len(text) > MAX_BYTES:
            raise LedgerError(f"{len(text)} bytes, more than {MAX_BYTES}")
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise LedgerError(f"not JSON ({str(e)[:120]})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise LedgerError(f"not a {FORMAT} file")
        if d.get("version") != VERSION:
            raise LedgerError(f"version {json.dumps(d.get('version'))[:20]}, this code reads {VERSION}")
        if set(d) != {"format", "version", "stream", "parent_run_id", "written_at", "entries"}:
            raise LedgerError(f"unexpected keys {str(sorted(d))[:200]}")
        if d["stream"] != stream or d["parent_run_id"] != parent_run_id:
            raise LedgerError(f"it is stream {str(d['stream'])[:40]!r} (parent run {str(d['parent_run_id'])[:40]!r}), "
                              f"not {stream!r} ({parent_run_id})")
        if not _is_num(d["written_at"]) or not math.isfinite(d["written_at"]):
            raise LedgerError("written_at is not a time")
        if not isinstance(d["entries"], list) or len(d["entries"]) > MAX_ENTRIES:
            raise LedgerError(f"entries is not a list of at most {MAX_ENTRIES}")
        entries, seen = [], set()
        for i, e in enumerate(d["entries"]):
            try:
                if not isinstance(e, dict) or set(e) != {"result_key", "superseded", "result"}:
                    raise LedgerError("not an object with result_key, superseded, result")
                _check_field("result_key", _STR, e["result_key"])
                _check_field("superseded", "boolean", e["superseded"])
                r = _result_from_json(e["result"])
            except LedgerError as err:
                raise LedgerError(f"entry {i}: {err}") from None
            if r.sequence != stream:
                raise LedgerError(f"entry {i}: run {r.run_id} is stream {r.sequence[:40]!r}'s")
            if r.run_id in seen:
                raise LedgerError(f"entry {i}: run {r.run_id} twice")
            seen.add(r.run_id)
            entries.append(Entry(e["result_key"], r, e["superseded"]))
        return cls(stream, parent_run_id, float(d["written_at"]), tuple(entries))


# ------------------------------------------------------------------------------------------------- read, write
def _path() -> str:
    return f"{ARTIFACT_DIR}/{ARTIFACT_NAME}"


def read(tr: Tracker, parent_run_id: str, stream: str, log: Log = print) -> Ledger | None:
    """The stream's ledger from its parent run, checked (:meth:`Ledger.from_json`); None, with one log line, when
    there is none or it cannot be trusted. Only a tracking server that stays unreachable raises."""
    try:
        info = next((f for f in tr.client.list_artifacts(parent_run_id, ARTIFACT_DIR) if f.path == _path()), None)
        if info is None:
            log(f"[resume] no ledger on run {parent_run_id} yet: scanning the stream's runs")
            return None
        if info.file_size is not None and info.file_size > MAX_BYTES:
            raise LedgerError(f"{info.file_size} bytes, more than {MAX_BYTES}")
        with tempfile.TemporaryDirectory(prefix="ksm-ledger-") as tmp:
            path = Path(tr.download(parent_run_id, _path(), tmp))
            if path.stat().st_size > MAX_BYTES:
                raise LedgerError(f"{path.stat().st_size} bytes, more than {MAX_BYTES}")
            return Ledger.from_json(path.read_bytes(), stream, parent_run_id)
    except TrackingUnreachable:
        raise
    except Exception as e:  # noqa: BLE001  (a bad ledger, a failed download: the scan is always there)
        log(f"[resume] the ledger on run {parent_run_id} is not used ({redact_text(_one_line(e))}): scanning the "
            "stream's runs")
        return None


def write(tr: Tracker, ledger: Ledger, log: Log = print) -> bool:
    """Upload ``ledger`` to its parent run (replacing the one there). Never raises: a ledger is a cache, and a write
    that failed costs the next launch one scan (one log line says so). Fails fast: a server that cannot be reached is
    not waited for (the fan-out goes on; the next write tries again)."""
    try:
        quick = Tracker(tr.uri, tr.experiment_id, outage_s=0)
        with tempfile.TemporaryDirectory(prefix="ksm-ledger-") as tmp:
            path = Path(tmp) / ARTIFACT_NAME
            path.write_text(ledger.to_json())
            quick.artifact(ledger.parent_run_id, path, ARTIFACT_DIR)
        return True
    except Exception as e:  # noqa: BLE001
        log(f"[ledger] not written on run {ledger.parent_run_id} ({redact_text(_one_line(e))}); the next launch "
            "scans the stream's runs instead")
        return False


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# ------------------------------------------------------------------------------------------------------- prove
def _mine(stream: str) -> str:
    return f"tags.ksm_kind = 'task' and tags.ksm_sequence = {filter_value(stream)} and attributes.status = 'FINISHED'"


def _id_list(ids: Iterable[str]) -> str:
    return "(" + ",".join(f"'{i}'" for i in ids) + ")"


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[i:i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


def _all_there(tr: Tracker, stream: str, ids: list[str]) -> bool:
    """Whether every run in ``ids`` is an active FINISHED task run of ``stream``, from one search that returns at
    most one run: those runs ordered by id, from offset n - 1, must be exactly the greatest id."""
    from mlflow.utils.search_utils import SearchUtils

    ids = sorted(ids)
    token = SearchUtils.create_page_token(len(ids) - 1).decode() if len(ids) > 1 else None
    runs = tr.client.search_runs([tr.experiment_id], f"{_mine(stream)} and attributes.run_id IN {_id_list(ids)}",
                                 max_results=1, order_by=["attributes.run_id ASC"], page_token=token)
    return len(runs) == 1 and runs[0].info.run_id == ids[-1]


@dataclass(frozen=True)
class Proof:
    """What :func:`prove` found: the entries the store confirms (the ledger's, less the deleted ones, plus the
    stream's FINISHED task runs the ledger lacked) and how many of each."""

    entries: tuple[Entry, ...]
    kept: int
    new: int
    deleted: int


def prove(tr: Tracker, ledger: Ledger, log: Log = print) -> Proof | None:
    """The stream's FINISHED task runs, from ``ledger`` and what the store says changed since (see the module's
    doc): exactly the runs a scan of the stream would return. None, with one log line, when the store does not
    confirm the ledger (the caller scans). Only a tracking server that stays unreachable raises."""
    entries = {e.run_id: e for e in ledger.entries}
    if len(entries) > MAX_ENTRIES or any(not _RUN_ID.match(i) for i in entries):
        log(f"[resume] the ledger holds {len(entries)} runs (at most {MAX_ENTRIES} are checked): scanning")
        return None
    ids = sorted(entries)
    try:
        where = _mine(ledger.stream) + "".join(f" and attributes.run_id NOT IN {_id_list(c)}" for c in _chunks(ids))
        new = [entry_from_run(r) for r in tr.scan_where(where)]
        deleted: set[str] = set()
        for chunk in _chunks(ids):
            if _all_there(tr, ledger.stream, chunk):
                continue
            gone = {r.info.run_id for r in tr.scan_where(f"attributes.run_id IN {_id_list(chunk)}", deleted=True)}
            rest = [i for i in chunk if i not in gone]
            if rest and not _all_there(tr, ledger.stream, rest):
                log(f"[resume] the ledger's runs are not all FINISHED task runs of the stream any more (changed or "
                    f"removed outside the pipeline: {len(gone)} of {len(chunk)} deleted, others too): scanning")
                return None
            deleted |= gone
    except TrackingUnreachable:
        raise
    except Exception as e:  # noqa: BLE001  (a server that refuses these filters: the scan is always there)
        log(f"[resume] the ledger could not be checked ({redact_text(_one_line(e))}): scanning")
        return None
    kept = [e for i, e in entries.items() if i not in deleted]
    return Proof(tuple(kept + new), len(kept), len(new), len(deleted))


# ---------------------------------------------------------------------------------------------------- the book
class LedgerBook:
    """A driver's running copy of its stream's ledger: every FINISHED task run of the stream it knows (proven, or
    scanned, at the start; then each of the stream's own results its jobs hand back), written back to the parent
    run when it changed, at most every ``every_s`` seconds during a fan-out and once at its end."""

    def __init__(self, tr: Tracker, stream: str, parent_run_id: str, entries: Iterable[Entry], *, dirty: bool,
                 source: str, log: Log = print, every_s: float = WRITE_EVERY_S):
        self.tr, self.stream, self.parent_run_id, self.log, self.every_s = tr, stream, parent_run_id, log, every_s
        self.entries: dict[str, Entry] = {e.run_id: e for e in entries}
        self.source = source       # "ledger" (proven) or "scan"
        self.dirty = dirty          # what the parent run holds is not this
        self._written = time.monotonic()

    def first_by_result(self) -> dict[str, Entry]:
        """result key -> the stream's run that a scan of the stream would take for it: the newest (MLflow's default
        order: start time descending, then run id)."""
        out: dict[str, Entry] = {}
        for e in sorted(self.entries.values(), key=lambda e: (-(e.result.start_time or 0), e.run_id)):
            out.setdefault(e.result_key, e)
        return out

    def add(self, result: TaskResult, result_key: str) -> None:
        """A result a job handed back: kept when its run is this stream's own (a result another stream's run holds
        is looked up again on each launch)."""
        if result.sequence != self.stream or not _RUN_ID.match(result.run_id) or result.run_id in self.entries:
            return
        self.entries[result.run_id] = Entry(result_key, dataclasses.replace(result, status="reused"))
        self.dirty = True

    def mark_superseded(self, run_id: str) -> None:
        e = self.entries.get(run_id)
        if e is not None and not e.superseded:
            self.entries[run_id] = dataclasses.replace(e, superseded=True)
            self.dirty = True

    def ledger(self) -> Ledger:
        return Ledger(self.stream, self.parent_run_id, time.time(), tuple(self.entries.values()))

    def write(self, *, force: bool = False) -> None:
        """Write the ledger when it changed (``force``: even if written less than ``every_s`` seconds ago)."""
        if not self.dirty or not force and time.monotonic() - self._written < self.every_s:
            return
        if write(self.tr, self.ledger(), self.log):
            self.dirty = False
        self._written = time.monotonic()  # a failed write is not retried at once either

