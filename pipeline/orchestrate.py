"""The driver: shards -> backbone (trained once, put once in Ray's object store) -> one Ray job per new task ->
report. Re-running the same sequence trains only the tasks without a FINISHED run.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ksm_core import fingerprint

from .data import Manifest, ensure_shards
from .jobs import backbone_job, result_from_run, task_job, warm_worker
from .report import write_report
from .settings import PipelineError, check_ray_address, check_tracking_uri, stable_hash
from .tracking import Tracker

__all__ = ["run_sequence", "run_shards", "ray_session", "check_inputs", "prepare", "Prepared", "backbone_stage"]

Log = Callable[[str], None]


def run_shards(rc: dict[str, Any], log: Log = print) -> Manifest:
    """mode=shards: write (or verify and reuse) the benchmark's shards and print where they are."""
    m = ensure_shards(rc["benchmark"], rc["paths"]["shards"], log=log, verify="sha256")
    log(f"[shards] {m.path}: initial task {m.initial_task}, new tasks {', '.join(m.new_tasks)}")
    return m


@contextlib.contextmanager
def ray_session(rc: dict[str, Any], log: Log = print) -> Iterator[None]:
    """Use the Ray runtime already initialised in this process, else connect/start one as configured; shut down
    only what this call started."""
    import ray

    if ray.is_initialized():
        yield
        return
    cl = rc["cluster"]
    address = os.environ.get("RAY_ADDRESS") or cl.get("address") or "local"
    check_ray_address(address, cl.get("connect_timeout_s", 5))
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address == "local":
        # always a private, fresh cluster: a stale /tmp/ray/ray_current_cluster must not be joined
        kw.update(num_cpus=cl.get("num_cpus"), num_gpus=cl.get("num_gpus"))
        log(f"[ray] starting an embedded Ray runtime (num_cpus={cl.get('num_cpus') or 'all'})")
    else:
        log(f"[ray] connecting to {address}")
    try:
        ray.init(address=address, **{k: v for k, v in kw.items() if v is not None})
    except (ConnectionError, RuntimeError) as e:
        raise PipelineError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    try:
        yield
    finally:
        ray.shutdown()


class Prepared:
    """Everything the fan-out needs, made once by the driver."""

    def __init__(self, rc: dict[str, Any], manifest: Manifest, tracker: Tracker):
        self.rc, self.manifest, self.tracker = rc, manifest, tracker


def check_inputs(rc: dict[str, Any], log: Log = print) -> Manifest:
    """Checks that need the outside world, cheapest first, before Ray starts: the tracking server answers
    (seconds), the shards exist (written here if missing)."""
    check_tracking_uri(rc["tracking"]["uri"])
    return ensure_shards(rc["benchmark"], rc["paths"]["shards"], log=log)


def prepare(rc: dict[str, Any], log: Log = print, manifest: Manifest | None = None) -> Prepared:
    """``check_inputs`` (unless its manifest is given), then the MLflow experiment."""
    manifest = manifest or check_inputs(rc, log)
    tracker = Tracker.setup(rc["tracking"]["uri"], rc["tracking"]["experiment"], rc["tracking"].get("artifact_root"))
    return Prepared(rc, manifest, tracker)


def _check_gpus(rc: dict[str, Any]) -> None:
    import ray

    want = rc["cluster"]["gpus_per_task"]
    have = ray.cluster_resources().get("GPU", 0)
    if want > 0 and have <= 0:
        raise PipelineError(f"cluster.gpus_per_task={want} but the Ray cluster has no GPU "
                            f"(resources: {ray.cluster_resources()}); set cluster.gpus_per_task=0 or add GPU nodes")
    if want > have:
        raise PipelineError(f"cluster.gpus_per_task={want} exceeds the cluster's {have} GPUs: no job could start")
    cpus = ray.cluster_resources().get("CPU", 0)
    if rc["cluster"]["cpus_per_task"] > cpus:
        raise PipelineError(f"cluster.cpus_per_task={rc['cluster']['cpus_per_task']} exceeds the cluster's {cpus} "
                            "CPUs: no job could start; lower it")


def _remote(fn: Callable, rc: dict[str, Any]):
    import ray

    cl = rc["cluster"]
    # max_calls=0: Ray's default for GPU tasks is a fresh worker per task (CUDA and imports paid every time);
    # jobs free their GPU memory on return, so workers can be reused
    return ray.remote(max_calls=0)(fn).options(num_cpus=cl["cpus_per_task"], num_gpus=cl["gpus_per_task"] or 0,
                                               max_retries=int(cl.get("max_retries", 2)), retry_exceptions=False)


