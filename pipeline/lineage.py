"""A stream's record in MLflow: the set-up every mode starts with (inputs checked, the experiment), the stream's
parent run (opened, or reopened by its key; refused when its initial task changed), the FINISHED runs that hold
its tasks' results, and the tag that marks a task run superseded. The keys themselves are :mod:`.identity`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import RunConfig
from .data import Manifest, ensure_shards, in_process
from .errors import Log, PipelineError
from .identity import backbone_key, result_key, sequence_key
from .params import method_params
from .probes import check_tracking_uri
from .redact import redact_text
from .tracking import Tracker

__all__ = ["Prepared", "check_inputs", "prepare", "open_stream_run", "trained_sequence", "trained_runs",
           "supersede"]


@dataclass(frozen=True)
class Prepared:
    """Everything the fan-out needs, made once by the driver."""

    rc: RunConfig
    manifest: Manifest
    tracker: Tracker


def check_inputs(rc: RunConfig, log: Log = print, map_tasks: Any = None) -> Manifest:
    """Checks that need the outside world, cheapest first: the tracking server answers (seconds), the shards
    exist (the missing tasks written through ``map_tasks``: in this process by default)."""
    check_tracking_uri(rc.tracking.uri)
    return ensure_shards(rc.benchmark, rc.paths.shards, log=log, map_tasks=map_tasks or in_process)


def prepare(rc: RunConfig, log: Log = print, manifest: Manifest | None = None) -> Prepared:
    """``check_inputs`` (unless its manifest is given), then the MLflow experiment."""
    manifest = manifest or check_inputs(rc, log)
    tracker = Tracker.setup(rc.tracking.uri, rc.tracking.experiment, rc.tracking.artifact_root,
                            rc.tracking.outage_s)
    return Prepared(rc, manifest, tracker)


def trained_sequence(tr: Tracker, rc: RunConfig, m: Manifest, mode: str) -> tuple[Any, Any, dict[str, Any]]:
    """The sequence this config names (same run name and spec) as ``mode=evaluate`` / ``mode=export`` read it:
    its parent run, its backbone run, and each task's FINISHED run (task -> run; tasks not trained yet are absent).
    No such sequence: a PipelineError saying to run it first."""
    parent = tr.find_one(None, ksm_kind="sequence", ksm_sequence=sequence_key(rc, backbone_key(rc, m)))
    if parent is None or not parent.data.tags.get("ksm_backbone_run"):
        raise PipelineError(f"no trained sequence matches this config (run_name={rc.run_name!r}, benchmark "
                            f"{rc.benchmark['name']}, method {rc.method.name}) in {redact_text(rc.tracking.uri)}; "
                            f"run the same command without mode={mode} first")
    bb_run = tr.client.get_run(parent.data.tags["ksm_backbone_run"])
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
    trained on ``backbone_fingerprint`` (a result key includes it). Without either: every FINISHED task run."""
    if len(wanted) <= 20:
        found = {t: tr.find_one("FINISHED", ksm_kind="task", ksm_result=k) for t, k in wanted.items()}
        return {t: r for t, r in found.items() if r is not None}
    by_key: dict[str, list[str]] = {}
    for t, k in wanted.items():
        by_key.setdefault(k, []).append(t)
    out: dict[str, Any] = {}

    def take(runs: Any) -> None:
        for r in runs:  # newest first is not needed: one FINISHED run per result
            for t in by_key.get(r.data.tags.get("ksm_result", ""), []):
                out.setdefault(t, r)

    if stream:
        take(tr.scan("FINISHED", ksm_kind="task", ksm_sequence=stream))
    missing = {t: k for t, k in wanted.items() if t not in out}
    if stream and 0 < len(missing) <= 20:
        out.update(trained_runs(tr, missing))
    elif missing:
        take(tr.scan("FINISHED", params={"backbone_fingerprint": backbone_fingerprint} if backbone_fingerprint
                     else None, ksm_kind="task"))
    return out


def supersede(tr: Tracker, key: str, wanted: dict[str, str]) -> None:
    """Tag this stream's FINISHED task runs whose task has since changed (same name, other result key) as
    superseded: they stay in MLflow, but no report or evaluation takes them for the task's current result."""
    for r in tr.scan("FINISHED", ksm_kind="task", ksm_sequence=key):
        name = r.data.tags.get("ksm_task")
        if name in wanted and r.data.tags.get("ksm_result") != wanted[name] and r.data.tags.get("ksm_superseded") != "true":
            tr.tags(r.info.run_id, {"ksm_superseded": "true", "ksm_superseded_by_result": wanted[name]})


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
