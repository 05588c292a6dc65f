"""The driver: shards -> backbone (trained once, put once in Ray's object store) -> one Ray job per new task ->
report. Re-running the same sequence trains only the tasks without a FINISHED run.
"""
from __future__ import annotations

import functools
import os
import resource
import signal
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ksm_core import fingerprint

from .backbone_dp import train_backbone_dp
from .claims import Heartbeat, acquire
from .config import RunConfig, stable_hash
from .data import Manifest, ensure_shards, in_process, task_specs
from .data.manifest import is_local
from .errors import PipelineError, Stopped
from .export import export_after_sequence
from .jobs import JobContext, backbone_job, result_from_run, task_job, warm_worker
from .params import method_params
from .probes import check_tracking_uri
from .redact import redact_text
from .report import write_report
from .runtime import (Log, StopSignals, check_fits, check_fits_before_ray, in_flight_limit, ray_map, ray_session,
                      remote, warm_workers)
from .tracking import Tracker

__all__ = ["run_sequence", "run_shards", "check_inputs", "prepare", "Prepared", "backbone_stage", "backbone_key",
           "sequence_key", "result_key", "trained_runs", "fan_out", "Job", "job_resources", "check_cluster",
           "shard_writers", "shards_before_ray", "JobPool", "open_stream_run", "supersede", "trained_sequence"]


def run_shards(rc: RunConfig, log: Log = print) -> Manifest:
    """mode=shards: write (or verify and reuse) the benchmark's shards and print where they are. With a cluster
    address the tasks are written as Ray jobs, by the cluster's nodes, to the shared path."""
    if rc.cluster.address:
        task_specs(rc.benchmark)  # a config problem stops here, before connecting
        with ray_session(rc.cluster, log):
            m = ensure_shards(rc.benchmark, rc.paths.shards, log=log, verify="sha256", map_tasks=shard_writers(rc))
    else:
        m = ensure_shards(rc.benchmark, rc.paths.shards, log=log, verify="sha256")
    names = m.new_tasks if len(m.new_tasks) <= 20 else [*m.new_tasks[:10], "...", *m.new_tasks[-3:]]
    log(f"[shards] {m.path}: initial task {m.initial_task}, {len(m.new_tasks)} new tasks: {', '.join(names)}")
    return m


def shards_before_ray(rc: RunConfig, log: Log = print) -> tuple[Manifest | None, int]:
    """What can fail in seconds, before Ray starts: the tracking server answers, the config's tasks plan (a bad
    catalogue line, an unknown class), and published shards (a URL) are there. Returns their manifest (None for
    a local shard folder, whose missing tasks the Ray jobs then write: :func:`shard_writers`) and the number of
    tasks in the stream."""
    check_tracking_uri(rc.tracking.uri)
    if not is_local(rc.paths.shards):
        m = ensure_shards(rc.benchmark, rc.paths.shards, log=log)
        return m, len(m.tasks)
    return None, len(task_specs(rc.benchmark))


def shard_writers(rc: RunConfig) -> Any:
    """``map_tasks`` for ensure_shards that writes each missing task as a Ray job (one CPU each): the nodes of a
    cluster write to the shared path in parallel, and no process holds more than a source and one task."""
    return functools.partial(ray_map, cpus=1.0, max_retries=rc.cluster.max_retries)


class Prepared:
    """Everything the fan-out needs, made once by the driver."""

    def __init__(self, rc: RunConfig, manifest: Manifest, tracker: Tracker):
        self.rc, self.manifest, self.tracker = rc, manifest, tracker


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


def job_resources(rc: RunConfig) -> tuple[tuple[str, float], tuple[str, float]]:
    """A task job's (key, amount) of CPUs and GPUs, as runtime.check_fits takes them."""
    return ("cluster.cpus_per_task", rc.cluster.cpus_per_task), ("cluster.gpus_per_task", rc.cluster.gpus_per_task)


def check_cluster(rc: RunConfig) -> None:
    """A task job fits the connected Ray cluster."""
    import ray

    res = ray.cluster_resources()
    check_fits(*job_resources(rc), res.get("CPU", 0), res.get("GPU", 0), f"the Ray cluster (resources: {res})")


