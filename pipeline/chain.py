"""mode=sequence for the sequential baselines (``method=packnet``, ``method=cpg``): the stream as ONE chain of Ray jobs.

Task t of PackNet or CPG trains on what tasks < t left (``ksm_core.packnet``, ``ksm_core.cpg``), so there is no
fan-out: :func:`train_chain` starts one job per link, each after the one before it finished, on the same job
resources as the mask methods' tasks (``runtime.job_remote``). :func:`run_chain` is mode=sequence's (the chain,
then the stream's report); ``mode=compare`` runs one :func:`train_chain` per (method, seed, backbone), under the
comparison's parent run, each with a sequence key of its own (``compare.chain_key``). The chain's links are the
stream's initial task first (link 0: the backbone pruned, or compacted, and retrained on the data it was trained
on, as their scripts do), then each new task in order. Each link is one FINISHED task run under the stream's
parent run, tagged as a mask task run is (``ksm_kind=task``, ``ksm_task``, ``ksm_result``, ``ksm_sequence``, ...),
and holds:

- ``chain/chain.safetensors``: the whole chain after the link (``PackNet.save_chain``: each task's weights it owns,
  its ownership bits, CPG's pick bits, BN and head; safetensors + JSON, no pickle): what the next link and
  ``mode=evaluate`` load;
- metrics ``test_acc``, ``train_seconds``, ``artifact_bytes`` (that file), ``task_bytes`` (what the task adds, as the
  papers count it: ``PackNet.task_bytes``), and CPG's ``model_growth`` (0: CPG-lite does not grow).

Identity. A link's result key is the mask methods' (backbone, task content, method, training, data options, seed)
hashed with the previous link's key, so a changed early task changes every later key. A link's run also carries
the fingerprint of the chain it was trained on (``ksm_chain_parent``) and of the chain after it
(``ksm_chain_fingerprint``): a run is reused only when its parent is exactly the state the previous link left, so
a link trained again (its run deleted) is never followed by a later link trained on its old weights.

Resume: a rerun reuses the FINISHED runs of the chain's prefix and trains from the first link without one, in
order; appending a task to the stream adds a link. Two launches of one chain do not train a link twice: each job
claims its link (``claims.acquire``, as ``jobs.task_job`` does) and a second launch waits for the first's run.
A link that ends at chance is tagged ``ksm_warning=chance_level`` (the report names it, as a mask task's) and,
with ``train.retrain_at_chance``, trained once more from the same chain with the mask tasks' other seed (tag
``ksm_retrained``, metric ``first_test_acc``). A tracking server down past ``tracking.outage_s`` when a link ends
costs no training, as for a mask task (``pipeline.unlogged``): the link's chain file and whole record are kept
under ``paths.output/unlogged/`` and the next run of the command logs them (tag ``ksm_recovered_from``) instead of
training the link, then goes on with the next link on that chain. The served model
(``pipeline.export``, at the end of the chain as of a mask sequence, and ``mode=export``) holds the last link's
chain file, which holds every task.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ksm_core import ArtifactWriteError, at_chance
from ksm_core.cpg import CPG
from ksm_core.packnet import PackNet

from .claims import Heartbeat, acquire
from .config import RunConfig
from .data import Manifest, make_loader
from .errors import Log, PipelineError, TrackingUnreachable
from .export import export_after_sequence
from .jobs import JobContext, retrain_seed, task_datasets
from .lineage import CHAIN_ARTIFACT, Link, chain_class, chain_links
from .params import method_params
from .records import TaskResult
from .report import CHANCE_LEVEL, write_report
from .runtime import job_remote
from .tracking import Tracker
from .unlogged import RECORD_FILE, EpochRecords, Unlogged, log_outcome, unlogged_dir
from .worker import build_backbone, cached_manifest, node_info, prepare_worker

__all__ = ["run_chain", "train_chain", "ChainRun", "chain_job", "chain_loader"]


def chain_loader(rc: RunConfig, m: Manifest, task: str, split: str) -> Any:
    """A link's train or test loader, alike in its job and in ``mode=evaluate`` (the test batches the logged
    accuracy was measured on)."""
    return make_loader(m, task, split, batch_size=rc.train.batch_size, seed=rc.seed, on_corrupt=rc.data.on_corrupt,
                       shuffle_buffer=rc.data.shuffle_buffer, transform=rc.data.transform,
                       decode_workers=max(1, int(rc.cluster.cpus_per_task)), device=rc.device())


# ------------------------------------------------------------------------------------------------ the driver
@dataclass
class ChainRun:
    """What :func:`train_chain` did with one chain: its links' results in order (up to a failed link), each link
    run's metrics by run id (``task_bytes``, ``job_seconds``, CPG's ``model_growth``: what a TaskResult does not
    carry), the failed link (task -> message; the links after it did not run), this launch's wall seconds."""

    results: list[TaskResult]
    metrics: dict[str, dict[str, float]]
    failures: dict[str, str]
    wall: float
    links: int


