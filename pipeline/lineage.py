"""A stream's record in MLflow: the set-up every mode starts with (inputs checked, the experiment), the stream's
parent run (opened, or reopened by its key; refused when its initial task changed), the FINISHED runs that hold
its tasks' results (for a long stream, from its ledger when the store confirms it: :mod:`.ledger`), and the tag
that marks a task run superseded. The keys themselves are :mod:`.identity`'s. For a sequential method's stream
(PackNet, CPG: a chain), its links' keys and the FINISHED run of each link on the chain the one before it left
(:func:`chain_links`), what training, ``mode=evaluate`` and ``mode=export`` all read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ksm_core.cpg import CHAINS
from ksm_core.packnet import PackNet

from .claims import look_keys
from .config import RunConfig, stable_hash
from .data import Manifest, ensure_shards, in_process
from .errors import Log, PipelineError
from .identity import backbone_key, result_key, sequence_key
from .ledger import LedgerBook, entry_from_run, prove, read
from .params import method_params
from .probes import check_tracking_uri
from .records import TaskResult
from .redact import redact_text
from .tracking import Tracker, filter_value

__all__ = ["DriverInputs", "check_inputs", "open_inputs", "open_stream_run", "trained_stream", "trained_sequence",
           "trained_runs", "trained_results", "stream_book", "supersede", "ONE_BY_ONE", "CHAIN_ARTIFACT", "chain_class",
           "chain_tasks", "chain_keys", "Link", "chain_links", "trained_chain"]

#: up to this many result keys are looked up one by one (any stream's newest FINISHED run), with no scan or ledger
ONE_BY_ONE = 20


@dataclass(frozen=True)
class DriverInputs:
    """What every driver starts from, made once: the run's config, the stream's manifest (its shards checked) and the
    MLflow experiment's :class:`Tracker`."""

    rc: RunConfig
    manifest: Manifest
    tracker: Tracker


def check_inputs(rc: RunConfig, log: Log = print, map_tasks: Any = None) -> Manifest:
    """Checks that need the outside world, cheapest first: the tracking server answers (seconds), the shards
    exist (the missing tasks written through ``map_tasks``: in this process by default)."""
    check_tracking_uri(rc.tracking.uri)
    return ensure_shards(rc.benchmark, rc.paths.shards, log=log, map_tasks=map_tasks or in_process)


def open_inputs(rc: RunConfig, log: Log = print, manifest: Manifest | None = None) -> DriverInputs:
    """``check_inputs`` (unless its manifest is given), then the MLflow experiment."""
    manifest = manifest or check_inputs(rc, log)
    tracker = Tracker.setup(rc.tracking.uri, rc.tracking.experiment, rc.tracking.artifact_root,
                            rc.tracking.outage_s)
    return DriverInputs(rc, manifest, tracker)


def trained_stream(tr: Tracker, rc: RunConfig, m: Manifest, mode: str) -> tuple[Any, Any]:
    """The stream this config names (same run name and spec) as a mode that reads it finds it: its parent run and
    its backbone run. No such stream: a PipelineError saying to run it first (without ``mode``)."""
    parent = tr.find_one(None, ksm_kind="sequence", ksm_sequence=sequence_key(rc, backbone_key(rc, m)))
    if parent is None or not parent.data.tags.get("ksm_backbone_run"):
        raise PipelineError(f"no trained sequence matches this config (run_name={rc.run_name!r}, benchmark "
                            f"{rc.benchmark['name']}, method {rc.method.name}) in {redact_text(rc.tracking.uri)}; "
                            f"run the same command without mode={mode} first")
    return parent, tr.client.get_run(parent.data.tags["ksm_backbone_run"])


def trained_sequence(tr: Tracker, rc: RunConfig, m: Manifest, mode: str) -> tuple[Any, Any, dict[str, Any]]:
    """:func:`trained_stream`, and each task's FINISHED run (task -> run; tasks not trained yet are absent), as
    ``mode=evaluate`` / ``mode=export`` read a mask method's sequence."""
    parent, bb_run = trained_stream(tr, rc, m, mode)
    fp = bb_run.data.tags.get("ksm_fingerprint", "")
    return parent, bb_run, trained_runs(tr, {t: result_key(rc, fp, m.task(t).identity) for t in m.new_tasks},
                                        stream=parent.data.tags.get("ksm_sequence"), backbone_fingerprint=fp)


