"""mode=compare: the paper's Tables 1 and 4 on the user's own stream. Every method x seed adapts each backbone
(one per ``compare.backbone_seeds``, by default the run's own ``seed``: one) to every new task, in one Ray fan-out
per backbone with the methods interleaved (so a noisy machine slows them alike), reusing any backbone and any
result already trained. The parent run (``ksm_kind=compare``) gets per method the mean and std over backbones x
seeds of the mean test accuracy, its paired difference against KSM (pairs share a backbone and a task seed) with
the std of those differences, the seconds and artifact bytes per task, a table and a plot.

    python run_pipeline.py mode=compare compare.methods=[ksm,piggyback,finetune] compare.seeds=[0,1,2] \
        compare.backbone_seeds=[0,1,2]

The sequential baselines (``packnet``, ``cpg``: ``config.SEQUENTIAL_METHODS``) may stand beside them. Task t of a
chain needs tasks < t, so each (method, seed) on a backbone runs as ONE chain (``chain.train_chain``, as
``mode=sequence method=packnet`` runs it: link 0 = the initial task, the backbone pruned and retrained, then each
new task), after that backbone's fan-out, under its own sequence key and the compare's parent run; its links'
results are labelled as the fan-out's (`compare_report.label`), so `compare_report.summarise` reads them alike.
Like for like, a chain's mean accuracy and s/task are over the NEW tasks only, as the mask methods' are: link 0
is left out of both (its cost is in the chain's whole time, ``chain_wall_seconds``: its links' job seconds added
up, link 0 included, since they cannot overlap; the mask methods' jobs run side by side). Its bytes per task are
the papers' count (``task_bytes``: ownership bits + BN + head, CPG also its pick bits), where a mask method's are
its task artifact's; CPG's ``model_growth`` is shown (0: CPG-lite does not grow). A chain's links each run alone on
the machine, a fan-out's jobs beside each other: on a shared device their s/task are not measured under the same load.

A seed here seeds the tasks' training (mask/head init, data order); a backbone seed seeds the backbone's.
A method is trained with the run's ``method`` settings when it is the run's method, else with its reference
values. A difference is *within the spread* when |its mean| <= the std of the paired differences
(`compare_report.paired`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ksm_core import METHODS, mask_spec

from .chain import train_chain
from .compare_report import REF, label, report, summarise, time_ratios
from .config import SEQUENTIAL_METHODS, MethodCfg, RunConfig, stable_hash
from .errors import Log, PipelineError
from .fanout import Job, fan_out
from .identity import backbone_key, result_key
from .records import TaskResult
from .sequence import StreamRun, backbone_stage, driving

__all__ = ["check_compare", "run_compare", "method_settings", "backbone_seeds", "chain_key"]


def check_compare(rc: RunConfig) -> None:
    """The ``compare`` section, before any work: known methods, at least one, and a non-empty list of seeds."""
    methods, seeds = list(rc.compare.methods), list(rc.compare.seeds)
    valid = ", ".join(METHODS + SEQUENTIAL_METHODS)
    if not methods:
        raise PipelineError(f"compare.methods is empty; give at least one of {valid}")
    for m in methods:
        if m not in METHODS + SEQUENTIAL_METHODS:
            raise PipelineError(f"compare.methods: {m!r} is not a method; valid methods: {valid}")
    if len(set(methods)) != len(methods):
        raise PipelineError(f"compare.methods={methods} names a method twice")
    chains = [m for m in methods if m in SEQUENTIAL_METHODS]
    if chains and rc.train.weight_decay:
        raise PipelineError(f"train.weight_decay={rc.train.weight_decay!r}: compare.methods has {chains[0]}, which "
                            "needs 0 (a decay would move the frozen weights of earlier tasks); set "
                            "train.weight_decay=0, or leave the sequential methods out of compare.methods")
    if not seeds:
        raise PipelineError("compare.seeds is empty: give the seeds to repeat each method with, e.g. "
                            "compare.seeds=[0,1,2] (3 seeds: a mean and a spread)")
    if len(set(seeds)) != len(seeds):
        raise PipelineError(f"compare.seeds={seeds} names a seed twice")
    bseeds = backbone_seeds(rc)
    if not bseeds:
        raise PipelineError("compare.backbone_seeds is empty: give the seeds of the backbones to compare on, e.g. "
                            "compare.backbone_seeds=[0,1,2] (or leave it out: the run's own seed, one backbone)")
    if len(set(bseeds)) != len(bseeds):
        raise PipelineError(f"compare.backbone_seeds={bseeds} names a seed twice")
    if len(bseeds) > 1 and rc.model.weights_path:
        raise PipelineError(f"compare.backbone_seeds={bseeds} asks for {len(bseeds)} backbones, but "
                            f"model.weights_path={rc.model.weights_path!r} loads one: every seed would get the same "
                            "weights. Give one backbone seed, or model.weights_path=null to train them")


def backbone_seeds(rc: RunConfig) -> list[int]:
    """The seeds of the backbones a comparison runs on: ``compare.backbone_seeds``, or the run's own seed."""
    bs = rc.compare.backbone_seeds
    return [rc.seed] if bs is None else list(bs)


