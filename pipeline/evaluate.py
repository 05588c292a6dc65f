"""mode=evaluate: serve a finished sequence from ONE network and check that no task degraded.

The backbone is downloaded from MLflow into a single KSMNet; then each task's artifact in turn is downloaded,
loaded onto it (its mask + BN + head), evaluated on the task's test shards and removed again before the next
(:func:`evaluate_one_at_a_time`): a stream of 1000 tasks needs the memory of the backbone plus one task, never
all masks at once. Each task, and the backbone's own initial task, is compared with the accuracy its run logged
when it was trained: KSM's promise is that adding tasks never changes an earlier one, so the two must be equal
(a task's logits do not depend on which other tasks share the network). The result is an ``evaluation`` run
under the sequence's parent run (per-task metrics, a markdown table).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig
from .errors import Log, PipelineError
from .lineage import CHAIN_ARTIFACT, chain_class, open_inputs, trained_chain, trained_sequence
from .present import text_table

__all__ = ["run_evaluate", "evaluate_one_at_a_time"]


def run_evaluate(rc: RunConfig, log: Log = print) -> dict[str, Any]:
    """Load the sequence that this config names (same run name and spec) and re-evaluate all of its tasks."""
    if rc.method.sequential():  # PackNet, CPG: every task on the chain its last link left
        return run_evaluate_chain(rc, log)
    from safetensors.numpy import load_file

    from ksm_core import KSMNet, evaluate
    from ksm_core.train import resolve_device

    from .data import make_loader
    from .worker import BACKBONE_EVAL_BATCH, build_backbone

    p = open_inputs(rc, log)
    tr, m = p.tracker, p.manifest
    parent, bb_run, done = trained_sequence(tr, rc, m, "evaluate")
    missing = [t for t in m.new_tasks if t not in done]
    init = m.task(m.initial_task)
    cfg = rc.train.to_core(device=rc.device())
    dev = resolve_device(cfg.device)
    log(f"[evaluate] sequence run {parent.info.run_id}: backbone + {len(done)} task(s) into one network on {dev}"
        + (f"; not trained yet: {', '.join(missing)}" if missing else ""))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ksm-eval-") as tmp:
        state = load_file(tr.download(bb_run.info.run_id, "backbone/backbone.safetensors", tmp))
        net = KSMNet.from_backbone(build_backbone(rc.model, init.num_classes, state))
        del state
        if net.backbone_fingerprint != bb_run.data.tags.get("ksm_fingerprint"):
            raise PipelineError(f"backbone run {bb_run.info.run_id}: its weights do not hash to its logged "
                                "fingerprint; the run's artifact was changed")
        net.to(dev)
        # the index each task has in the network that holds them all (task 0 = the backbone's own)
        order = [(m.initial_task, 0)] + [(t, i) for i, t in enumerate((t for t in m.new_tasks if t in done), 1)]

        def fetch(t: str) -> str:
            return tr.download(done[t].info.run_id, f"task/{t}.safetensors", Path(tmp) / "task")

        def score(net_: Any, t: str, i: int) -> float:
            bs = BACKBONE_EVAL_BATCH if i == 0 else rc.train.batch_size  # as when the accuracy was logged
            return evaluate(net_, make_loader(m, t, "test", batch_size=bs, seed=rc.seed,
                                              on_corrupt=rc.data.on_corrupt, transform=rc.data.transform,
                                              decode_workers=max(1, int(rc.cluster.cpus_per_task)),
                                              device=rc.device()), cfg)[0]

        scored = evaluate_one_at_a_time(net, order, fetch, score, dev)

    rows = _rows([(t, i, acc, (bb_run if i == 0 else done[t]).data.metrics.get("test_acc")) for t, i, acc in scored])
    unchanged = net.fingerprint() == net.backbone_fingerprint
    seconds = time.perf_counter() - t0
    log("")
    log(f"One network, {len(rows)} tasks (task 0 = the backbone's own, {m.initial_task}):")
    return _log_evaluation(rc, tr, parent, rows, missing, dev, seconds, log, unchanged,
                           f"backbone tensors {'bit-identical to' if unchanged else 'CHANGED from'} the logged "
                           "fingerprint")


def run_evaluate_chain(rc: RunConfig, log: Log = print) -> dict[str, Any]:
    """mode=evaluate for a sequential method (PackNet, CPG): the chain its last trained link logged, loaded once
    onto the logged backbone, and every earlier task re-checked on it against the accuracy its own run logged
    right after it trained. The difference is the task's forgetting: 0 by design (each task's weights are frozen
    once trained; later tasks only use the weights no earlier task kept)."""
    from safetensors.numpy import load_file

    from ksm_core.train import resolve_device

    from .chain import chain_loader
    from .worker import build_backbone

    p = open_inputs(rc, log)
    tr, m = p.tracker, p.manifest
    parent, bb_run, links = trained_chain(tr, rc, m, "evaluate")
    fp = bb_run.data.tags.get("ksm_fingerprint", "")
    done = [ln for ln in links if ln.run is not None]
    missing = [ln.task for ln in links if ln.run is None]
    last = done[-1]
    cfg = rc.train.to_core(device=rc.device())
    dev = resolve_device(cfg.device)
    log(f"[evaluate] chain run {parent.info.run_id}: {len(done)} task(s) on the chain its last link "
        f"({last.task}, run {last.run.info.run_id}) left, on {dev}"
        + (f"; not trained yet: {', '.join(missing)}" if missing else ""))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ksm-eval-") as tmp:
        state = load_file(tr.download(bb_run.info.run_id, "backbone/backbone.safetensors", tmp))
        init = m.task(m.initial_task)
        net = chain_class(rc.method.name).load_chain(build_backbone(rc.model, init.num_classes, state),
                                                     tr.download(last.run.info.run_id, CHAIN_ARTIFACT, tmp))
    if net.backbone_fingerprint != fp:
        raise PipelineError(f"backbone run {bb_run.info.run_id}: its weights do not hash to its logged fingerprint; "
                            "the run's artifact was changed")
    if net.chain_fingerprint(net.num_tasks - 1) != last.fingerprint or net.num_tasks != len(done):
        raise PipelineError(f"the chain logged by run {last.run.info.run_id} ({last.task}) is not the one its run was "
                            "tagged with; delete that run and re-run the sequence to train it again")
    net.to(dev)
    rows = _rows([(ln.task, i, net.evaluate(i, chain_loader(rc, m, ln.task, "test"), cfg)[0],
                   ln.run.data.metrics.get("test_acc")) for i, ln in enumerate(done)])
    seconds = time.perf_counter() - t0
    log("")
    log(f"The chain after its last link, {len(rows)} tasks (task 0 = the backbone's own, {m.initial_task}, pruned; "
        "delta = forgetting, 0 by design):")
    return _log_evaluation(rc, tr, parent, rows, missing, dev, seconds, log, None,
                           f"the chain after {last.task} (fingerprint {last.fingerprint[:12]})")


def _rows(scored: list[tuple[str, int, float, float | None]]) -> list[dict[str, Any]]:
    """(task, index, accuracy now, accuracy logged) -> the evaluation's rows."""
    return [{"task": t, "index": i, "logged_acc": logged, "acc": acc, "delta": None if logged is None else acc - logged}
            for t, i, acc, logged in scored]