def _check_same_initial_task(tr: Tracker, rc: RunConfig, manifest: Manifest) -> None:
    """A stream whose initial task changed needs a new backbone, and so retrains every task: say so instead of
    quietly starting over under the same name."""
    init = manifest.task(manifest.initial_task)
    for r in tr.find(None, ksm_kind="sequence", ksm_run_name=rc.run_name):
        before = r.data.tags.get("ksm_initial_task_id")
        if before and before != init.identity:
            raise PipelineError(
                f"the initial task of stream {rc.run_name!r} changed ({r.data.tags.get('ksm_initial_task', '?')} "
                f"{before} -> {init.name} {init.identity}; e.g. the first catalogue line was edited): that changes "
                f"the backbone, so every task would train again. Restore it, or start a new stream with "
                f"run_name=<a new name> (run {r.info.run_id} keeps the old one)")


def open_stream_run(tr: Tracker, rc: RunConfig, m: Manifest, log: Log = print) -> tuple[str, str]:
    """The stream's parent run (key, run id): the one with this sequence key, reopened, else a new one (refused
    when the stream's initial task changed under the same run name)."""
    key = sequence_key(rc, backbone_key(rc, m))
    parent = tr.find_one(None, ksm_kind="sequence", ksm_sequence=key)
    if parent is not None:
        tr.reopen(parent.info.run_id)
        log(f"[sequence] resuming run {parent.info.run_id} ({rc.run_name})")
        return key, parent.info.run_id
    _check_same_initial_task(tr, rc, m)
    init = m.task(m.initial_task)
    parent_id = tr.start(rc.run_name, {"ksm_kind": "sequence", "ksm_sequence": key, "ksm_run_name": rc.run_name,
                                       "ksm_initial_task": init.name, "ksm_initial_task_id": init.identity})
    tr.params(parent_id, _flat_params(rc))
    return key, parent_id


def trained_runs(tr: Tracker, wanted: dict[str, str], *, stream: str | None = None,
                 backbone_fingerprint: str | None = None) -> dict[str, Any]:
    """task -> its FINISHED run with the wanted result key (from any stream), for the tasks that have one.

    A few keys are looked up one by one. Many (a long stream) come from paged scans that grow with the stream, not
    with the experiment (an experiment of 21 streams x 1000 tasks holds 21,000 task runs): first the ``stream``'s
    own FINISHED task runs (its key, ``ksm_sequence``), which is every result when a stream resumes; the keys still
    missing (results another stream trained on the same backbone), one by one when few, else the FINISHED task runs
    trained on ``backbone_fingerprint`` (a result key includes it). Without either: every FINISHED task run.
    :func:`trained_results` answers the same from the stream's ledger."""
    if len(wanted) <= ONE_BY_ONE:
        found = {t: tr.find_one("FINISHED", **look_keys({"ksm_kind": "task", "ksm_result": k}))
                 for t, k in wanted.items()}
        return {t: r for t, r in found.items() if r is not None}
    out: dict[str, Any] = {}
    if stream:
        _take(out, wanted, tr.scan("FINISHED", ksm_kind="task", ksm_sequence=stream))
    missing = {t: k for t, k in wanted.items() if t not in out}
    out.update(_other_streams(tr, missing, stream, backbone_fingerprint))
    return out


def _take(out: dict[str, Any], wanted: dict[str, str], runs: Any) -> None:
    """Each run, in the order given, to the tasks that want its result key and have none yet (the first wins)."""
    by_key: dict[str, list[str]] = {}
    for t, k in wanted.items():
        by_key.setdefault(k, []).append(t)
    for r in runs:
        for t in by_key.get(r.data.tags.get("ksm_result", ""), []):
            out.setdefault(t, r)