def method_settings(rc: RunConfig, name: str) -> MethodCfg:
    """The settings method ``name`` is trained with in a comparison: the run's own ``method`` section when it is
    the run's method (what the user tuned), else the method's reference values (``ksm_core.mask_spec``; none for
    fine-tune; a sequential method's configs/method/<name>.yaml), so each method is compared at its own best-known
    settings, not at another method's."""
    if name == rc.method.name:
        return rc.method
    if name == "finetune":
        return MethodCfg(name=name)
    if name in SEQUENTIAL_METHODS:  # configs/method/<name>.yaml, as method=<name> composes it
        return MethodCfg.reference(name)
    spec = mask_spec(name)
    return MethodCfg(name=name, tau=spec.tau, k=spec.k, T=spec.T, init=spec.init)


def run_compare(rc: RunConfig, log: Log = print) -> dict[str, Any]:
    """mode=compare (checked by :func:`check_compare`); returns {"parent_run_id", "rows", "results", ...}."""
    methods, seeds, bseeds = list(rc.compare.methods), list(rc.compare.seeds), backbone_seeds(rc)
    one = bseeds == [rc.seed]  # today's comparison on the run's own backbone: its key and labels as before
    mask = [x for x in methods if x not in SEQUENTIAL_METHODS]  # fanned out; the others run as chains
    chains = [x for x in methods if x in SEQUENTIAL_METHODS]
    # one job per new task (the stream's tasks but its initial one) x mask method x seed x backbone; a chain: one
    with driving(rc, log, warm=lambda n: (n - 1) * len(mask) * len(seeds) * len(bseeds) + bool(chains)) as p:
        m, tr = p.manifest, p.tracker
        bb_rcs = {b: dataclasses.replace(rc, seed=b) for b in bseeds}
        backbones: dict[str, Any] = {"backbone": backbone_key(rc, m)} if one else \
            {"backbones": [backbone_key(bb_rcs[b], m) for b in bseeds]}
        key = stable_hash({"name": rc.run_name, **backbones, "methods": methods, "seeds": seeds,
                           "tasks": [m.task(t).identity for t in m.new_tasks], "train": rc.train_identity(),
                           "data_opts": rc.data_identity()})
        parent = tr.find_one(None, ksm_kind="compare", ksm_compare=key)
        parent_id = parent.info.run_id if parent is not None else tr.start(
            f"compare-{rc.run_name}", {"ksm_kind": "compare", "ksm_compare": key})
        tr.reopen(parent_id)
        with tr.running(parent_id):  # FINISHED; KILLED when stopped; FAILED when a job or anything else failed
            tr.params(parent_id, {"run_name": rc.run_name, "benchmark": rc.benchmark["name"], "methods": ",".join(methods),
                                  "seeds": ",".join(map(str, seeds)), "tasks": ",".join(m.new_tasks),
                                  "epochs": rc.train.epochs, "model": rc.model.name, "model_width": rc.model.width,
                                  "backbone_seeds": ",".join(map(str, bseeds))})
            results: dict[str, TaskResult] = {}
            links: dict[str, dict[str, float]] = {}  # a chain link's label -> its run's metrics (task_bytes, ...)
            failures: dict[str, str] = {}
            wall, bb_runs, bb_acc = 0.0, {}, {}
            for b in bseeds:  # one backbone at a time (trained, or reused), then its own fan-out
                state, fp, bb_run = backbone_stage(dataclasses.replace(p, rc=bb_rcs[b]), log)
                bb_runs[b] = bb_run
                bb_acc[b] = tr.client.get_run(bb_run).data.metrics.get("test_acc")
                if b == bseeds[0]:  # the first backbone, under the tags a one-backbone compare has always had
                    tr.tags(parent_id, {"ksm_backbone_run": bb_run, "ksm_fingerprint": fp})
                configs = {(meth, s): dataclasses.replace(rc, method=method_settings(rc, meth), seed=s)
                           for meth in methods for s in seeds}
                # interleaved: every method's job for a task is queued before the next task's, so methods share
                # the machine's good and bad moments alike (and a pair vs KSM shares them most)
                jobs = [Job(label(meth, s, t, None if one else b), t, c, result_key(c, fp, m.task(t).identity))
                        for t in m.new_tasks for s in seeds for meth in mask for c in [configs[(meth, s)]]]
                if jobs:  # under the compare's key and parent run, on this backbone
                    on_b = StreamRun(rc, m, tr, key, parent_id, state, fp, bb_run)
                    res, fails, w = fan_out(jobs, on_b.job_context(), state, tr, rc.progress, log)
                    results.update(res)
                    failures.update(fails)
                    wall += w
                for meth in chains:  # after the fan-out: each chain's links one after another, alone
                    for s in seeds:
                        _compare_chain(StreamRun(configs[(meth, s)], m, tr, chain_key(key, meth, s, b), parent_id,
                                                 state, fp, bb_run), None if one else b, results, links, failures,
                                       log)
                del state  # this backbone's weights: the next one's replace them, not join them
            tr.tags(parent_id, {"ksm_backbone_runs": ",".join(bb_runs[b] for b in bseeds)})
            if failures:
                lines = "\n".join(f"  {lab}: {msg.splitlines()[0][:300]}" for lab, msg in failures.items())
                raise PipelineError(f"{len(failures)} job(s) failed (the others are saved; re-run the same command to "
                                    f"retry only these):\n{lines}")
            rows = summarise(results, methods, seeds, m.new_tasks, None if one else bseeds, links=links,
                             initial=m.initial_task)
            report(tr, parent_id, rows, rc, log, bseeds, bb_acc, fanout_wall=wall if mask else None)
            tr.metrics(parent_id, {**{f"{k}.{r['method']}": r[k] for r in rows
                                      for k in ("mean_test_acc", "std_test_acc", "task_seconds", "artifact_bytes",
                                                "bytes_per_task", "at_chance")
                                      + (("compile_seconds",) if rc.train.compile else ())},
                                   **{f"{k}.{r['method']}": r[k] for r in rows
                                      for k in ("std_backbone_test_acc", f"diff_vs_{REF}", f"std_diff_vs_{REF}",
                                                f"t_vs_{REF}", f"above_{REF}", f"within_spread_vs_{REF}",
                                                "chain_wall_seconds", "initial_task_seconds", "model_growth")
                                      if r.get(k) is not None},
                                   **{f"backbone_test_acc.{b}": a for b, a in bb_acc.items() if a is not None},
                                   **{f"time_ratio.{k.replace(' / ', '_vs_')}": v[0]
                                      for k, v in time_ratios(rows).items()},
                                   "fanout_wall_seconds": wall})
    return {"parent_run_id": parent_id, "rows": rows, "results": results, "experiment_id": tr.experiment_id,
            "backbone_run_id": bb_runs[bseeds[0]], "backbone_run_ids": bb_runs, "links": links}