def train_chain(s: Any, log: Log = print, *, name: str = "chain") -> ChainRun:
    """One chain, on the stream ``s`` describes (a ``sequence.StreamRun``: its config, manifest, tracker, the
    chain's sequence key, the parent run its links log under, the backbone): reuse the FINISHED prefix, train the
    rest one Ray job at a time, in order; stops at the first failed link (returned, not raised). The stale runs
    of re-trained links are tagged superseded. ``name``: the log lines' prefix. What :func:`run_chain` and
    ``mode=compare`` run."""
    import ray

    rc, m, tr = s.rc, s.manifest, s.tracker
    t_start = time.perf_counter()
    stream_runs = list(tr.scan("FINISHED", ksm_kind="task", ksm_sequence=s.key))
    links = chain_links(tr, rc, m, s.fingerprint, s.key, stream_runs)
    first = next((i for i, ln in enumerate(links) if ln.run is None), len(links))
    _say_what_trains(links, first, stream_runs, log, name)
    ctx: JobContext = s.job_context()
    # once, when a link trains: every link's job maps the same arrays
    state_ref = ray.put(s.state) if first < len(links) else None
    job = job_remote(chain_job, rc.cluster)
    results: list[TaskResult] = []
    metrics: dict[str, dict[str, float]] = {}
    failures: dict[str, str] = {}
    parent_run, parent_fp = "", s.fingerprint
    for i, ln in enumerate(links):
        if ln.run is not None:
            res, fp, logged = TaskResult.from_run(ln.run, "reused"), ln.fingerprint, dict(ln.run.data.metrics)
        else:
            try:
                res, fp, logged = _get(job.remote(rc, ctx, i, ln.task, ln.key, parent_run, parent_fp, state_ref))
            except PipelineError as e:  # the later links need this one: the chain stops here
                failures[ln.task] = str(e)
                log(f"[{name}] {ln.task} failed: {str(e).splitlines()[0]}")
                break
            log(f"[{name}] {i + 1}/{len(links)} {ln.task}: test acc {res.test_acc:.3f} ({res.status})")
        results.append(res)
        metrics[res.run_id] = logged
        parent_run, parent_fp = res.run_id, fp
    _supersede_stale_runs(tr, stream_runs, {r.task: r.run_id for r in results[first:]})
    return ChainRun(results, metrics, failures, time.perf_counter() - t_start, len(links))


def run_chain(s: Any, log: Log = print) -> dict[str, Any]:
    """The chain of a sequential method on a stream set up by ``sequence.stream_run`` (``s``: its ``StreamRun``,
    the parent run RUNNING, the backbone in hand): :func:`train_chain`, then the stream's report. Returns what
    ``run_sequence`` returns (``results``: one TaskResult per link, the initial task first)."""
    rc, tr = s.rc, s.tracker
    c = train_chain(s, log)
    report = write_report(tr, s.parent_id, c.results, rc, log=log, wall_seconds=c.wall, failures=c.failures)
    tr.metrics(s.parent_id, {"chain_wall_seconds": c.wall,
                             "tasks_trained": sum(r.status == "trained" for r in c.results)})
    # the chain's tasks as one served model (the last link's chain holds them all); a failed export fails nothing
    if c.results:  # none when link 0 failed: nothing to serve
        export_after_sequence(rc, tr, s.manifest, s.parent_id, s.backbone_run, c.results, log)
    if c.failures:
        t, msg = next(iter(c.failures.items()))
        raise PipelineError(f"chain link {t} failed, so the {c.links - len(c.results) - 1} link(s) after it did not "
                            f"train (the links before it are saved; re-run the same command to go on from {t}):\n"
                            f"  {t}: {msg.splitlines()[0][:500]}")
    return {"parent_run_id": s.parent_id, "results": c.results, "backbone_run_id": s.backbone_run,
            "fingerprint": s.fingerprint, "sequence_key": s.key, "report": report,
            "experiment_id": tr.experiment_id, "chain_wall_seconds": c.wall}


