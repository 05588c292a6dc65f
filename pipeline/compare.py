"""mode=compare: the paper's Tables 1 and 4 on the user's own stream. Every method x seed adapts each backbone
(one per ``compare.backbone_seeds``, by default the run's own ``seed``: one) to every new task, in one Ray fan-out
per backbone with the methods interleaved (so a noisy machine slows them alike), reusing any backbone and any
result already trained. The parent run (``ksm_kind=compare``) gets per method the mean and std over backbones x
seeds of the mean test accuracy, its paired difference against KSM (pairs share a backbone and a task seed) with
the std of those differences, the seconds and artifact bytes per task, a table and a plot.

    python run_pipeline.py mode=compare compare.methods=[ksm,piggyback,finetune] compare.seeds=[0,1,2] \
        compare.backbone_seeds=[0,1,2]

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

from .config import MethodCfg, RunConfig, stable_hash
from .errors import Log, PipelineError
from .jobs import JobContext
from .fanout import Job, fan_out
from .identity import backbone_key, result_key
from .present import pyplot, text_table
from .records import TaskResult
from .report import at_chance_tasks
from .sequence import backbone_stage, driving

__all__ = ["check_compare", "run_compare", "summarise", "method_settings", "backbone_seeds", "paired", "label"]


def check_compare(rc: RunConfig) -> None:
    """The ``compare`` section, before any work: known methods, at least one, and a non-empty list of seeds."""
    methods, seeds = list(rc.compare.methods), list(rc.compare.seeds)
    if not methods:
        raise PipelineError(f"compare.methods is empty; give at least one of {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise PipelineError(f"compare.methods: {m!r} is not a method; valid methods: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise PipelineError(f"compare.methods={methods} names a method twice")
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
    fine-tune), so each method is compared at its own best-known settings, not at another method's."""
    if name == rc.method.name:
        return rc.method
    if name == "finetune":
        return MethodCfg(name=name)
    spec = mask_spec(name)
    return MethodCfg(name=name, tau=spec.tau, k=spec.k, T=spec.T, init=spec.init)


def run_compare(rc: RunConfig, log: Log = print) -> dict[str, Any]:
    """mode=compare (checked by :func:`check_compare`); returns {"parent_run_id", "rows", "results", ...}."""
    methods, seeds, bseeds = list(rc.compare.methods), list(rc.compare.seeds), backbone_seeds(rc)
    one = bseeds == [rc.seed]  # today's comparison on the run's own backbone: its key and labels as before
    # one job per new task (the stream's tasks but its initial one) x method x seed x backbone
    with driving(rc, log, warm=lambda n: (n - 1) * len(methods) * len(seeds) * len(bseeds)) as p:
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
                        for t in m.new_tasks for s in seeds for meth in methods for c in [configs[(meth, s)]]]
                ctx = JobContext(manifest=str(m.path), experiment_id=tr.experiment_id, parent_run_id=parent_id,
                                 sequence_key=key, backbone_fingerprint=fp, backbone_run_id=bb_run)
                res, fails, w = fan_out(jobs, ctx, state, tr, rc.progress, log)
                results.update(res)
                failures.update(fails)
                wall += w
                del state  # this backbone's weights: the next one's replace them, not join them
            tr.tags(parent_id, {"ksm_backbone_runs": ",".join(bb_runs[b] for b in bseeds)})
            if failures:
                lines = "\n".join(f"  {lab}: {msg.splitlines()[0][:300]}" for lab, msg in failures.items())
                raise PipelineError(f"{len(failures)} job(s) failed (the others are saved; re-run the same command to "
                                    f"retry only these):\n{lines}")
            rows = summarise(results, methods, seeds, m.new_tasks, None if one else bseeds)
            _report(tr, parent_id, rows, rc, log, bseeds, bb_acc)
            tr.metrics(parent_id, {**{f"{k}.{r['method']}": r[k] for r in rows
                                      for k in ("mean_test_acc", "std_test_acc", "task_seconds", "artifact_bytes",
                                                "at_chance")
                                      + (("compile_seconds",) if rc.train.compile else ())},
                                   **{f"{k}.{r['method']}": r[k] for r in rows
                                      for k in ("std_backbone_test_acc", f"diff_vs_{_REF}", f"std_diff_vs_{_REF}",
                                                f"t_vs_{_REF}", f"above_{_REF}", f"within_spread_vs_{_REF}")
                                      if r.get(k) is not None},
                                   **{f"backbone_test_acc.{b}": a for b, a in bb_acc.items() if a is not None},
                                   **{f"time_ratio.{k.replace(' / ', '_vs_')}": v[0]
                                      for k, v in time_ratios(rows).items()},
                                   "fanout_wall_seconds": wall})
    return {"parent_run_id": parent_id, "rows": rows, "results": results, "experiment_id": tr.experiment_id,
            "backbone_run_id": bb_runs[bseeds[0]], "backbone_run_ids": bb_runs}


_REF = "ksm"  # the method every other is paired against


