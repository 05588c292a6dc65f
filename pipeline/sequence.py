"""The stream driver. Its skeleton, which every mode that trains a stream's tasks runs through: :func:`driving`
(resources, inputs, Ray, warm workers, shards, the experiment) and :func:`stream_run` (the stream's parent run
and its backbone, trained once and put once in Ray's object store), yielding a :class:`StreamRun`. On it,
``mode=sequence``: one Ray job per new task (:mod:`.fanout`) -> report -> export; re-running the same sequence
trains only the tasks without a FINISHED run. Also ``mode=shards``.
"""
from __future__ import annotations

import contextlib
import functools
import resource
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ksm_core import fingerprint

from .backbone_dp import train_backbone_dp
from .chain import run_chain
from .claims import Heartbeat, acquire
from .config import RunConfig
from .data import Manifest, ensure_shards, task_specs
from .data.manifest import is_local
from .errors import Log, PipelineError
from .export import export_after_sequence
from .fanout import Job, fan_out
from .identity import backbone_key, result_key
from .jobs import JobContext, backbone_job, warm_worker
from .lineage import DriverInputs, open_stream_run, open_inputs, stream_book, supersede
from .probes import check_tracking_uri
from .report import write_report
from .tracking import Tracker
from .runtime import (check_cluster, check_fits_before_ray, job_remote, job_resources, ray_map, ray_session,
                      warm_workers)

__all__ = ["run_sequence", "run_shards", "shards_before_ray", "shard_writers", "backbone_stage", "driving", "stream_run",
           "StreamRun"]


def run_shards(rc: RunConfig, log: Log = print) -> Manifest:
    """mode=shards: write (or verify and reuse) the benchmark's shards and print where they are. With a cluster
    address the missing tasks are written as Ray jobs, by the cluster's nodes, to the shared path. Ray is started
    (or connected to) only when a task is missing: verifying shards that are all there, or published ones (a URL,
    which is only ever read), costs no Ray start-up."""
    if not rc.cluster.address:
        m = ensure_shards(rc.benchmark, rc.paths.shards, log=log, verify="sha256")
    else:
        task_specs(rc.benchmark)  # a config problem stops here, before connecting
        with contextlib.ExitStack() as ray_up:
            def map_tasks(fn: Any, items: list[tuple[Any, ...]]) -> Any:
                if items:  # entered once: a second call finds Ray initialised and reuses it
                    ray_up.enter_context(ray_session(rc.cluster, log))
                return shard_writers(rc)(fn, items)

            m = ensure_shards(rc.benchmark, rc.paths.shards, log=log, verify="sha256", map_tasks=map_tasks)
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


def backbone_stage(p: DriverInputs, log: Log = print) -> tuple[dict[str, np.ndarray], str, str]:
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
    # the claim stays alive while it works; the run ends FINISHED, or FAILED (KILLED when interrupted)
    with Heartbeat(tr, run_id, rc.cluster.claim_timeout_s / 6), tr.running(run_id):
        what = f"loading {rc.model.weights_path}" if rc.model.weights_path else \
            f"training on {init} for {rc.train.backbone.epochs} epochs"
        log(f"[backbone] {what}")
        if rc.train.backbone.workers > 1 and not rc.model.weights_path:
            log(f"[backbone] data-parallel over {rc.train.backbone.workers} Ray Train workers")
            out = train_backbone_dp(rc, str(p.manifest.path))
        else:
            out = ray.get(job_remote(backbone_job, rc.cluster).remote(rc, str(p.manifest.path)))
        state = out.state
        fp = fingerprint(state)
        fit = out.fit
        for rec in fit.history:
            tr.metrics(run_id, {k: v for k, v in rec.items() if k != "epoch"}, step=int(rec["epoch"]))
        tr.metrics(run_id, {"test_acc": fit.test_acc, "train_seconds": fit.train_seconds}, step=len(fit.history))
        tr.params(run_id, {"model": rc.model.name, "model_width": rc.model.width,
                           "weights_path": rc.model.weights_path, "task": init,
                           "classes": ", ".join(out.classes), "epochs": rc.train.backbone.epochs,
                           "lr": rc.train.backbone.lr, "seed": rc.seed, "fingerprint": fp,
                           "workers": rc.train.backbone.workers})
        tr.tags(run_id, {"ksm_fingerprint": fp, **out.node})
        with tempfile.TemporaryDirectory(prefix="ksm-bb-") as tmp:
            path = Path(tmp) / "backbone.safetensors"
            save_file(state, str(path), metadata={"fingerprint": fp, "model": rc.model.name})
            tr.artifact(run_id, path, "backbone")
    log(f"[backbone] test accuracy on {init}: {fit.test_acc:.3f} (fingerprint {fp[:12]})")
    return state, fp, run_id