def _other_streams(tr: Tracker, missing: dict[str, str], stream: str | None,
                   backbone_fingerprint: str | None) -> dict[str, Any]:
    """The ``missing`` keys (not in ``stream``'s own runs) from the other streams: none when no other stream has a
    FINISHED task run on this backbone (one search that returns at most one run: a result key includes the backbone's
    fingerprint, and a task job logs it as a param); else one by one when few, else the other streams' FINISHED task
    runs trained on the backbone (every FINISHED task run without its fingerprint)."""
    out: dict[str, Any] = {}
    if not missing:
        return out
    clauses = ["attributes.status = 'FINISHED'", "tags.ksm_kind = 'task'"]
    if backbone_fingerprint:
        clauses.append(f"params.backbone_fingerprint = {filter_value(backbone_fingerprint)}")
    if stream:  # its own runs were taken already
        clauses.append(f"tags.ksm_sequence != {filter_value(stream)}")
    where = " and ".join(clauses)
    if stream and backbone_fingerprint and not tr.client.search_runs([tr.experiment_id], where, max_results=1):
        return out
    if stream and len(missing) <= ONE_BY_ONE:
        out.update(trained_runs(tr, missing))
    else:
        _take(out, missing, tr.scan_where(where))
    return out


def stream_book(tr: Tracker, stream: str, parent_run_id: str, n_wanted: int, log: Log = print,
                book: LedgerBook | None = None) -> LedgerBook | None:
    """Every FINISHED task run of a long stream (more than :data:`ONE_BY_ONE` results wanted; None for a short one,
    whose results are looked up one by one), as the driver's :class:`~.ledger.LedgerBook`: its ledger (``book``'s
    entries when given: a driver that stays up), once the store confirms it (:func:`.ledger.prove`: a download and
    three searches that return only what changed), else a scan of the stream's runs, which the driver's next write
    makes its ledger."""
    if n_wanted <= ONE_BY_ONE:
        return None
    led = book.ledger() if book is not None else read(tr, parent_run_id, stream, log)
    proof = prove(tr, led, log) if led is not None else None
    if proof is not None:
        log(f"[resume] ledger: {proof.kept} FINISHED task run(s) confirmed, {proof.new} finished since, "
            f"{proof.deleted} deleted")
        return LedgerBook(tr, stream, parent_run_id, proof.entries, source="ledger", log=log,
                          dirty=bool(proof.new or proof.deleted) or book is not None and book.dirty)
    entries = [entry_from_run(r) for r in tr.scan("FINISHED", ksm_kind="task", ksm_sequence=stream)]
    return LedgerBook(tr, stream, parent_run_id, entries, dirty=True, source="scan", log=log)


def trained_results(tr: Tracker, wanted: dict[str, str], *, book: LedgerBook | None, stream: str | None = None,
                    backbone_fingerprint: str | None = None) -> dict[str, TaskResult]:
    """:func:`trained_runs` as the driver's results (status "reused"), the stream's own runs from ``book``
    (:func:`stream_book`) when there is one: the same runs, the same results, without reading each run."""
    if book is None or len(wanted) <= ONE_BY_ONE:
        return {t: TaskResult.from_run(r, "reused") for t, r in trained_runs(
            tr, wanted, stream=stream, backbone_fingerprint=backbone_fingerprint).items()}
    mine = book.first_by_result()
    out = {t: mine[k].result for t, k in wanted.items() if k in mine}
    missing = {t: k for t, k in wanted.items() if t not in out}
    out.update({t: TaskResult.from_run(r, "reused")
                for t, r in _other_streams(tr, missing, book.stream, backbone_fingerprint).items()})
    return out


def supersede(tr: Tracker, key: str, wanted: dict[str, str], book: LedgerBook | None = None) -> None:
    """Tag this stream's FINISHED task runs whose task has since changed (same name, other result key) as
    superseded: they stay in MLflow, but no report or evaluation takes them for the task's current result. The
    runs are ``book``'s (:func:`stream_book`: every FINISHED task run of the stream) when given, else scanned."""
    entries = list(book.entries.values()) if book is not None else (
        entry_from_run(r) for r in tr.scan("FINISHED", ksm_kind="task", ksm_sequence=key))
    for e in entries:
        name = e.result.task
        if name in wanted and e.result_key != wanted[name] and not e.superseded:
            tr.tags(e.run_id, {"ksm_superseded": "true", "ksm_superseded_by_result": wanted[name]})
            if book is not None:
                book.mark_superseded(e.run_id)