def summarise(results: dict[str, TaskResult], methods: list[str], seeds: list[int], tasks: list[str],
              backbones: list[int] | None = None) -> list[dict[str, Any]]:
    """Per method: the mean test accuracy over tasks for each (backbone, seed), then its mean and std over those;
    with several backbones also the std over backbones of each backbone's mean; against KSM (when compared) the
    paired difference per (backbone, seed) (:func:`paired`); seconds and artifact bytes per task (means over every
    job); its bytes as a % of fine-tune's; its rank by accuracy. ``backbones`` None: the one backbone, labels
    without it."""
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
    ref = next((r for r in rows if r["method"] == _REF), None)
    for r in rows:
        if ref is not None and r is not ref:
            pr = paired(ref["per_seed"], r["per_seed"])
            r.update({f"diff_vs_{_REF}": pr["diff"], f"std_diff_vs_{_REF}": pr["diff_std"], f"t_vs_{_REF}": pr["t"],
                      f"above_{_REF}": pr["above"], "pairs": pr["pairs"],
                      f"within_spread_vs_{_REF}": None if pr["within"] is None else float(pr["within"])})
    ft = next((r["artifact_bytes"] for r in rows if r["method"] == "finetune"), None)
    for rank, r in enumerate(sorted(rows, key=lambda r: -r["mean_test_acc"]), start=1):
        r["rank"] = rank
        r["bytes_vs_finetune"] = 100 * r["artifact_bytes"] / ft if ft else None
    return rows


def time_ratios(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """The paper's speed claims as ratios of seconds per task, ``"a / b" -> (mean, lowest, highest)`` over the
    seeds (each seed's jobs ran interleaved in one fan-out, so a seed's ratio compares like with like): KSM
    against Piggyback, and every method against fine-tune, where those were compared."""
    by = {r["method"]: r["per_seed_seconds"] for r in rows}
    pairs = [("ksm", "piggyback")] if {"ksm", "piggyback"} <= set(by) else []
    pairs += [(m, "finetune") for m in by if m != "finetune" and "finetune" in by]
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
    over = f"{seeds} seeds" if backbones == 1 else f"{backbones} backbones x {seeds} seeds"
    paired_col = any(r.get(f"diff_vs_{_REF}") is not None for r in rows)
    head = ["method", f"test acc (mean ± std, {over})"] + (["std over backbones"] if backbones > 1 else []) + \
        ([f"vs {_REF}, paired (mean ± std of diffs)"] if paired_col else []) + \
        ["at chance", "s/task", "KB/task", "% of fine-tune bytes", "rank"]
    cells = [[r["method"], f"{r['mean_test_acc']:.4f} ± {r['std_test_acc']:.4f}"]
             + ([f"{r['std_backbone_test_acc']:.4f}"] if backbones > 1 else [])
             + ([_diff_cell(r)] if paired_col else [])
             + [f"{r['at_chance']}/{r['jobs']}",
              f"{r['task_seconds']:.2f}"
              + (f" ({r['compile_seconds']:.1f} compiling)" if r.get("compile_seconds") else ""),
              f"{r['artifact_bytes'] / 1024:.1f}",
              "-" if r["bytes_vs_finetune"] is None else f"{r['bytes_vs_finetune']:.1f}", str(r["rank"])]
             for r in rows]
    return text_table(head, cells, markdown)


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
            bseeds: list[int] | None = None, bb_acc: dict[int, float | None] | None = None) -> None:
    """The table on the console and, with its CSV and plot, on the parent run."""
    seeds = len(rc.compare.seeds)
    bseeds = bseeds or [rc.seed]
    nb = len(bseeds)
    accs = ", ".join(f"seed {b}: {a:.3f}" for b, a in (bb_acc or {}).items() if a is not None)
    log(f"\nCompare '{rc.run_name}' ({rc.benchmark['name']}, {rc.model.name}, {rc.train.epochs} epochs, "
        f"{seeds} seed(s), " + ("one backbone" if nb == 1 else f"{nb} backbones") + (f"; backbone test acc {accs}"
                                                                                      if accs else "") + "):")
    log(_table(rows, seeds, backbones=nb))
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
            + (f"\nPaired differences against {_REF} (a pair shares a backbone and a task seed):\n{spreads}\n"
               if spreads else "")
            + (f"\nTime per task, as ratios:\n{ratios}\n" if ratios else ""))
        with open(out / "compare.csv", "w", newline="") as f:
            w = csv.writer(f)
            keys = ["method", "mean_test_acc", "std_test_acc", "at_chance", "task_seconds", "compile_seconds",
                    "artifact_bytes", "bytes_vs_finetune", "rank", "std_backbone_test_acc", f"diff_vs_{_REF}",
                    f"std_diff_vs_{_REF}", f"t_vs_{_REF}", f"above_{_REF}", f"within_spread_vs_{_REF}"]
            w.writerow(keys)
            w.writerows([[r.get(k) for k in keys] for r in rows])
        plt = pyplot()
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for r in rows:
            ax.errorbar(r["artifact_bytes"] / 1024, r["mean_test_acc"], yerr=r["std_test_acc"], fmt="o", capsize=3)
            ax.annotate(r["method"], (r["artifact_bytes"] / 1024, r["mean_test_acc"]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("artifact KB per task (log)")
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
