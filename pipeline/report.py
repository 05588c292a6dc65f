"""The end-of-sequence report: per-task table (console, markdown, CSV) and plots, logged to the parent run.

Plots: test accuracy per task, fraction of kept kernels per layer for each task (the paper's Fig. 6), and
training time per task.

A stream of more than ``SUMMARY_ABOVE`` tasks is summarised instead (console and report.md): counts (trained,
reused, failed), the test accuracy and training seconds per task as quantiles, totals, and the worst tasks by
accuracy; report.csv still holds one row per task, and one figure (report.png) shows the two distributions and
the kept-kernel ratio per layer as a band. It works from the per-task records alone, nothing per task beyond them.
"""
from __future__ import annotations

import csv
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import Log
from .present import pyplot, text_table
from .records import TaskResult

__all__ = ["format_table", "write_report", "summarise", "at_chance_lines", "at_chance_tasks", "CHANCE_LEVEL",
           "SUMMARY_ABOVE", "WORST"]

#: (TaskResult attribute, heading) of the table's and report.csv's columns
COLUMNS = [("task", "task"), ("classes", "classes"), ("test_acc", "test acc"), ("train_seconds", "train s"),
           ("artifact_kb", "artifact KB"), ("mask_ones", "ones"), ("mask_soft", "soft"), ("node", "node"),
           ("status", "status")]
#: the ``ksm_warning`` (and ``ksm_retrained``) tag value of a task that ended within train.chance_margin of chance
CHANCE_LEVEL = "chance_level"
SUMMARY_ABOVE = 50  # more tasks than this: the report summarises instead of listing every task
WORST = 10          # how many of the lowest-accuracy tasks a summary lists
QUANTILES = [("min", 0.0), ("p10", 0.1), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p90", 0.9),
             ("max", 1.0)]


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in ("test_acc", "mask_ones", "mask_soft"):
        return f"{v:.3f}"
    if key in ("train_seconds", "artifact_kb"):
        return f"{v:.1f}"
    return str(v)


def format_table(results: list[TaskResult], markdown: bool = False) -> str:
    # the warning column only when a task has one: a task at chance must stand out, not be one more blank column
    cols = COLUMNS + ([("warning", "warning")] if any(r.warning for r in results) else [])
    return text_table([h for _, h in cols], [[_fmt(k, getattr(r, k)) for k, _ in cols] for r in results], markdown)


def at_chance_tasks(results: list[TaskResult]) -> list[TaskResult]:
    """The task records tagged ksm_warning=chance_level (``TaskResult.warning``), in order."""
    return [r for r in results if r.warning == CHANCE_LEVEL]


def at_chance_lines(results: list[TaskResult], rc: RunConfig) -> list[str]:
    """The warning a report prints for the tasks that ended at chance (tag ksm_warning=chance_level): their
    count, then each (the first WORST), and what to do. Empty when there are none."""
    hit = at_chance_tasks(results)
    if not hit:
        return []
    lines = [f"warning: {len(hit)} task(s) ended at chance level (test accuracy within train.chance_margin="
             f"{rc.train.chance_margin:g} of 1 / classes): they did not learn. Train longer (train.epochs), or set "
             "train.retrain_at_chance=true to train such a task once more with another seed"]
    lines += [f"  {r.task}: test acc {_fmt('test_acc', r.test_acc)}" + (" (after a retrain)" if r.retrained else "")
              for r in hit[:WORST]]
    return lines


