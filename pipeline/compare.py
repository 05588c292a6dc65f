"""mode=compare: the paper's Tables 1 and 4 on the user's own stream. Every method x seed adapts ONE shared
backbone to every new task, in one Ray fan-out with the methods interleaved (so a noisy machine slows them
alike), reusing any result already trained. The parent run (``ksm_kind=compare``) gets per method the mean and
std over seeds of the mean test accuracy, the seconds and artifact bytes per task, a table and a plot.

    python run_pipeline.py mode=compare compare.methods=[ksm,piggyback,finetune] compare.seeds=[0,1,2]

A seed here seeds the tasks' training (mask/head init, data order); the backbone is the run's own (``seed``).
A method is trained with the run's ``method`` settings when it is the run's method, else with its reference
values.
"""
from __future__ import annotations

import csv
import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ksm_core import METHODS, mask_spec

from .config import MethodCfg, RunConfig, stable_hash
from .errors import Log, PipelineError
from .jobs import JobContext, warm_worker
from .fanout import Job, fan_out
from .identity import backbone_key, result_key
from .lineage import check_inputs, prepare
from .present import pyplot, text_table
from .records import TaskResult
from .report import at_chance_tasks
from .runtime import check_cluster, check_fits_before_ray, job_resources, ray_session, warm_workers
from .sequence import backbone_stage

__all__ = ["check_compare", "run_compare", "summarise", "method_settings"]


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
    methods, seeds = list(rc.compare.methods), list(rc.compare.seeds)
    check_fits_before_ray(rc.cluster, *job_resources(rc))
    m = check_inputs(rc, log)
    with ray_session(rc.cluster, log):
        check_cluster(rc)
        warm_workers(warm_worker, rc.cluster, len(m.new_tasks) * len(methods) * len(seeds))
        p = prepare(rc, log, manifest=m)
        tr = p.tracker
        key = stable_hash({"name": rc.run_name, "backbone": backbone_key(rc, m), "methods": methods, "seeds": seeds,
                           "tasks": [m.task(t).identity for t in m.new_tasks], "train": rc.train_identity(),
                           "data_opts": rc.data_identity()})
        parent = tr.find_one(None, ksm_kind="compare", ksm_compare=key)
        parent_id = parent.info.run_id if parent is not None else tr.start(
            f"compare-{rc.run_name}", {"ksm_kind": "compare", "ksm_compare": key})
        tr.reopen(parent_id)
        with tr.running(parent_id):  # FINISHED; KILLED when stopped; FAILED when a job or anything else failed
            state, fp, bb_run = backbone_stage(p, log)
            tr.tags(parent_id, {"ksm_backbone_run": bb_run, "ksm_fingerprint": fp})
            tr.params(parent_id, {"run_name": rc.run_name, "benchmark": rc.benchmark["name"], "methods": ",".join(methods),
                                  "seeds": ",".join(map(str, seeds)), "tasks": ",".join(m.new_tasks),
                                  "epochs": rc.train.epochs, "model": rc.model.name, "model_width": rc.model.width})
            configs = {(meth, s): dataclasses.replace(rc, method=method_settings(rc, meth), seed=s)
                       for meth in methods for s in seeds}
            # interleaved: every method's job for a task is queued before the next task's, so methods share the
            # machine's good and bad moments alike
            jobs = [Job(f"{meth}/{s}/{t}", t, c, result_key(c, fp, m.task(t).identity))
                    for t in m.new_tasks for s in seeds for meth in methods for c in [configs[(meth, s)]]]
            ctx = JobContext(manifest=str(m.path), experiment_id=tr.experiment_id, parent_run_id=parent_id,
                             sequence_key=key, backbone_fingerprint=fp, backbone_run_id=bb_run)
            results, failures, wall = fan_out(jobs, ctx, state, tr, rc.progress, log)
            if failures:
                lines = "\n".join(f"  {label}: {msg.splitlines()[0][:300]}" for label, msg in failures.items())
                raise PipelineError(f"{len(failures)} job(s) failed (the others are saved; re-run the same command to "
                                    f"retry only these):\n{lines}")
            rows = summarise(results, methods, seeds, m.new_tasks)
            _report(tr, parent_id, rows, rc, log)
            tr.metrics(parent_id, {**{f"{k}.{r['method']}": r[k] for r in rows
                                      for k in ("mean_test_acc", "std_test_acc", "task_seconds", "artifact_bytes",
                                                "at_chance")
                                      + (("compile_seconds",) if rc.train.compile else ())},
                                   **{f"time_ratio.{k.replace(' / ', '_vs_')}": v[0]
                                      for k, v in time_ratios(rows).items()},
                                   "fanout_wall_seconds": wall})
    return {"parent_run_id": parent_id, "rows": rows, "results": results, "experiment_id": tr.experiment_id,
            "backbone_run_id": bb_run}


