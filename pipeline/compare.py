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
results are labelled as the fan-out's (:func:`label`), so :func:`summarise` reads them alike. Like for like, a
chain's mean accuracy and s/task are over the NEW tasks only, as the mask methods' are: link 0 is left out of
both (its cost is in the chain's whole time, ``chain_wall_seconds``: its links' job seconds added up, link 0
included, since they cannot overlap; the mask methods' jobs run side by side). Its bytes per task are the papers'
count (``task_bytes``: ownership bits + BN + head, CPG also its pick bits), where a mask method's are its task
artifact's; CPG's ``model_growth`` is shown (0: CPG-lite does not grow). A chain's links each run alone on the
machine, a fan-out's jobs beside each other: on a shared device their s/task are not measured under the same load.

A seed here seeds the tasks' training (mask/head init, data order); a backbone seed seeds the backbone's.
A method is trained with the run's ``method`` settings when it is the run's method, else with its reference
values. A difference is *within the spread* when |its mean| <= the std of the paired differences
(:func:`paired`).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ksm_core import METHODS, mask_spec

from .chain import train_chain
from .config import SEQUENTIAL_METHODS, MethodCfg, RunConfig, stable_hash
from .errors import Log, PipelineError
from .jobs import JobContext
from .fanout import Job, fan_out
from .identity import backbone_key, result_key
from .present import pyplot, text_table
from .records import TaskResult
from .report import at_chance_tasks
from .sequence import StreamRun, backbone_stage, driving

__all__ = ["check_compare", "run_compare", "summarise", "method_settings", "backbone_seeds", "paired", "label"]


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


def label(meth: str, seed: int, task: str, backbone: int | None = None) -> str:
    """A job's label: ``method/seed/task`` on the one backbone (as before backbone seeds existed), else
    ``method/b<backbone seed>/seed/task``."""
    return f"{meth}/{seed}/{task}" if backbone is None else f"{meth}/b{backbone}/{seed}/{task}"


def paired(ref: list[float], other: list[float]) -> dict[str, Any]:
    """``other - ref`` pair by pair (a pair shares a backbone and a task seed): the mean difference, the std of
    the differences over the pairs (0 for one pair), their count, how many pairs ``other`` is above / below
    ``ref``, the paired t statistic (mean / (std / sqrt(n)); None when the std is 0 or there is one pair) and
    ``within``: whether |mean| <= std, the rule the report reads a difference by (None for one pair: no spread)."""
    if len(ref) != len(other) or not ref:
        raise ValueError(f"paired: {len(ref)} vs {len(other)} values; need the same number, at least one")
    d = [o - r for r, o in zip(ref, other)]
    n = len(d)
    mean = statistics.fmean(d)
    std = statistics.stdev(d) if n > 1 else 0.0
    return {"diff": mean, "diff_std": std, "pairs": n, "above": sum(x > 0 for x in d), "below": sum(x < 0 for x in d),
            "t": mean / (std / math.sqrt(n)) if n > 1 and std > 0 else None,
            "within": abs(mean) <= std if n > 1 else None}


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
                ctx = JobContext(manifest=str(m.path), experiment_id=tr.experiment_id, parent_run_id=parent_id,
                                 sequence_key=key, backbone_fingerprint=fp, backbone_run_id=bb_run)
                if jobs:
                    res, fails, w = fan_out(jobs, ctx, state, tr, rc.progress, log)
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
            _report(tr, parent_id, rows, rc, log, bseeds, bb_acc, fanout_wall=wall if mask else None)
            tr.metrics(parent_id, {**{f"{k}.{r['method']}": r[k] for r in rows
                                      for k in ("mean_test_acc", "std_test_acc", "task_seconds", "artifact_bytes",
                                                "bytes_per_task", "at_chance")
                                      + (("compile_seconds",) if rc.train.compile else ())},
                                   **{f"{k}.{r['method']}": r[k] for r in rows
                                      for k in ("std_backbone_test_acc", f"diff_vs_{_REF}", f"std_diff_vs_{_REF}",
                                                f"t_vs_{_REF}", f"above_{_REF}", f"within_spread_vs_{_REF}",
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
    is still reused (``chain.chain_links`` looks it up by result key and parent chain)."""
    return stable_hash({"compare": compare, "chain": meth, "seed": seed, "backbone_seed": backbone})


def _compare_chain(s: StreamRun, b: int | None, results: dict[str, TaskResult],
                   links: dict[str, dict[str, float]], failures: dict[str, str], log: Log) -> None:
    """One chain of the comparison (``s``: its config, key and the compare's parent run), trained or reused; its
    links' results, their runs' metrics and a failed link go into the comparison's, under :func:`label`. Link 0
    (the initial task) is kept under its own label: :func:`summarise` reads only the new tasks' for the means."""
    meth, seed = s.rc.method.name, s.rc.seed
    c = train_chain(s, log, name=label(meth, seed, "chain", b))
    for r in c.results:
        results[label(meth, seed, r.task, b)] = r
        links[label(meth, seed, r.task, b)] = c.metrics[r.run_id]
    for t, msg in c.failures.items():
        later = c.links - len(c.results) - 1
        failures[label(meth, seed, t, b)] = (f"{msg.splitlines()[0]} (so the chain's {later} later link(s) did "
                                             "not train)")


_REF = "ksm"  # the method every other is paired against


def summarise(results: dict[str, TaskResult], methods: list[str], seeds: list[int], tasks: list[str],
              backbones: list[int] | None = None, links: dict[str, dict[str, float]] | None = None,
              initial: str | None = None) -> list[dict[str, Any]]:
    """Per method: the mean test accuracy over tasks for each (backbone, seed), then its mean and std over those;
    with several backbones also the std over backbones of each backbone's mean; against KSM (when compared) the
    paired difference per (backbone, seed) (:func:`paired`); seconds and artifact bytes per task (means over every
    job); bytes per task (a mask method's artifact; a chain's ``task_bytes``); its bytes as a % of fine-tune's;
    its rank by accuracy. ``backbones`` None: the one backbone, labels without it.

    A sequential method (``runs_as`` "chain"): ``tasks`` are the new tasks, so its chain's link 0 (``initial``,
    the backbone pruned and retrained) is in none of the means, as no mask method trains it; ``links`` (label ->
    the link run's metrics) give its bytes, its ``chain_wall_seconds`` (per (backbone, seed), every link's job
    seconds added up, link 0 included, then their mean), ``initial_task_seconds`` and CPG's ``model_growth``."""
    rows = []
    cells = [(None, s) for s in seeds] if backbones is None else [(b, s) for b in backbones for s in seeds]
    for meth in methods:
        per_seed = [statistics.fmean(results[label(meth, s, t, b)].test_acc for t in tasks) for b, s in cells]
        jobs = [results[label(meth, s, t, b)] for b, s in cells for t in tasks]
        per_bb = [statistics.fmean(v for (b2, _), v in zip(cells, per_seed) if b2 == b) for b in backbones or []]
        rows.append({"method": meth, "mean_test_acc": statistics.fmean(per_seed),
                     "std_test_acc": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                     # the backbone's own share of the spread: each backbone's mean over its seeds, their std
                     "std_backbone_test_acc": statistics.stdev(per_bb) if len(per_bb) > 1 else None,
                     "per_backbone": per_bb, "cells": cells,
                     "task_seconds": statistics.fmean(j.train_seconds for j in jobs),
                     # train.compile: the part of task_seconds that compiled the step (0 without it)
                     "compile_seconds": statistics.fmean(j.compile_seconds or 0.0 for j in jobs),
                     "artifact_bytes": statistics.fmean(j.artifact_bytes for j in jobs), "per_seed": per_seed,
                     # task runs that ended at chance (tag ksm_warning=chance_level): a mean can hide a dead task
                     "at_chance": len(at_chance_tasks(jobs)), "jobs": len(jobs),
                     "per_seed_seconds": [statistics.fmean(results[label(meth, s, t, b)].train_seconds for t in tasks)
                                          for b, s in cells]})
        row = rows[-1]
        row.update(runs_as="fan-out", bytes_per_task=row["artifact_bytes"], chain_wall_seconds=None,
                   initial_task_seconds=None, model_growth=None)
        if meth in SEQUENTIAL_METHODS:
            got = links or {}
            lm = [got[label(meth, s, t, b)] for b, s in cells for t in tasks]
            chain = [initial, *tasks] if initial else tasks
            row.update(runs_as="chain", bytes_per_task=statistics.fmean(x["task_bytes"] for x in lm),
                       chain_wall_seconds=statistics.fmean(sum(got[label(meth, s, t, b)]["job_seconds"] for t in chain)
                                                           for b, s in cells))
            if initial:
                row["initial_task_seconds"] = statistics.fmean(results[label(meth, s, initial, b)].train_seconds
                                                               for b, s in cells)
            if any("model_growth" in x for x in lm):
                row["model_growth"] = statistics.fmean(x.get("model_growth", 0.0) for x in lm)
    ref = next((r for r in rows if r["method"] == _REF), None)
    for r in rows:
        if ref is not None and r is not ref:
            pr = paired(ref["per_seed"], r["per_seed"])
            r.update({f"diff_vs_{_REF}": pr["diff"], f"std_diff_vs_{_REF}": pr["diff_std"], f"t_vs_{_REF}": pr["t"],
                      f"above_{_REF}": pr["above"], "pairs": pr["pairs"],
                      f"within_spread_vs_{_REF}": None if pr["within"] is None else float(pr["within"])})
    ft = next((r["bytes_per_task"] for r in rows if r["method"] == "finetune"), None)
    for rank, r in enumerate(sorted(rows, key=lambda r: -r["mean_test_acc"]), start=1):
        r["rank"] = rank
        r["bytes_vs_finetune"] = 100 * r["bytes_per_task"] / ft if ft else None
    return rows


def time_ratios(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """The paper's speed claims as ratios of seconds per task, ``"a / b" -> (mean, lowest, highest)`` over the
    seeds (each seed's jobs ran interleaved in one fan-out, so a seed's ratio compares like with like): KSM
    against Piggyback, every method against fine-tune, and each sequential method (PackNet, CPG) against KSM
    (the paper's headline: CPG ~10x KSM's time per task), where those were compared."""
    by = {r["method"]: r["per_seed_seconds"] for r in rows}
    pairs = [("ksm", "piggyback")] if {"ksm", "piggyback"} <= set(by) else []
    pairs += [(m, "finetune") for m in by if m != "finetune" and "finetune" in by]
    pairs += [(m, "ksm") for m in by if m in SEQUENTIAL_METHODS and "ksm" in by]
    out = {}
    for a, b in pairs:
        per = [x / y for x, y in zip(by[a], by[b])]
        out[f"{a} / {b}"] = (statistics.fmean(per), min(per), max(per))
    return out


def _ratio_lines(rows: list[dict[str, Any]]) -> str:
    return "\n".join(f"s/task {k}: {m:.3f} (per seed {lo:.3f}-{hi:.3f})"
                     for k, (m, lo, hi) in time_ratios(rows).items())


def _diff_cell(r: dict[str, Any]) -> str:
    d = r.get(f"diff_vs_{_REF}")
    if d is None:
        return "-"
    within = r[f"within_spread_vs_{_REF}"]
    verdict = "" if within is None else (" (within spread)" if within else " (outside spread)")
    return f"{d:+.4f} ± {r[f'std_diff_vs_{_REF}']:.4f}, {r[f'above_{_REF}']}/{r['pairs']} above{verdict}"


def _table(rows: list[dict[str, Any]], seeds: int, markdown: bool = False, backbones: int = 1) -> str:
    """The comparison's table; with a sequential method, also how each method runs, a chain's whole time and
    (CPG) its model growth: the columns a mask-only comparison has always had otherwise."""
    over = f"{seeds} seeds" if backbones == 1 else f"{backbones} backbones x {seeds} seeds"
    paired_col = any(r.get(f"diff_vs_{_REF}") is not None for r in rows)
    chained = any(r.get("runs_as") == "chain" for r in rows)
    growth = any(r.get("model_growth") is not None for r in rows)
    head = ["method", f"test acc (mean ± std, {over})"] + (["std over backbones"] if backbones > 1 else []) + \
        ([f"vs {_REF}, paired (mean ± std of diffs)"] if paired_col else []) + \
        ["at chance", "s/task"] + (["runs as", "whole chain s (link 0's)"] if chained else []) + \
        ["KB/task", "% of fine-tune bytes"] + (["model growth"] if growth else []) + ["rank"]
    cells = [[r["method"], f"{r['mean_test_acc']:.4f} ± {r['std_test_acc']:.4f}"]
             + ([f"{r['std_backbone_test_acc']:.4f}"] if backbones > 1 else [])
             + ([_diff_cell(r)] if paired_col else [])
             + [f"{r['at_chance']}/{r['jobs']}",
                f"{r['task_seconds']:.2f}"
                + (f" ({r['compile_seconds']:.1f} compiling)" if r.get("compile_seconds") else "")]
             + ([_runs_as(r), "-" if r.get("chain_wall_seconds") is None else
                 f"{r['chain_wall_seconds']:.1f} ({r['initial_task_seconds'] or 0:.1f})"] if chained else [])
             + [f"{r.get('bytes_per_task', r['artifact_bytes']) / 1024:.1f}",
                "-" if r["bytes_vs_finetune"] is None else f"{r['bytes_vs_finetune']:.1f}"]
             + (["-" if r.get("model_growth") is None else f"{r['model_growth']:g}"] if growth else [])
             + [str(r["rank"])]
             for r in rows]
    return text_table(head, cells, markdown)


def _runs_as(r: dict[str, Any]) -> str:
    return "chain (serial)" if r.get("runs_as") == "chain" else "fan-out (parallel)"


def _chain_lines(rows: list[dict[str, Any]], fanout_wall: float | None) -> str:
    """What the columns of a comparison with a sequential method mean (empty without one)."""
    if not any(r.get("runs_as") == "chain" for r in rows):
        return ""
    fan = f" (the fan-out took {fanout_wall:.1f} s wall in this launch)" if fanout_wall else ""
    return ("s/task and accuracy are over the new tasks only, for every method: a chain's link 0 (the initial task, "
            "the backbone pruned and retrained, which no mask method trains) is left out of both.\n"
            "A mask method's tasks are independent jobs run side by side in one fan-out" + fan + "; a chain's links "
            "cannot overlap: its whole time is its links' job seconds added up, link 0 included (link 0's training "
            "seconds in brackets).\n"
            "KB/task: a mask method's task artifact; a chain's task_bytes as the papers count them (ownership bits + "
            "BN + head, CPG also its pick bits), not its chain file (artifact_bytes). CPG-lite never grows the "
            "network (model growth 0).")


def _spread_lines(rows: list[dict[str, Any]]) -> str:
    """Each paired difference against KSM in words, read by the rule |mean| <= std of the paired differences."""
    out = []
    for r in rows:
        d = r.get(f"diff_vs_{_REF}")
        if d is None:
            continue
        sd, within, t = r[f"std_diff_vs_{_REF}"], r[f"within_spread_vs_{_REF}"], r[f"t_vs_{_REF}"]
        verdict = "one pair: no spread to judge it by" if within is None else \
            ("within the spread (|mean| <= std of the paired differences)" if within else
             "outside the spread (|mean| > std of the paired differences)")
        out.append(f"{r['method']} - {_REF}: {d:+.4f} ± {sd:.4f} over {r['pairs']} pairs, {r[f'above_{_REF}']} "
                   f"above; {verdict}" + ("" if t is None else f"; paired t = {t:.2f}"))
    return "\n".join(out)


def _report(tr: Any, parent_id: str, rows: list[dict[str, Any]], rc: RunConfig, log: Log,
            bseeds: list[int] | None = None, bb_acc: dict[int, float | None] | None = None,
            fanout_wall: float | None = None) -> None:
    """The table on the console and, with its CSV and plot, on the parent run."""
    seeds = len(rc.compare.seeds)
    bseeds = bseeds or [rc.seed]
    nb = len(bseeds)
    accs = ", ".join(f"seed {b}: {a:.3f}" for b, a in (bb_acc or {}).items() if a is not None)
    log(f"\nCompare '{rc.run_name}' ({rc.benchmark['name']}, {rc.model.name}, {rc.train.epochs} epochs, "
        f"{seeds} seed(s), " + ("one backbone" if nb == 1 else f"{nb} backbones") + (f"; backbone test acc {accs}"
                                                                                      if accs else "") + "):")
    log(_table(rows, seeds, backbones=nb))
    notes = _chain_lines(rows, fanout_wall)
    if notes:
        log(notes)
    spread = _spread_lines(rows)
    if spread:
        log(spread)
    dead = [f"{r['method']} {r['at_chance']}/{r['jobs']}" for r in rows if r["at_chance"]]
    if dead:
        log(f"warning: task runs at chance level (tag ksm_warning=chance_level), per method: {', '.join(dead)}; "
            "their means include tasks that did not learn")
    lines = _ratio_lines(rows)
    if lines:
        log(lines)
    with tempfile.TemporaryDirectory(prefix="ksm-compare-") as tmp:
        out = Path(tmp)
        ratios = "".join(f"\n- {line}" for line in lines.splitlines())
        spreads = "".join(f"\n- {line}" for line in spread.splitlines())
        (out / "compare.md").write_text(
            f"# {rc.run_name}: methods compared\n\n"
            + ("One backbone" if nb == 1 else f"{nb} backbones (seeds {', '.join(map(str, bseeds))})")
            + (f"; backbone test accuracy {accs}" if accs else "") + ".\n\n"
            + f"{_table(rows, seeds, markdown=True, backbones=nb)}\n"
            + "".join(f"\n{line}\n" for line in notes.splitlines())
            + (f"\nPaired differences against {_REF} (a pair shares a backbone and a task seed):\n{spreads}\n"
               if spreads else "")
            + (f"\nTime per task, as ratios:\n{ratios}\n" if ratios else ""))
        with open(out / "compare.csv", "w", newline="") as f:
            w = csv.writer(f)
            keys = ["method", "mean_test_acc", "std_test_acc", "at_chance", "task_seconds", "compile_seconds",
                    "artifact_bytes", "bytes_vs_finetune", "rank", "std_backbone_test_acc", f"diff_vs_{_REF}",
                    f"std_diff_vs_{_REF}", f"t_vs_{_REF}", f"above_{_REF}", f"within_spread_vs_{_REF}",
                    "runs_as", "bytes_per_task", "chain_wall_seconds", "initial_task_seconds", "model_growth"]
            w.writerow(keys)
            w.writerows([[r.get(k) for k in keys] for r in rows])
        plt = pyplot()
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for r in rows:
            kb = r.get("bytes_per_task", r["artifact_bytes"]) / 1024
            ax.errorbar(kb, r["mean_test_acc"], yerr=r["std_test_acc"], fmt="o", capsize=3)
            ax.annotate(r["method"], (kb, r["mean_test_acc"]), fontsize=8, textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("KB per task (log; a chain: task_bytes)")
        ax.set_ylabel(f"mean test accuracy (± std over {seeds} seeds" + (f" x {nb} backbones)" if nb > 1 else ")"))
        ax.grid(alpha=0.3)
        ax2.bar([r["method"] for r in rows], [r["task_seconds"] for r in rows], color="#dd8452")
        ax2.set_ylabel("training seconds per task")
        ax2.tick_params(axis="x", rotation=45)
        fig.suptitle(f"{rc.run_name}: accuracy vs bytes, and time", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "compare.png", dpi=110)
        plt.close(fig)
        tr.artifacts(parent_id, [out / "compare.md", out / "compare.csv", out / "compare.png"], "compare")