def _warm_workers(rc: dict[str, Any], jobs: int) -> None:
    """One no-op job per worker slot the task jobs will use (not awaited): each worker imports the job code
    while the driver reuses or trains the backbone."""
    import ray

    cl = rc["cluster"]
    slots = int(ray.available_resources().get("CPU", 0) // cl["cpus_per_task"])
    if cl["gpus_per_task"]:
        slots = min(slots, int(ray.available_resources().get("GPU", 0) / cl["gpus_per_task"] + 1e-9))
    for _ in range(min(jobs, slots)):
        _remote(warm_worker, rc).remote(cl["cpus_per_task"], cl["gpus_per_task"])


def backbone_key(rc: dict[str, Any], manifest: Manifest) -> str:
    init = manifest.task(manifest.initial_task)
    wp = rc["model"].get("weights_path")
    src = {"file": wp, "size": os.path.getsize(wp), "mtime": int(os.path.getmtime(wp))} if wp else rc["train"]["backbone"]
    return stable_hash({"model": {k: v for k, v in rc["model"].items() if k != "weights_path"}, "source": src,
                        "data": manifest.spec_hash, "task": init.name, "seed": rc["seed"]})


def backbone_stage(p: Prepared, log: Log = print) -> tuple[dict[str, np.ndarray], str, str]:
    """The backbone's numpy state, fingerprint and MLflow run id: reused from a FINISHED backbone run with the
    same spec, else trained (as a Ray job, so on a cluster it gets a worker's GPU) and logged."""
    import ray
    from safetensors.numpy import load_file, save_file

    rc, tr = p.rc, p.tracker
    key = backbone_key(rc, p.manifest)
    found = tr.find_one("FINISHED", ksm_kind="backbone", ksm_backbone=key)
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

    tr.kill_stale(ksm_kind="backbone", ksm_backbone=key)
    init = p.manifest.initial_task
    run_id = tr.start(f"backbone-{init}", {"ksm_kind": "backbone", "ksm_backbone": key, "ksm_task": init})
    try:
        what = f"loading {rc['model']['weights_path']}" if rc["model"].get("weights_path") else \
            f"training on {init} for {rc['train']['backbone']['epochs']} epochs"
        log(f"[backbone] {what}")
        out = ray.get(_remote(backbone_job, rc).remote(_with_run(rc, p, {})))
        state = out["state"]
        fp = fingerprint(state)
        fit = out["fit"]
        for rec in fit["history"]:
            tr.metrics(run_id, {k: v for k, v in rec.items() if k != "epoch"}, step=int(rec["epoch"]))
        tr.metrics(run_id, {"test_acc": fit["test_acc"], "train_seconds": fit["train_seconds"]},
                   step=len(fit["history"]))
        tr.params(run_id, {"model": rc["model"]["name"], "model_width": rc["model"].get("width"),
                           "weights_path": rc["model"].get("weights_path"), "task": init,
                           "classes": ", ".join(out["classes"]), "epochs": rc["train"]["backbone"]["epochs"],
                           "lr": rc["train"]["backbone"]["lr"], "seed": rc["seed"], "fingerprint": fp})
        tr.tags(run_id, {"ksm_fingerprint": fp,
                         **{k: out[k] for k in ("ksm_host", "ksm_node_id", "ksm_node_ip") if k in out}})
        with tempfile.TemporaryDirectory(prefix="ksm-bb-") as tmp:
            path = Path(tmp) / "backbone.safetensors"
            save_file(state, str(path), metadata={"fingerprint": fp, "model": rc["model"]["name"]})
            tr.artifact(run_id, path, "backbone")
        tr.finish(run_id)
    except BaseException:
        tr.finish(run_id, "FAILED")
        raise
    log(f"[backbone] test accuracy on {init}: {fit['test_acc']:.3f} (fingerprint {fp[:12]})")
    return state, fp, run_id


def _with_run(rc: dict[str, Any], p: Prepared, extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(rc)
    out["_run"] = {"manifest": str(p.manifest.path), "experiment_id": p.tracker.experiment_id, **extra}
    return out


def sequence_key(rc: dict[str, Any], manifest: Manifest, bb_key: str) -> str:
    """What makes two runs the same sequence: name, data, backbone, method, training (not where it runs)."""
    return stable_hash({"name": rc["run_name"], "data": manifest.spec_hash, "backbone": bb_key,
                        "model": rc["model"], "method": rc["method"], "train": rc["train"], "seed": rc["seed"],
                        "data_opts": rc["data"]})


def run_sequence(rc: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """mode=sequence: the whole task sequence; returns {"parent_run_id", "results": [per-task dicts], ...}."""
    import ray
    from tqdm import tqdm

    m = check_inputs(rc, log)
    with ray_session(rc, log):
        _check_gpus(rc)
        # a fresh worker spends ~3 s importing torch, MLflow and torch._dynamo before its first job: start that
        # now, so it overlaps the MLflow set-up, the run lookups and the backbone stage
        _warm_workers(rc, len(m.new_tasks))
        p = prepare(rc, log, manifest=m)
        tr = p.tracker
        bb_key = backbone_key(rc, m)
        key = sequence_key(rc, m, bb_key)
        parent = tr.find_one(None, ksm_kind="sequence", ksm_sequence=key)
        if parent is not None:
            parent_id = parent.info.run_id
            tr.reopen(parent_id)
            log(f"[sequence] resuming run {parent_id} ({rc['run_name']})")
        else:
            parent_id = tr.start(rc["run_name"], {"ksm_kind": "sequence", "ksm_sequence": key})
            tr.params(parent_id, _flat_params(rc))
        try:
            done = {r.data.tags["ksm_task"]: r for r in tr.find("FINISHED", ksm_kind="task", ksm_sequence=key)}
            todo = [t for t in m.new_tasks if t not in done]
            if done:
                log(f"[sequence] {len(done)} task(s) already finished: {', '.join(sorted(done))}; "
                    f"training {len(todo)}: {', '.join(todo) or '-'}")
            state, fp, bb_run = backbone_stage(p, log)
            tr.tags(parent_id, {"ksm_backbone_run": bb_run, "ksm_fingerprint": fp})
            state_ref = ray.put(state)  # once: every job maps the same arrays zero-copy
            job_rc = _with_run(rc, p, {"sequence_key": key, "parent_run_id": parent_id,
                                       "backbone_fingerprint": fp, "backbone_run_id": bb_run})
            remote = _remote(task_job, rc)
            pending = {remote.remote(job_rc, t, state_ref): t for t in todo}
            results = {t: result_from_run(r, "reused") for t, r in done.items()}
            failures: dict[str, str] = {}
            t0 = time.perf_counter()
            with tqdm(total=len(m.new_tasks), initial=len(done), desc="tasks", unit="task",
                      disable=not rc.get("progress", True)) as bar:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    name = pending.pop(ready[0])
                    try:
                        res = ray.get(ready[0])
                        results[name] = res
                        bar.set_postfix_str(f"{name}: acc {res['test_acc']:.3f}")
                    except Exception as e:  # keep going: the other tasks' work is not lost
                        failures[name] = _cause(e)
                        bar.set_postfix_str(f"{name}: FAILED")
                    bar.update(1)
            wall = time.perf_counter() - t0
            ordered = [results[t] for t in m.new_tasks if t in results]
            report = write_report(tr, parent_id, ordered, rc, log=log, wall_seconds=wall)
            if failures:
                tr.finish(parent_id, "FAILED")
                lines = "\n".join(f"  {t}: {msg.splitlines()[0][:300]}" for t, msg in failures.items())
                raise PipelineError(f"{len(failures)} task(s) failed (the others are saved; re-run the same "
                                    f"command to retry only these):\n{lines}")
            tr.finish(parent_id, "FINISHED")
        except BaseException:
            st = tr.client.get_run(parent_id).info.status
            if st == "RUNNING":
                tr.finish(parent_id, "FAILED")
            raise
    return {"parent_run_id": parent_id, "results": ordered, "backbone_run_id": bb_run, "fingerprint": fp,
            "sequence_key": key, "report": report, "experiment_id": tr.experiment_id}


def _cause(e: BaseException) -> str:
    """What went wrong in a job, for the user: the job's own exception (Ray wraps it in a RayTaskError whose
    first line is only the worker's pid and colour codes)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    return f"{type(e).__name__}: {e}"


def _flat_params(rc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"run_name": rc["run_name"], "seed": rc["seed"], "benchmark": rc["benchmark"]["name"]}
    for sec in ("model", "method", "train", "cluster"):
        for k, v in rc[sec].items():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    out[f"{sec}.{k}.{k2}"] = v2
            else:
                out[f"{sec}.{k}"] = v
    return out