# ------------------------------------------------------------------------------------------ the driver skeleton
@dataclass(frozen=True)
class StreamRun:
    """A stream ready for its tasks: what every mode that trains them works with, set up by :func:`stream_run`."""

    rc: RunConfig
    manifest: Manifest
    tracker: Tracker
    key: str                                  # the stream's sequence key (identity.sequence_key)
    parent_id: str                            # the stream's parent run, RUNNING while the block runs
    state: dict[str, np.ndarray]              # the backbone's numpy state
    fingerprint: str
    backbone_run: str

    def job_context(self, manifest: Manifest | None = None) -> JobContext:
        """What each task job is told: where the shards are, where to log, which backbone it adapts."""
        return JobContext(manifest=str((manifest or self.manifest).path), experiment_id=self.tracker.experiment_id,
                          parent_run_id=self.parent_id, sequence_key=self.key,
                          backbone_fingerprint=self.fingerprint, backbone_run_id=self.backbone_run)

    def wanted(self, manifest: Manifest | None = None) -> dict[str, str]:
        """Each new task's result key (backbone, task content, method, training, seed)."""
        m = manifest or self.manifest
        return {t: result_key(self.rc, self.fingerprint, m.task(t).identity) for t in m.new_tasks}


@contextlib.contextmanager
def driving(rc: RunConfig, log: Log = print, *,
            warm: Callable[[int], int] = lambda n: n - 1) -> Iterator[DriverInputs]:
    """The steps every driver that runs task jobs starts with, in this order: the job resources fit (before Ray);
    what can fail in seconds does (:func:`shards_before_ray`); Ray starts or is joined and checked; ``warm(number
    of tasks)`` workers start importing (overlapping what follows); the shards are written or reused; the
    experiment is set up. Yields the :class:`DriverInputs`; Ray ends with the block (if this call started it)."""
    check_fits_before_ray(rc.cluster, *job_resources(rc))
    published, n_tasks = shards_before_ray(rc, log)
    with ray_session(rc.cluster, log):
        check_cluster(rc)
        # a fresh worker spends ~3 s importing torch, MLflow and torch._dynamo before its first job: start that
        # now, so it overlaps the shard writes, the MLflow set-up, the run lookups and the backbone stage
        warm_workers(warm_worker, rc.cluster, warm(n_tasks))
        m = published or ensure_shards(rc.benchmark, rc.paths.shards, log=log, map_tasks=shard_writers(rc))
        yield open_inputs(rc, log, manifest=m)


@contextlib.contextmanager
def stream_run(p: DriverInputs, log: Log = print, *, tags: Mapping[str, str] | None = None,
               finish: bool = True) -> Iterator[StreamRun]:
    """The stream's parent run, reopened or started, and its backbone (reused or trained): the block runs with
    the parent RUNNING and closes it as ``Tracker.running`` does (FINISHED; KILLED when stopped; FAILED on an
    error; ``finish=False``: the block closes it itself when it succeeds)."""
    tr = p.tracker
    key, parent_id = open_stream_run(tr, p.rc, p.manifest, log)
    with tr.running(parent_id, finish=finish):
        state, fp, bb_run = backbone_stage(p, log)
        tr.tags(parent_id, {"ksm_backbone_run": bb_run, "ksm_fingerprint": fp, **(tags or {})})
        yield StreamRun(p.rc, p.manifest, tr, key, parent_id, state, fp, bb_run)


# ---------------------------------------------------------------------------------------------- mode=sequence
def run_sequence(rc: RunConfig, log: Log = print) -> dict[str, Any]:
    """mode=sequence: the whole task sequence; returns {"parent_run_id", "results": [TaskResult per task], ...}."""
    with driving(rc, log) as p, stream_run(p, log) as s:
        if rc.method.sequential():  # PackNet, CPG: one job per task, each after the one before (pipeline/chain.py)
            return run_chain(s, log)
        m, tr = s.manifest, s.tracker
        wanted = s.wanted()
        book = stream_book(tr, s.key, s.parent_id, len(wanted), log)  # a long stream's ledger (None: a short one)
        supersede(tr, s.key, wanted, book)
        results, failures, wall = fan_out([Job(t, t, rc, wanted[t]) for t in m.new_tasks], s.job_context(), s.state,
                                          tr, rc.progress, log, book=book)
        ordered = [results[t] for t in m.new_tasks if t in results]
        report = write_report(tr, s.parent_id, ordered, rc, log=log, wall_seconds=wall, failures=failures)
        export_after_sequence(rc, tr, m, s.parent_id, s.backbone_run, ordered, log)  # every FINISHED task, one model
        # what the driver itself cost, all of it: it must not grow with the stream beyond small per-task records
        tr.metrics(s.parent_id, {"driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                 "fanout_wall_seconds": wall,
                                 "tasks_trained": sum(r.status == "trained" for r in ordered)})
        if failures:
            lines = "\n".join(f"  {t}: {msg.splitlines()[0][:300]}" for t, msg in failures.items())
            raise PipelineError(f"{len(failures)} task(s) failed (the others are saved; re-run the same "
                                f"command to retry only these):\n{lines}")
    return {"parent_run_id": s.parent_id, "results": ordered, "backbone_run_id": s.backbone_run,
            "fingerprint": s.fingerprint, "sequence_key": s.key, "report": report, "experiment_id": tr.experiment_id}