def _flat_params(rc: RunConfig) -> dict[str, Any]:
    """The sequence run's params: every model/train/cluster setting, and of the method only what it uses (as the
    task runs log it: no T or k for Piggyback, no tau for fine-tune)."""
    used = method_params(rc.method, rc.train)
    out: dict[str, Any] = {"run_name": rc.run_name, "seed": rc.seed, "benchmark": rc.benchmark["name"],
                           "method.name": rc.method.name,
                           **{f"method.{k}": used[k] for k in ("tau", "k", "T", "init") if k in used}}
    for sec in ("model", "train", "cluster"):
        for k, v in rc.section(sec).items():
            if isinstance(v, dict):
                out.update({f"{sec}.{k}.{k2}": v2 for k2, v2 in v.items()})
            else:
                out[f"{sec}.{k}"] = v
    return out


# ------------------------------------------------------------------------------- a sequential method's chain
#: where a link's run keeps the chain after it
CHAIN_ARTIFACT = "chain/chain.safetensors"


def chain_class(method: str) -> type[PackNet]:
    return CHAINS[method]


def chain_tasks(m: Manifest) -> list[str]:
    """The chain's links in order: the initial task (the backbone's prune), then every new task."""
    return [m.initial_task, *m.new_tasks]


def chain_keys(rc: RunConfig, fingerprint: str, m: Manifest) -> dict[str, str]:
    """Each link's result key: the task's own (``identity.result_key``) hashed with the previous link's key, so a
    changed task changes its key and every later one."""
    out: dict[str, str] = {}
    prev = ""
    for t in chain_tasks(m):
        prev = stable_hash({"chain_parent": prev, "link": result_key(rc, fingerprint, m.task(t).identity)})
        out[t] = prev
    return out


@dataclass(frozen=True)
class Link:
    """One link of the chain as the store holds it: its task, result key, and its FINISHED run when it has one
    trained on the chain the link before it left (``run`` None: this link and every later one must train)."""

    task: str
    key: str
    run: Any | None = None

    @property
    def fingerprint(self) -> str:
        return self.run.data.tags.get("ksm_chain_fingerprint", "") if self.run is not None else ""


def chain_links(tr: Tracker, rc: RunConfig, m: Manifest, fingerprint: str, stream: str,
                stream_runs: list[Any] | None = None) -> list[Link]:
    """Every link of this config's chain, in order, with its reusable FINISHED run while the prefix has one (the
    stream's own runs first, then one search per link for a run another stream trained on the same chain); from
    the first link without one, no run. ``stream_runs``: the stream's FINISHED task runs when already read."""
    keys = chain_keys(rc, fingerprint, m)
    if stream_runs is None:
        stream_runs = list(tr.scan("FINISHED", ksm_kind="task", ksm_sequence=stream))
    mine = {}
    for r in stream_runs:  # newest first is not needed: one run per (result, parent chain) unless raced
        tags = r.data.tags
        if tags.get("ksm_superseded") != "true":
            mine.setdefault((tags.get("ksm_result"), tags.get("ksm_chain_parent")), r)
    out: list[Link] = []
    parent = fingerprint  # link 0 is trained on the backbone itself
    for t in chain_tasks(m):
        run = None
        if parent:
            run = mine.get((keys[t], parent)) or tr.find_one("FINISHED", **look_keys(
                {"ksm_kind": "task", "ksm_result": keys[t], "ksm_chain_parent": parent}))
        out.append(Link(t, keys[t], run))
        parent = out[-1].fingerprint  # "" once a link has no run: every later one trains
    return out


def trained_chain(tr: Tracker, rc: RunConfig, m: Manifest, mode: str) -> tuple[Any, Any, list[Link]]:
    """:func:`trained_stream`, and its chain's links (:func:`chain_links`), as ``mode=evaluate`` / ``mode=export``
    read a sequential method's stream. No link trained yet: a PipelineError saying to run it first."""
    parent, bb_run = trained_stream(tr, rc, m, mode)
    links = chain_links(tr, rc, m, bb_run.data.tags.get("ksm_fingerprint", ""), parent.data.tags["ksm_sequence"])
    if links[0].run is None:
        raise PipelineError(f"the chain of {rc.run_name!r} has no trained link yet; run the same command without "
                            f"mode={mode} first")
    return parent, bb_run, links