def _plots(rows: list[TaskResult], out: Path) -> list[Path]:
    plt = pyplot()

    paths = []
    names = [r.task for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(rows) + 2), 3.2))
    ax.bar(names, [r.test_acc or 0 for r in rows], color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy per task")
    for i, r in enumerate(rows):
        ax.text(i, (r.test_acc or 0) + 0.01, f"{(r.test_acc or 0):.3f}", ha="center", fontsize=8)
    fig.tight_layout()
    paths.append(out / "accuracy_per_task.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in rows:
        if r.layers:
            ax.plot(range(len(r.layers)), list(r.layers.values()), marker="o", ms=3, label=r.task)
    any_layers = next((r.layers for r in rows if r.layers), {})
    ax.set_xticks(range(len(any_layers)))
    ax.set_xticklabels([f"{i}" for i in range(len(any_layers))], fontsize=7)
    ax.set_xlabel("masked layer (conv layers, then hidden linear layers)")
    ax.set_ylabel("fraction of kept kernels (Mb = 1)")
    ax.set_ylim(0, 1.05)
    ax.set_title("mask ratio per layer")
    if any_layers and len(rows) <= 12:  # beyond that a legend covers the plot: the lines speak as a band
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "mask_ratio_per_layer.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(rows) + 2), 3.2))
    ax.bar(names, [r.train_seconds or 0 for r in rows], color="#dd8452")
    ax.set_ylabel("training seconds")
    ax.set_title("training time per task")
    fig.tight_layout()
    paths.append(out / "training_time_per_task.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _write_csv(path: Path, results: list[TaskResult]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _ in COLUMNS] + ["warning", "run_id"])
        for r in results:  # the table's columns, unformatted, one row at a time
            w.writerow([getattr(r, k) for k, _ in COLUMNS] + [r.warning, r.run_id])


def _quantiles(values: list[float]) -> dict[str, float]:
    """min, p10 ... max (linear interpolation between order statistics) and the mean; empty for no values."""
    if not values:
        return {}
    v = sorted(values)
    out = {"mean": sum(v) / len(v)}
    for name, q in QUANTILES:
        pos = q * (len(v) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        out[name] = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    return out


def _worst(results: list[TaskResult], n: int = WORST) -> list[TaskResult]:
    """The n tasks with the lowest test accuracy (ties in stream order)."""
    scored = [(r.test_acc, i) for i, r in enumerate(results) if r.test_acc is not None]
    return [results[i] for _, i in sorted(scored)[:n]]


def summarise(results: list[TaskResult], failures: Mapping[str, str] | None = None,
              wall_seconds: float | None = None) -> dict[str, Any]:
    """The numbers a summary shows: counts, distributions, totals and the worst tasks."""
    statuses = [r.status for r in results]
    accs = [r.test_acc for r in results if r.test_acc is not None]
    secs = [r.train_seconds for r in results if r.train_seconds is not None]
    return {
        "tasks": len(results), "trained": statuses.count("trained"), "reused": statuses.count("reused"),
        "failed": len(failures or {}) + statuses.count("failed"),
        "accuracy": _quantiles(accs), "seconds": _quantiles(secs),
        "total_train_seconds": sum(secs), "total_artifact_bytes": sum(r.artifact_bytes or 0 for r in results),
        "fanout_wall_seconds": wall_seconds, "worst": _worst(results),
        "skipped_samples": sum(r.skipped_samples for r in results),
        "at_chance": len(at_chance_tasks(results)),
    }


def _summary_lines(s: dict[str, Any], failures: Mapping[str, str] | None, markdown: bool = False) -> list[str]:
    def dist(q: dict[str, float], fmt: str) -> str:
        if not q:
            return "-"
        return f"mean {q['mean']:{fmt}}; " + ", ".join(f"{name} {q[name]:{fmt}}" for name, _ in QUANTILES)

    b = "- " if markdown else "  "
    lines = [f"{b}tasks: {s['tasks']} reported ({s['trained']} trained, {s['reused']} reused), {s['failed']} failed",
             f"{b}test accuracy: {dist(s['accuracy'], '.3f')}",
             f"{b}training seconds per task: {dist(s['seconds'], '.1f')}",
             f"{b}totals: training {s['total_train_seconds']:.1f} s, "
             f"artifacts {s['total_artifact_bytes'] / 1024:.1f} KB"
             + (f", fan-out wall {s['fanout_wall_seconds']:.1f} s" if s["fanout_wall_seconds"] is not None else "")]
    if failures:
        lines.append(f"{b}failed tasks (first {min(WORST, len(failures))} of {len(failures)}; re-run the same "
                     "command to retry only these):")
        lines += [f"    {t}: {msg.splitlines()[0][:200] if msg else ''}" for t, msg in list(failures.items())[:WORST]]
    return lines


def _summary_plot(results: list[TaskResult], out: Path) -> Path:
    """report.png: the accuracy and seconds-per-task histograms and the kept-kernel ratio per layer as a band."""
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    accs = [r.test_acc for r in results if r.test_acc is not None]
    secs = [r.train_seconds for r in results if r.train_seconds is not None]
    ax = axes[0]
    ax.hist(accs, bins=min(40, max(5, len(accs) // 10)), range=(0, 1), color="#4c72b0")
    ax.set_xlabel("test accuracy")
    ax.set_ylabel("tasks")
    ax.set_title(f"accuracy over {len(accs)} tasks")
    ax = axes[1]
    ax.hist(secs, bins=min(40, max(5, len(secs) // 10)), color="#dd8452")
    ax.set_xlabel("training seconds per task")
    ax.set_ylabel("tasks")
    ax.set_title("training time per task")
    ax = axes[2]
    layered = [list(r.layers.values()) for r in results if r.layers]
    width = max((len(v) for v in layered), default=0)
    layered = [v for v in layered if len(v) == width]
    if layered:
        a = np.asarray(layered, dtype=np.float32)  # tasks x layers: a few floats per task
        x = np.arange(width)
        ax.fill_between(x, np.quantile(a, 0.1, axis=0), np.quantile(a, 0.9, axis=0), alpha=0.3, color="#55a868",
                        label="p10-p90")
        ax.plot(x, np.median(a, axis=0), marker="o", ms=3, color="#55a868", label="median")
        ax.legend(fontsize=7)
    ax.set_xlabel("masked layer (conv layers, then hidden linear layers)")
    ax.set_ylabel("fraction of kept kernels (Mb = 1)")
    ax.set_ylim(0, 1.05)
    ax.set_title("mask ratio per layer")
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_summary_report(tracker: Any, parent_id: str, results: list[TaskResult], rc: RunConfig,
                          log: Log, wall_seconds: float | None,
                          failures: Mapping[str, str] | None) -> dict[str, Any]:
    s = summarise(results, failures, wall_seconds)
    head = f"Sequence '{rc.run_name}' ({rc.benchmark['name']}, {rc.method.name}, {rc.model.name})"
    worst_title = f"worst {len(s['worst'])} task(s) by test accuracy:"
    lossy = [r for r in results if r.skipped_samples]
    lossy_lines = [f"{r.task}: {r.skipped_samples} sample(s) skipped from corrupt shard(s) {r.skipped_shards}"
                   for r in lossy[:WORST]]
    log("")
    log(f"{head}: {s['tasks']} tasks, summarised (one row per task in report.csv on run {parent_id}):")
    for line in _summary_lines(s, failures):
        log(line)
    log(f"  {worst_title}")
    log(format_table(s["worst"]))
    chance = at_chance_lines(results, rc)
    for line in chance:
        log(line)
    if lossy:
        log(f"warning: data.on_corrupt=skip dropped data in {len(lossy)} task(s), {s['skipped_samples']} sample(s); "
            "re-create the shards (mode=shards) to train on all of it")
        for line in lossy_lines:
            log(f"  {line}")
    summary = {
        "mean_test_acc": s["accuracy"].get("mean"), "total_train_seconds": s["total_train_seconds"],
        "total_artifact_bytes": s["total_artifact_bytes"], "tasks": s["tasks"],
        "tasks_trained": s["trained"], "tasks_reused": s["reused"], "tasks_failed": s["failed"],
        "tasks_at_chance": s["at_chance"],
        **{f"test_acc_{k}": v for k, v in s["accuracy"].items() if k != "mean"},
        **{f"train_seconds_{k}": v for k, v in s["seconds"].items()},
    }
    if wall_seconds is not None:
        summary["fanout_wall_seconds"] = wall_seconds
    if lossy:
        summary["skipped_samples"] = s["skipped_samples"]
    with tempfile.TemporaryDirectory(prefix="ksm-report-") as tmp:
        out = Path(tmp)
        md = [f"# {rc.run_name}", "", f"{head}: {s['tasks']} tasks, summarised; one row per task in report.csv.",
              "", *_summary_lines(s, failures, markdown=True), "", f"## {worst_title[:-1]}", "",
              format_table(s["worst"], markdown=True), "", "![distributions](report.png)", ""]
        if lossy:
            md += [f"- skipped: {line}" for line in lossy_lines] + [""]
        if chance:
            md += [f"- {line.strip()}" for line in chance] + [""]
        (out / "report.md").write_text("\n".join(md))
        _write_csv(out / "report.csv", results)
        files = [out / "report.md", out / "report.csv"]
        if results:
            files.append(_summary_plot(results, out))
        tracker.artifacts(parent_id, files, "report")
    tracker.metrics(parent_id, {k: v for k, v in summary.items() if v is not None})
    return summary


def write_report(tracker: Any, parent_id: str, results: list[TaskResult], rc: RunConfig,
                 log: Log = print, wall_seconds: float | None = None,
                 failures: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Print the table and log report.md / report.csv / plots to the parent run; returns summary numbers.

    Above ``SUMMARY_ABOVE`` tasks: a summary instead of the table (see the module's doc); ``failures`` (task ->
    message) are then counted and the first ones listed. Up to that, the report is the per-task table."""
    if len(results) > SUMMARY_ABOVE:
        return _write_summary_report(tracker, parent_id, results, rc, log, wall_seconds, failures)
    table = format_table(results)
    log("")
    log(f"Sequence '{rc.run_name}' ({rc.benchmark['name']}, {rc.method.name}, {rc.model.name}):")
    log(table)
    accs = [r.test_acc for r in results if r.test_acc is not None]
    summary = {
        "mean_test_acc": sum(accs) / len(accs) if accs else None,
        "total_train_seconds": sum(r.train_seconds or 0 for r in results),
        "total_artifact_bytes": sum(r.artifact_bytes or 0 for r in results),
        "tasks": len(results),
    }
    if wall_seconds is not None:
        summary["fanout_wall_seconds"] = wall_seconds
    if accs:
        log(f"mean test accuracy {summary['mean_test_acc']:.3f} over {len(accs)} task(s); "
            f"total training {summary['total_train_seconds']:.1f} s; "
            f"artifacts {summary['total_artifact_bytes'] / 1024:.1f} KB")
    chance = at_chance_lines(results, rc)
    summary["tasks_at_chance"] = len(at_chance_tasks(results))
    for line in chance:
        log(line)
    lossy = [f"{r.task}: {r.skipped_samples} sample(s) skipped from corrupt shard(s) {r.skipped_shards}"
             for r in results if r.skipped_samples]
    if lossy:  # data.on_corrupt=skip: the accuracies above saw less data than the manifest promises
        summary["skipped_samples"] = sum(r.skipped_samples for r in results)
        log("warning: data.on_corrupt=skip dropped data; re-create the shards (mode=shards) to train on all of it")
        for line in lossy:
            log(f"  {line}")
    with tempfile.TemporaryDirectory(prefix="ksm-report-") as tmp:
        out = Path(tmp)
        notes = "".join(f"\n- skipped: {line}" for line in lossy) + "".join(f"\n- {line.strip()}" for line in chance)
        (out / "report.md").write_text(f"# {rc.run_name}\n\n" + format_table(results, markdown=True) + "\n"
                                       + (notes + "\n" if notes else ""))
        _write_csv(out / "report.csv", results)
        files = [out / "report.md", out / "report.csv"]
        if results:
            files += _plots(results, out)
        tracker.artifacts(parent_id, files, "report")
    tracker.metrics(parent_id, {k: v for k, v in summary.items() if v is not None})
    return summary