def _get(ref: Any) -> tuple[TaskResult, str, dict[str, float]]:
    """A link job's result; the job's own error raised as itself (its message names the fix)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (PipelineError, ValueError)):
            raise PipelineError(str(cause)) from None
        raise


def _say_what_trains(links: list[Link], first: int, stream_runs: list[Any], log: Log, name: str = "chain") -> None:
    """One line: how much of the chain is reused, and which later links trained before are invalidated."""
    n = len(links)
    if first == n:
        log(f"[{name}] all {n} link(s) reused: nothing to train")
        return
    had = {r.data.tags.get("ksm_task") for r in stream_runs if r.data.tags.get("ksm_superseded") != "true"}
    later = [ln.task for ln in links[first + 1:] if ln.task in had]
    why = "changed since its last run" if links[first].task in had else "new, or never trained in this chain"
    log(f"[{name}] {first} of {n} link(s) reused; {links[first].task} ({why}) and the {n - first - 1} after it "
        f"train in order" + (f"; this invalidates {len(later)} later task(s) trained before: {', '.join(later)} (a "
                             "link is reused only on the exact chain it was trained on)" if later else ""))


def _supersede_stale_runs(tr: Tracker, stream_runs: list[Any], chosen: dict[str, str]) -> None:
    """The links this launch trained or found anew (task -> run): the stream's other runs of those tasks were
    trained on another chain (a changed task, or a link before them trained again); tag them superseded, so that
    no report or evaluation takes them for this chain's. Done once the chain has run: a link trained again to the
    same bits keeps the runs after it (same parent fingerprint), which its job then reuses."""
    for r in stream_runs:
        tags = r.data.tags
        task = tags.get("ksm_task")
        if task in chosen and r.info.run_id != chosen[task] and tags.get("ksm_superseded") != "true":
            tr.tags(r.info.run_id, {"ksm_superseded": "true", "ksm_superseded_by_run": chosen[task]})


# -------------------------------------------------------------------------------------------------- the job
def chain_job(rc: RunConfig, ctx: JobContext, link: int, task_name: str, result: str, parent_run: str,
              parent_fp: str, backbone_state: dict[str, Any]) -> tuple[TaskResult, str, dict[str, float]]:
    """One link, end to end, as a child run of the stream: claim it, load the chain the previous link left (its
    run's ``chain/chain.safetensors``; the backbone for link 0), train the task with ksm_core's PackNet / CPG, log
    the chain after it and the task's numbers, FINISHED. Returns the task's result, the chain's fingerprint and
    the run's final metrics.
    Safe to run more than once: a FINISHED run of this link on this parent chain is the result."""
    prepare_worker(rc.cluster.cpus_per_task, rc.cluster.gpus_per_task)
    tr = Tracker(rc.tracking.uri, ctx.experiment_id, rc.tracking.outage_s)
    m = cached_manifest(ctx.manifest)
    keys = {"ksm_kind": "task", "ksm_result": result, "ksm_chain_parent": parent_fp}
    tags = {"ksm_sequence": ctx.sequence_key, "ksm_task": task_name, "ksm_task_id": m.task(task_name).identity,
            "ksm_chain_link": str(link), **node_info()}
    claim = acquire(tr, keys, task_name, tags, parent=ctx.parent_run_id, stale_s=rc.cluster.claim_timeout_s)
    if claim.done is not None:
        return (TaskResult.from_run(claim.done, status="reused"), claim.done.data.tags["ksm_chain_fingerprint"],
                dict(claim.done.data.metrics))
    run_id = claim.run_id
    assert run_id is not None
    t0 = time.perf_counter()
    # the link's chain file until it is uploaded; kept with the whole record when the server stays down (a mask
    # task's unlogged folder, keyed by the chain it was trained on too: a retrained parent is another link)
    folder = unlogged_dir(rc, task_name, f"{result}-{parent_fp[:16]}")
    with tr.running(run_id, finish=False):
        tr.inputs(run_id, task_datasets(m, task_name))
        kept = Unlogged.load(folder) if os.path.lexists(folder / RECORD_FILE) else None
    if kept is not None:  # trained before, while the server was down: log that, do not train again
        log_outcome(tr, claim.run, kept, rc, tags={"ksm_recovered_from": kept.run_id}, artifact_path="chain")
        shutil.rmtree(folder, ignore_errors=True)
        return (TaskResult.from_logged(claim.run.info, "recovered", kept.params, kept.metrics,
                                       {**claim.run.data.tags, **kept.tags}), kept.tags["ksm_chain_fingerprint"],
                kept.metrics)
    with Heartbeat(tr, run_id, rc.cluster.claim_timeout_s / 6), tr.running(run_id, finish=False):
        train, test = chain_loader(rc, m, task_name, "train"), chain_loader(rc, m, task_name, "test")
        records = EpochRecords(tr, run_id)

        def on_epoch(_: int, rec: dict[str, Any]) -> None:  # every phase's epochs, one step after another, live
            records.add(records.count, {k: float(v) for k, v in rec.items()
                                        if k != "epoch" and isinstance(v, (int, float))})

        def attempt(seed: int) -> tuple[PackNet, Any]:  # the link trained on a fresh copy of the chain before it
            net = _chain_before(rc, tr, m, link, task_name, parent_run, parent_fp, backbone_state)
            return net, _train_link(rc, net, link, task_name, train, test, seed, on_epoch)

        classes = list(m.task(task_name).class_names)
        net, res = attempt(rc.seed)
        first_acc = None
        if rc.train.retrain_at_chance and at_chance(res.test_acc, len(classes), rc.train.chance_margin):
            # once, with the mask tasks' fixed other seed (jobs.retrain_seed); its epochs follow the first's
            first_acc = res.test_acc
            net, res = attempt(retrain_seed(rc.seed))
        fp = net.chain_fingerprint(link)
        try:
            size = net.save_chain(folder / "chain.safetensors", extra={"task": task_name, "run_name": rc.run_name})
        except ArtifactWriteError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise PipelineError(f"task {task_name}: {e}; free space there, or point paths.output at another "
                                "folder; a rerun trains the link again") from e
        params = {**method_params(rc.method, rc.train), "epochs": rc.train.epochs,
                  "batch_size": rc.train.batch_size, "model": rc.model.name, "model_width": rc.model.width,
                  "backbone_fingerprint": ctx.backbone_fingerprint, "backbone_run_id": ctx.backbone_run_id,
                  "task": task_name, "classes": ", ".join(classes), "num_classes": len(classes),
                  "train_samples": train.num_samples, "test_samples": test.num_samples, "seed": rc.seed,
                  "device": str(next(net.parameters()).device), "transform": rc.data.transform,
                  "chain_link": link, "chain_parent_run_id": parent_run or "-",
                  **({"retrain_seed": retrain_seed(rc.seed)} if first_acc is not None else {})}
        final = {"test_acc": res.test_acc, "test_loss": res.test_loss, "train_seconds": res.train_seconds,
                 "job_seconds": time.perf_counter() - t0, "artifact_bytes": size, "task_bytes": net.task_bytes(link),
                 "owned_weights": res.owned, "free_weights": res.free_after, "total_weights": res.total_weights,
                 "owned_fraction": res.owned / res.total_weights if res.total_weights else None,
                 "skipped_samples": train.skipped + test.skipped, "first_test_acc": first_acc}
        if isinstance(net, CPG):
            final.update(model_growth=res.grown, sparsity=res.sparsity, goal=res.goal, goal_met=float(res.goal_met),
                         retrain_kept=float(res.retrain_kept), prune_steps=len(res.prune_steps))
        else:
            final.update(pruned_weights=res.pruned)
        final = {k: v for k, v in final.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        end_tags = {"ksm_chain_fingerprint": fp, "ksm_device": params["device"], "ksm_method": rc.method.name,
                    # named, never averaged away: the report and compare flag a link at chance as a mask task
                    **({"ksm_warning": CHANCE_LEVEL}
                       if at_chance(res.test_acc, len(classes), rc.train.chance_margin) else {}),
                    **({"ksm_retrained": CHANCE_LEVEL} if first_acc is not None else {})}
        path = folder / "chain.safetensors"
        end_tags["ksm_chain_sha256"] = sha = hashlib.sha256(path.read_bytes()).hexdigest()
        rec = Unlogged(artifact=str(path), sha256=sha, params={k: str(v) for k, v in params.items()}, metrics=final,
                       tags=end_tags, step=records.count, run_id=run_id, epochs=records.waiting)
        try:
            log_outcome(tr, claim.run, rec, rc, artifact_path="chain")
        except TrackingUnreachable as e:
            where = rec.keep()
            raise TrackingUnreachable(f"task {task_name} (link {link} of the chain) finished training, but {e}. "
                                      f"Nothing is lost: the trained link is kept at {where} and the next run of "
                                      "the same command logs it from there without training it again") from None
    shutil.rmtree(folder, ignore_errors=True)
    return TaskResult.from_logged(claim.run.info, "trained", {k: str(v) for k, v in params.items()}, final,
                                  {**claim.run.data.tags, **end_tags}), fp, final


def _train_link(rc: RunConfig, net: PackNet, link: int, task_name: str, train: Any, test: Any, seed: int,
                on_epoch: Any) -> Any:
    """ksm_core's PackNet / CPG ``train_task`` for one link at the method's chain settings, with ``seed``; a
    ValueError (no free weight left) as the PipelineError that names the setting to change."""
    cfg = rc.train.to_core(device=rc.device(), seed=seed)
    settings = rc.method.chain_settings()
    kw: dict[str, Any] = {"retrain_epochs": settings.get("retrain_epochs")}
    if rc.method.name == "cpg":
        kw.update(allow_loss=settings.get("allow_loss", 0.0), prune_epochs=settings.get("prune_epochs"))
    try:
        return net.train_task(link, train, test, cfg, on_epoch=on_epoch, **kw)
    except ValueError as e:  # e.g. no free weight left: an earlier task kept all it was given
        hint = (" (CPG-lite does not grow: a higher method.allow_loss lets a task prune and leave weights free)"
                if rc.method.name == "cpg" else " (a higher method.prune leaves more weights free)")
        raise PipelineError(f"task {task_name} (link {link} of the chain): {e}{hint}") from None


def _chain_before(rc: RunConfig, tr: Tracker, m: Manifest, link: int, task_name: str, parent_run: str,
                  parent_fp: str, backbone_state: dict[str, Any]) -> PackNet:
    """The chain this link trains on, with the link's task added: the backbone wrapped (link 0), else the chain
    the previous link's run logged, checked against the fingerprint that run was tagged with."""
    cls = chain_class(rc.method.name)
    init = m.task(m.initial_task)
    bb = build_backbone(rc.model, init.num_classes, backbone_state)
    if link == 0:
        s = rc.method.chain_settings()
        kw = {"step": s["step"]} if cls is CPG and "step" in s else {}
        net = cls.from_backbone(bb, **({"prune": s["prune"]} if "prune" in s else {}), **kw)
        net.task_names[0] = init.name  # ksm_core calls the backbone's task "base"; here it is the stream's own
        return net
    with tempfile.TemporaryDirectory(prefix="ksm-chain-") as tmp:
        path = tr.download(parent_run, CHAIN_ARTIFACT, tmp)
        try:
            net = cls.load_chain(bb, path)
        except ValueError as e:
            raise PipelineError(f"task {task_name}: the chain of run {parent_run} (the link before) cannot be loaded "
                                f"({e}); delete that run and re-run the command to train it again") from None
    if net.num_tasks != link or net.chain_fingerprint(link - 1) != parent_fp:
        raise PipelineError(f"task {task_name}: the chain logged by run {parent_run} is not the one its run was "
                            f"tagged with (fingerprint {parent_fp[:12]}, {link} task(s)); delete that run and re-run")
    t = net.add_task(m.task(task_name).num_classes, name=task_name)
    assert t == link
    return net