def _remote(fn: Any, rc: RunConfig) -> Any:
    cl = rc.cluster
    return remote(fn, cl.cpus_per_task, cl.gpus_per_task, cl.max_retries)


def backbone_key(rc: RunConfig, manifest: Manifest) -> str:
    """What makes two backbones the same: the model, where its weights come from (its training config or a weights
    file), the initial task's content identity and the seed. Nothing about the other tasks: appending a task to a
    stream keeps its backbone."""
    init = manifest.task(manifest.initial_task)
    wp = rc.model.weights_path
    src = {"file": wp, "size": os.path.getsize(wp), "mtime": int(os.path.getmtime(wp))} if wp else \
        rc.train_identity()["backbone"]
    return stable_hash({"model": {k: v for k, v in rc.section("model").items() if k != "weights_path"}, "source": src,
                        "task": init.identity, "seed": rc.seed})


def result_key(rc: RunConfig, fingerprint: str, task_identity: str) -> str:
    """What makes two trained tasks the same result, whichever stream or launch made it: the backbone's weights,
    the task's content, the method, the training config, the data options and the seed."""
    return stable_hash({"backbone": fingerprint, "task": task_identity, "method": rc.section("method"),
                        "train": rc.train_identity(), "data_opts": rc.section("data"), "seed": rc.seed})


def backbone_stage(p: Prepared, log: Log = print) -> tuple[dict[str, np.ndarray], str, str]:
    """The backbone's numpy state, fingerprint and MLflow run id: reused from a FINISHED backbone run with the
    same spec, else trained (as a Ray job, so on a cluster it gets a worker's GPU) and logged."""
    import ray
    from safetensors.numpy import load_file, save_file

    rc, tr = p.rc, p.tracker
    key = backbone_key(rc, p.manifest)
    init = p.manifest.initial_task
    # another launch may be training this very backbone: wait for its run instead of training it twice
    claim = acquire(tr, {"ksm_kind": "backbone", "ksm_backbone": key}, f"backbone-{init}", {"ksm_task": init},
                    stale_s=rc.cluster.claim_timeout_s, look_first=True, log=log)
    run_id, found = claim.run_id, claim.done
    if found is not None:
        with tempfile.TemporaryDirectory(prefix="ksm-bb-") as tmp:
            path = tr.download(found.info.run_id, "backbone/backbone.safetensors", tmp)
            state = load_file(path)
        fp = fingerprint(state)
        if fp != found.data.tags.get("ksm_fingerprint"):
            raise PipelineError(f"backbone run {found.info.run_id}: its weights' fingerprint {fp[:12]} differs from "
                                f"the logged {found.data.tags.get('ksm_fingerprint', '?')[:12]}; delete that run to retrain")
        log(f"[backbone] reusing run {found.info.run_id} (fingerprint {fp[:12]})")
        return state, fp, found.info.run_id

    assert run_id is not None
    with Heartbeat(tr, run_id, rc.cluster.claim_timeout_s / 6):  # the claim stays alive while it works
        try:
            what = f"loading {rc.model.weights_path}" if rc.model.weights_path else \
                f"training on {init} for {rc.train.backbone.epochs} epochs"
            log(f"[backbone] {what}")
            if rc.train.backbone.workers > 1 and not rc.model.weights_path:
                log(f"[backbone] data-parallel over {rc.train.backbone.workers} Ray Train workers")
                out = train_backbone_dp(rc, str(p.manifest.path))
            else:
                out = ray.get(_remote(backbone_job, rc).remote(rc, str(p.manifest.path)))
            state = out["state"]
            fp = fingerprint(state)
            fit = out["fit"]
            for rec in fit["history"]:
                tr.metrics(run_id, {k: v for k, v in rec.items() if k != "epoch"}, step=int(rec["epoch"]))
            tr.metrics(run_id, {"test_acc": fit["test_acc"], "train_seconds": fit["train_seconds"]},
                       step=len(fit["history"]))
            tr.params(run_id, {"model": rc.model.name, "model_width": rc.model.width,
                               "weights_path": rc.model.weights_path, "task": init,
                               "classes": ", ".join(out["classes"]), "epochs": rc.train.backbone.epochs,
                               "lr": rc.train.backbone.lr, "seed": rc.seed, "fingerprint": fp,
                               "workers": rc.train.backbone.workers})
            tr.tags(run_id, {"ksm_fingerprint": fp,
                             **{k: out[k] for k in ("ksm_host", "ksm_node_id", "ksm_node_ip") if k in out}})
            with tempfile.TemporaryDirectory(prefix="ksm-bb-") as tmp:
                path = Path(tmp) / "backbone.safetensors"
                save_file(state, str(path), metadata={"fingerprint": fp, "model": rc.model.name})
                tr.artifact(run_id, path, "backbone")
            tr.finish(run_id)
        except BaseException:
            tr.finish(run_id, "FAILED")
            raise
    log(f"[backbone] test accuracy on {init}: {fit['test_acc']:.3f} (fingerprint {fp[:12]})")
    return state, fp, run_id


