"""What a comparison reports (:mod:`.compare`): per method the mean and std of the mean test accuracy over
backbones x seeds, the paired difference against KSM with its spread (:func:`paired`), seconds, bytes and time
ratios per task (:func:`summarise`, :func:`time_ratios`), and the table with its notes, ``compare.md``,
``compare.csv`` and ``compare.png`` on the parent run (:func:`report`). Pure figures from ``TaskResult``s: no Ray.
"""
from __future__ import annotations

import csv
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .config import SEQUENTIAL_METHODS, RunConfig
from .errors import Log
from .present import pyplot, text_table
from .records import TaskResult
from .report import at_chance_tasks

__all__ = ["REF", "label", "paired", "summarise", "time_ratios", "report"]


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


REF = "ksm"  # the method every other is paired against


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
    ref = next((r for r in rows if r["method"] == REF), None)
    for r in rows:
        if ref is not None and r is not ref:
            pr = paired(ref["per_seed"], r["per_seed"])
            r.update({f"diff_vs_{REF}": pr["diff"], f"std_diff_vs_{REF}": pr["diff_std"], f"t_vs_{REF}": pr["t"],
                      f"above_{REF}": pr["above"], "pairs": pr["pairs"],
                      f"within_spread_vs_{REF}": None if pr["within"] is None else float(pr["within"])})
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
    d = r.get(f"diff_vs_{REF}")
    if d is None:
        return "-"
    within = r[f"within_spread_vs_{REF}"]
    verdict = "" if within is None else (" (within spread)" if within else " (outside spread)")
    return f"{d:+.4f} ± {r[f'std_diff_vs_{REF}']:.4f}, {r[f'above_{REF}']}/{r['pairs']} above{verdict}"


def _table(rows: list[dict[str, Any]], seeds: int, markdown: bool = False, backbones: int = 1) -> str:
    """The comparison's table; with a sequential method, also how each method runs, a chain's whole time and
    (CPG) its model growth: the columns a mask-only comparison has always had otherwise."""
    over = f"{seeds} seeds" if backbones == 1 else f"{backbones} backbones x {seeds} seeds"
    paired_col = any(r.get(f"diff_vs_{REF}") is not None for r in rows)
    chained = any(r.get("runs_as") == "chain" for r in rows)
    growth = any(r.get("model_growth") is not None for r in rows)
    head = ["method", f"test acc (mean ± std, {over})"] + (["std over backbones"] if backbones > 1 else []) + \
        ([f"vs {REF}, paired (mean ± std of diffs)"] if paired_col else []) + \
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
        d = r.get(f"diff_vs_{REF}")
        if d is None:
            continue
        sd, within, t = r[f"std_diff_vs_{REF}"], r[f"within_spread_vs_{REF}"], r[f"t_vs_{REF}"]
        verdict = "one pair: no spread to judge it by" if within is None else \
            ("within the spread (|mean| <= std of the paired differences)" if within else
             "outside the spread (|mean| > std of the paired differences)")
        out.append(f"{r['method']} - {REF}: {d:+.4f} ± {sd:.4f} over {r['pairs']} pairs, {r[f'above_{REF}']} "
                   f"above; {verdict}" + ("" if t is None else f"; paired t = {t:.2f}"))
    return "\n".join(out)


def report(tr: Any, parent_id: str, rows: list[dict[str, Any]], rc: RunConfig, log: Log,
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
            + (f"\nPaired differences against {REF} (a pair shares a backbone and a task seed):\n{spreads}\n"
               if spreads else "")
            + (f"\nTime per task, as ratios:\n{ratios}\n" if ratios else ""))
        with open(out / "compare.csv", "w", newline="") as f:
            w = csv.writer(f)
            keys = ["method", "mean_test_acc", "std_test_acc", "at_chance", "task_seconds", "compile_seconds",
                    "artifact_bytes", "bytes_vs_finetune", "rank", "std_backbone_test_acc", f"diff_vs_{REF}",
                    f"std_diff_vs_{REF}", f"t_vs_{REF}", f"above_{REF}", f"within_spread_vs_{REF}",
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