def _log_evaluation(rc: RunConfig, tr: Any, parent: Any, rows: list[dict[str, Any]], missing: list[str], dev: Any,
                    seconds: float, log: Log, unchanged: bool | None, what: str) -> dict[str, Any]:
    """Print the table and log the ``evaluation`` run under the stream's parent run; the mode's result."""
    worst = max((abs(r["delta"]) for r in rows if r["delta"] is not None), default=0.0)
    log(_table(rows))
    log(f"largest |accuracy now - accuracy when trained| = {worst:.4f}; {what}; {seconds:.1f} s")
    run_id = tr.start("evaluation", {"ksm_kind": "evaluation", "ksm_sequence": parent.data.tags["ksm_sequence"]},
                      parent=parent.info.run_id)
    with tr.running(run_id):
        tr.metrics(run_id, {**{f"test_acc.{r['task']}": r["acc"] for r in rows},
                            **{f"delta.{r['task']}": r["delta"] for r in rows},
                            "max_abs_delta": worst, "tasks": len(rows), "seconds": seconds,
                            **({"backbone_unchanged": float(unchanged)} if unchanged is not None else {})})
        tr.params(run_id, {"device": str(dev), "not_trained": ", ".join(missing) or "-"})
        with tempfile.TemporaryDirectory(prefix="ksm-eval-") as tmp:
            path = Path(tmp) / "evaluation.md"
            path.write_text(f"# {rc.run_name}: all tasks in one network\n\n{_table(rows, markdown=True)}\n")
            tr.artifact(run_id, path, "report")
    return {"rows": rows, "max_abs_delta": worst, "backbone_unchanged": unchanged, "missing": missing,
            "run_id": run_id, "parent_run_id": parent.info.run_id}


def evaluate_one_at_a_time(net: Any, order: list[tuple[str, int]], fetch: Callable[[str], str],
                           score: Callable[[Any, str, int], float], device: Any) -> list[tuple[str, int, float]]:
    """Score each task of ``order`` ((name, index), index 0 = the backbone's own task) on ``net``, holding at most
    ONE task artifact at a time: ``fetch(name)`` gives the path of a fresh local copy of the task's artifact, which
    is loaded onto ``net`` as its only added task, the file deleted, the task scored by ``score(net, name, index)``
    and removed from ``net`` before the next one is fetched. Memory stays that of the backbone plus one task,
    whatever the stream's length. A task's logits do not depend on which other tasks the network holds (KSM's
    promise, and the reason for this check), so the accuracies equal those of one network holding every task.
    Returns (name, index, accuracy) in the given order."""
    from ksm_core import load_task

    out = []
    for name, i in order:
        if i == 0:
            out.append((name, i, score(net.set_task(0), name, i)))
            continue
        path = fetch(name)
        try:
            t = load_task(net, path, name=name)
        finally:
            os.remove(path)  # the downloaded copy goes as soon as its tensors are in the network
        try:
            net.to(device)  # moves only the new task's tensors; the backbone is already there
            out.append((name, i, score(net.set_task(t), name, i)))
        finally:
            net.remove_task(t)
    return out


def _table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    head = ["task", "index", "acc when trained", "acc now", "delta"]
    return text_table(head, [[r["task"], str(r["index"]), "-" if r["logged_acc"] is None else f"{r['logged_acc']:.4f}",
                              f"{r['acc']:.4f}", "-" if r["delta"] is None else f"{r['delta']:+.4f}"] for r in rows],
                      markdown)