def summarise(results: dict[str, TaskResult], methods: list[str], seeds: list[int],
              tasks: list[str]) -> list[dict[str, Any]]:
    """Per method: the mean test accuracy over tasks for each seed, then its mean and std over seeds; seconds and
    artifact bytes per task (means over every job); its bytes as a % of fine-tune's; its rank by accuracy."""
    rows = []
    for meth in methods:
        per_seed = [statistics.fmean(results[f"{meth}/{s}/{t}"].test_acc for t in tasks) for s in seeds]
        jobs = [results[f"{meth}/{s}/{t}"] for s in seeds for t in tasks]
        rows.append({"method": meth, "mean_test_acc": statistics.fmean(per_seed),
                     "std_test_acc": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                     "task_seconds": statistics.fmean(j.train_seconds for j in jobs),
                     # train.compile: the part of task_seconds that compiled the step (0 without it)
                     "compile_seconds": statistics.fmean(j.compile_seconds or 0.0 for j in jobs),
                     "artifact_bytes": statistics.fmean(j.artifact_bytes for j in jobs), "per_seed": per_seed,
                     # task runs that ended at chance (tag ksm_warning=chance_level): a mean can hide a dead task
                     "at_chance": len(at_chance_tasks(jobs)), "jobs": len(jobs),
                     "per_seed_seconds": [statistics.fmean(results[f"{meth}/{s}/{t}"].train_seconds for t in tasks)
                                          for s in seeds]})
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


def _table(rows: list[dict[str, Any]], seeds: int, markdown: bool = False) -> str:
    head = ["method", f"test acc (mean ± std, {seeds} seeds)", "at chance", "s/task", "KB/task", "% of fine-tune bytes",
            "rank"]
    cells = [[r["method"], f"{r['mean_test_acc']:.4f} ± {r['std_test_acc']:.4f}", f"{r['at_chance']}/{r['jobs']}",
              f"{r['task_seconds']:.2f}"
              + (f" ({r['compile_seconds']:.1f} compiling)" if r.get("compile_seconds") else ""),
              f"{r['artifact_bytes'] / 1024:.1f}",
              "-" if r["bytes_vs_finetune"] is None else f"{r['bytes_vs_finetune']:.1f}", str(r["rank"])]
             for r in rows]
    return text_table(head, cells, markdown)


def _report(tr: Any, parent_id: str, rows: list[dict[str, Any]], rc: RunConfig, log: Log) -> None:
    """The table on the console and, with its CSV and plot, on the parent run."""
    seeds = len(rc.compare.seeds)
    log(f"\nCompare '{rc.run_name}' ({rc.benchmark['name']}, {rc.model.name}, {rc.train.epochs} epochs, "
        f"{seeds} seed(s), one backbone):")
    log(_table(rows, seeds))
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
        (out / "compare.md").write_text(f"# {rc.run_name}: methods compared\n\n{_table(rows, seeds, markdown=True)}\n"
                                        + (f"\nTime per task, as ratios:\n{ratios}\n" if ratios else ""))
        with open(out / "compare.csv", "w", newline="") as f:
            w = csv.writer(f)
            keys = ["method", "mean_test_acc", "std_test_acc", "at_chance", "task_seconds", "compile_seconds",
                    "artifact_bytes", "bytes_vs_finetune", "rank"]
            w.writerow(keys)
            w.writerows([[r[k] for k in keys] for r in rows])
        plt = pyplot()
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for r in rows:
            ax.errorbar(r["artifact_bytes"] / 1024, r["mean_test_acc"], yerr=r["std_test_acc"], fmt="o", capsize=3)
            ax.annotate(r["method"], (r["artifact_bytes"] / 1024, r["mean_test_acc"]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("artifact KB per task (log)")
        ax.set_ylabel(f"mean test accuracy (± std over {seeds} seeds)")
        ax.grid(alpha=0.3)
        ax2.bar([r["method"] for r in rows], [r["task_seconds"] for r in rows], color="#dd8452")
        ax2.set_ylabel("training seconds per task")
        ax2.tick_params(axis="x", rotation=45)
        fig.suptitle(f"{rc.run_name}: accuracy vs bytes, and time", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "compare.png", dpi=110)
        plt.close(fig)
        tr.artifacts(parent_id, [out / "compare.md", out / "compare.csv", out / "compare.png"], "compare")