def sequence_key(rc: RunConfig, bb_key: str) -> str:
    """What makes two runs the same stream run (one parent run in MLflow): its name, backbone, model, method,
    training and seed; not its task list, which may grow."""
    return stable_hash({"name": rc.run_name, "backbone": bb_key, "model": rc.section("model"),
                        "method": rc.section("method"), "train": rc.train_identity(), "seed": rc.seed,
                        "data_opts": rc.section("data")})


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
    return parent, bb_run, trained_runs(tr, {t: result_key(rc, fp, m.task(t).identity) for t in m.new_tasks})


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


def run_sequence(rc: RunConfig, log: Log = print) -> dict[str, Any]:
    """mode=sequence: the whole task sequence; returns {"parent_run_id", "results": [per-task dicts], ...}."""
    check_fits_before_ray(rc.cluster, *job_resources(rc))
    published, n_tasks = shards_before_ray(rc, log)
    with ray_session(rc.cluster, log):
        check_cluster(rc)
        # a fresh worker spends ~3 s importing torch, MLflow and torch._dynamo before its first job: start that
        # now, so it overlaps the shard writes, the MLflow set-up, the run lookups and the backbone stage
        warm_workers(warm_worker, rc.cluster, n_tasks - 1)
        m = published or ensure_shards(rc.benchmark, rc.paths.shards, log=log, map_tasks=shard_writers(rc))
        p = prepare(rc, log, manifest=m)
        tr = p.tracker
        key, parent_id = open_stream_run(tr, rc, m, log)
        try:
            state, fp, bb_run = backbone_stage(p, log)
            tr.tags(parent_id, {"ksm_backbone_run": bb_run, "ksm_fingerprint": fp})
            wanted = {t: result_key(rc, fp, m.task(t).identity) for t in m.new_tasks}
            supersede(tr, key, wanted)
            ctx = JobContext(manifest=str(m.path), experiment_id=tr.experiment_id, parent_run_id=parent_id,
                             sequence_key=key, backbone_fingerprint=fp, backbone_run_id=bb_run)
            results, failures, wall = fan_out([Job(t, t, rc, wanted[t]) for t in m.new_tasks], ctx, state, tr,
                                              rc.progress, log)
            ordered = [results[t] for t in m.new_tasks if t in results]
            report = write_report(tr, parent_id, ordered, rc, log=log, wall_seconds=wall, failures=failures)
            export_after_sequence(rc, tr, m, parent_id, bb_run, ordered, log)  # every FINISHED task, one model
            # what the driver itself cost, all of it: it must not grow with the stream beyond small per-task records
            tr.metrics(parent_id, {"driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                   "fanout_wall_seconds": wall, "tasks_trained": sum(
                                       r["status"] == "trained" for r in ordered)})
            if failures:
                tr.finish(parent_id, "FAILED")
                lines = "\n".join(f"  {t}: {msg.splitlines()[0][:300]}" for t, msg in failures.items())
                raise PipelineError(f"{len(failures)} task(s) failed (the others are saved; re-run the same "
                                    f"command to retry only these):\n{lines}")
            tr.finish(parent_id, "FINISHED")
        except Stopped:
            tr.finish(parent_id, "KILLED")
            raise
        except BaseException:
            st = tr.client.get_run(parent_id).info.status
            if st == "RUNNING":
                tr.finish(parent_id, "FAILED")
            raise
    return {"parent_run_id": parent_id, "results": ordered, "backbone_run_id": bb_run, "fingerprint": fp,
            "sequence_key": key, "report": report, "experiment_id": tr.experiment_id}