def chain_key(compare: str, meth: str, seed: int, backbone: int) -> str:
    """The sequence key of one chain of a comparison (its links' ``ksm_sequence``): its own, so that what the
    chain does to its stream's runs (reuse its prefix, tag the runs of a re-trained link superseded) touches no
    other method's, seed's or backbone's runs. A link trained by another comparison or stream on the same chain
    is still reused (``lineage.chain_links`` looks it up by result key and parent chain)."""
    return stable_hash({"compare": compare, "chain": meth, "seed": seed, "backbone_seed": backbone})


def _compare_chain(s: StreamRun, b: int | None, results: dict[str, TaskResult],
                   links: dict[str, dict[str, float]], failures: dict[str, str], log: Log) -> None:
    """One chain of the comparison (``s``: its config, key and the compare's parent run), trained or reused; its
    links' results, their runs' metrics and a failed link go into the comparison's, under `compare_report.label`.
    Link 0 (the initial task) is kept under its own label: `compare_report.summarise` reads only the new tasks' for
    the means."""
    meth, seed = s.rc.method.name, s.rc.seed
    c = train_chain(s, log, name=label(meth, seed, "chain", b))
    for r in c.results:
        results[label(meth, seed, r.task, b)] = r
        links[label(meth, seed, r.task, b)] = c.metrics[r.run_id]
    for t, msg in c.failures.items():
        later = c.links - len(c.results) - 1
        failures[label(meth, seed, t, b)] = (f"{msg.splitlines()[0]} (so the chain's {later} later link(s) did "
                                             "not train)")