@dataclass(frozen=True)
class Job:
    """One task job of a fan-out: its label for the driver (the task, or method/seed/task), the task, the config
    it trains with, and its result key."""

    label: str
    task: str
    rc: RunConfig
    result: str


class JobPool:
    """The task jobs a driver has handed to Ray: at most ``limit`` at once (the rest wait in the driver as small
    Job records, so a 1000-task stream is not submitted in one go), collected as they finish, and stopped on a
    signal without leaving a run RUNNING."""

    def __init__(self, ctx: JobContext, state_ref: Any, tr: Tracker, limit: int):
        self.ctx, self.state_ref, self.tr, self.limit = ctx, state_ref, tr, limit
        self.running: dict[Any, Job] = {}

    def __len__(self) -> int:
        return len(self.running)

    def has_room(self) -> bool:
        return len(self.running) < self.limit

    def submit(self, job: Job) -> None:
        self.running[_remote(task_job, job.rc).remote(job.rc, self.ctx, job.task, job.result, self.state_ref)] = job

    def collect(self, timeout: float) -> list[tuple[Job, dict[str, Any] | None, str | None]]:
        """The jobs that finished within ``timeout`` seconds: (job, result, None) or (job, None, what failed)."""
        import ray

        if not self.running:
            return []
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
        if ready:  # and whatever else is done by now
            ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
        out: list[tuple[Job, dict[str, Any] | None, str | None]] = []
        for ref in ready:
            job = self.running.pop(ref)
            try:
                out.append((job, ray.get(ref), None))
            except Exception as e:  # keep going: the other tasks' work is not lost
                out.append((job, None, _cause(e)))
        return out

    def stop(self, grace_s: float, log: Log) -> tuple[list[tuple[Job, dict[str, Any] | None, str | None]], list[Job]]:
        """Let in-flight jobs finish for ``grace_s`` seconds, then kill the rest and close their runs KILLED.
        Returns what finished meanwhile and the jobs killed."""
        import ray

        finished = []
        deadline = time.monotonic() + grace_s
        if self.running and grace_s > 0:
            log(f"[stop] waiting up to {grace_s:.0f}s for {len(self.running)} in-flight job(s)")
        while self.running and time.monotonic() < deadline:
            finished += self.collect(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
        killed = list(self.running.values())
        refs = list(self.running)
        self.running.clear()
        for ref in refs:
            ray.cancel(ref, force=True)
        if refs:  # the workers are gone once their refs resolve (as cancelled)
            ray.wait(refs, num_returns=len(refs), timeout=30)
            self._close_killed({j.result for j in killed}, log)
        return finished, killed

    def _close_killed(self, results: set[str], log: Log) -> None:
        """A killed worker cannot close its own run: close this stream's RUNNING runs of those results KILLED."""
        for r in self.tr.find("RUNNING", ksm_kind="task", ksm_sequence=self.ctx.sequence_key):
            if r.data.tags.get("ksm_result") in results:
                self.tr.tags(r.info.run_id, {"ksm_stopped": "signal"})
                self.tr.finish(r.info.run_id, "KILLED")
                log(f"[stop] {r.data.tags.get('ksm_task')}: run {r.info.run_id} KILLED (trains again on resume)")


def fan_out(jobs: list[Job], ctx: JobContext, state: dict[str, np.ndarray], tr: Tracker, progress: bool,
            log: Log = print) -> tuple[dict[str, dict[str, Any]], dict[str, str], float]:
    """Every job whose result has no FINISHED run yet, as Ray tasks (at most ``cluster.max_in_flight`` handed
    to Ray at once), in the given order, with a progress bar; a failed job does not stop the others. Returns
    the results and the failures by label, and the wall seconds of the fan-out.

    SIGINT/SIGTERM stop it: no new job starts, in-flight ones get ``cluster.stop_grace_s`` to finish, the rest
    are killed and their runs closed KILLED; then :class:`Stopped` says what finished (a second signal skips
    the grace period)."""
    import ray
    from tqdm import tqdm

    done = trained_runs(tr, {j.label: j.result for j in jobs})
    todo = deque(j for j in jobs if j.label not in done)
    if done:
        log(f"[fan-out] {len(done)} job(s) already trained: {', '.join(sorted(done))[:300]}; "
            f"training {len(todo)}: {', '.join(j.label for j in todo)[:300] or '-'}")
    results = {label: result_from_run(r, "reused") for label, r in done.items()}
    failures: dict[str, str] = {}
    if not todo:
        return results, failures, 0.0
    cl = todo[0].rc.cluster
    pool = JobPool(ctx, ray.put(state), tr, in_flight_limit(cl))  # the backbone once: every job maps it zero-copy
    t0 = time.perf_counter()
    with StopSignals() as stop, tqdm(total=len(jobs), initial=len(done), desc="tasks", unit="task",
                                     disable=not progress) as bar:
        def record(job: Job, res: dict[str, Any] | None, err: str | None) -> None:
            if res is not None:
                results[job.label] = res
                bar.set_postfix_str(f"{job.label}: acc {res['test_acc']:.3f}")
            else:
                failures[job.label] = err or "?"
                bar.set_postfix_str(f"{job.label}: FAILED")
                # now, not only in the end's summary: a driver that dies later (its tracking server gone) has
                # still said why each job failed, and where a job kept its work
                log(f"[fan-out] {job.label} FAILED: {failures[job.label]}")
            bar.update(1)

        grace = cl.stop_grace_s
        try:
            while (todo or pool) and stop.signum is None:
                while todo and pool.has_room():
                    pool.submit(todo.popleft())
                for outcome in pool.collect(timeout=1.0):
                    record(*outcome)
        except KeyboardInterrupt:  # the second signal: no grace
            grace = 0.0
        if stop.signum is not None:
            finished, killed = pool.stop(grace, log)
            for outcome in finished:
                record(*outcome)
            raise Stopped(stop.signum, _stopped_message(stop.signum, len(jobs), results, failures, killed, todo))
    return results, failures, time.perf_counter() - t0


def _stopped_message(signum: int, total: int, results: dict[str, Any], failures: dict[str, str], killed: list[Job],
                     todo: Any) -> str:
    trained = sum(1 for r in results.values() if r.get("status") == "trained")
    return (f"stopped by {signal.Signals(signum).name}: {len(results)} of {total} task(s) have their result "
            f"({trained} trained by this run), {len(failures)} failed, {len(killed)} in-flight killed (their runs "
            f"are KILLED), {len(todo)} not started. Run the same command again to resume: only the tasks without a "
            f"FINISHED run train.")


def trained_runs(tr: Tracker, wanted: dict[str, str]) -> dict[str, Any]:
    """task -> its FINISHED run with the wanted result key (from any stream), for the tasks that have one. A few
    keys are looked up one by one; many (a long stream) by one paged scan of the FINISHED task runs, so a
    1000-task stream costs a few queries, not 1000."""
    if len(wanted) <= 20:
        found = {t: tr.find_one("FINISHED", ksm_kind="task", ksm_result=k) for t, k in wanted.items()}
        return {t: r for t, r in found.items() if r is not None}
    by_key: dict[str, list[str]] = {}
    for t, k in wanted.items():
        by_key.setdefault(k, []).append(t)
    out: dict[str, Any] = {}
    for r in tr.scan("FINISHED", ksm_kind="task"):  # newest first is not needed: one FINISHED run per result
        for t in by_key.get(r.data.tags.get("ksm_result", ""), []):
            out.setdefault(t, r)
    return out


def supersede(tr: Tracker, key: str, wanted: dict[str, str]) -> None:
    """Tag this stream's FINISHED task runs whose task has since changed (same name, other result key) as
    superseded: they stay in MLflow, but no report or evaluation takes them for the task's current result."""
    for r in tr.find("FINISHED", ksm_kind="task", ksm_sequence=key):
        name = r.data.tags.get("ksm_task")
        if name in wanted and r.data.tags.get("ksm_result") != wanted[name] and r.data.tags.get("ksm_superseded") != "true":
            tr.tags(r.info.run_id, {"ksm_superseded": "true", "ksm_superseded_by_result": wanted[name]})


def _cause(e: BaseException) -> str:
    """What went wrong in a job, for the user: the job's own exception (Ray wraps it in a RayTaskError whose
    first line is only the worker's pid and colour codes)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    return redact_text(f"{type(e).__name__}: {e}")  # logged and raised: a shard URL's login stays out


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
