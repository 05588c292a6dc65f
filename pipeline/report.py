"""The end-of-sequence report: per-task table (console, markdown, CSV) and plots, logged to the parent run.

Plots: test accuracy per task, fraction of kept kernels per layer for each task (the paper's Fig. 6), and
training time per task.
"""
from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import RunConfig
from .present import pyplot, text_table

__all__ = ["format_table", "write_report"]

COLUMNS = [("task", "task"), ("classes", "classes"), ("test_acc", "test acc"), ("train_seconds", "train s"),
           ("artifact_kb", "artifact KB"), ("mask_ones", "ones"), ("mask_soft", "soft"), ("node", "node"),
           ("status", "status")]


def _rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        row = dict(r)
        row["artifact_kb"] = (r.get("artifact_bytes") or 0) / 1024
        rows.append(row)
    return rows


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in ("test_acc", "mask_ones", "mask_soft"):
        return f"{v:.3f}"
    if key in ("train_seconds", "artifact_kb"):
        return f"{v:.1f}"
    return str(v)


def format_table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    rows = _rows(results)
    return text_table([h for _, h in COLUMNS], [[_fmt(k, r.get(k)) for k, _ in COLUMNS] for r in rows], markdown)


def _plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    plt = pyplot()

    paths = []
    names = [r["task"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(rows) + 2), 3.2))
    ax.bar(names, [r.get("test_acc") or 0 for r in rows], color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy per task")
    for i, r in enumerate(rows):
        ax.text(i, (r.get("test_acc") or 0) + 0.01, f"{(r.get('test_acc') or 0):.3f}", ha="center", fontsize=8)
    fig.tight_layout()
    paths.append(out / "accuracy_per_task.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in rows:
        layers = r.get("layers") or {}
        if layers:
            ax.plot(range(len(layers)), list(layers.values()), marker="o", ms=3, label=r["task"])
    any_layers = next((r["layers"] for r in rows if r.get("layers")), {})
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
    ax.bar(names, [r.get("train_seconds") or 0 for r in rows], color="#dd8452")
    ax.set_ylabel("training seconds")
    ax.set_title("training time per task")
    fig.tight_layout()
    paths.append(out / "training_time_per_task.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(tracker: Any, parent_id: str, results: list[dict[str, Any]], rc: RunConfig,
                 log: Callable[[str], None] = print, wall_seconds: float | None = None) -> dict[str, Any]:
    """Print the table and log report.md / report.csv / plots to the parent run; returns summary numbers."""
    rows = _rows(results)
    table = format_table(results)
    log("")
    log(f"Sequence '{rc.run_name}' ({rc.benchmark['name']}, {rc.method.name}, {rc.model.name}):")
    log(table)
    accs = [r["test_acc"] for r in rows if r.get("test_acc") is not None]
    summary = {
        "mean_test_acc": sum(accs) / len(accs) if accs else None,
        "total_train_seconds": sum(r.get("train_seconds") or 0 for r in rows),
        "total_artifact_bytes": sum(r.get("artifact_bytes") or 0 for r in rows),
        "tasks": len(rows),
    }
    if wall_seconds is not None:
        summary["fanout_wall_seconds"] = wall_seconds
    if accs:
        log(f"mean test accuracy {summary['mean_test_acc']:.3f} over {len(accs)} task(s); "
            f"total training {summary['total_train_seconds']:.1f} s; "
            f"artifacts {summary['total_artifact_bytes'] / 1024:.1f} KB")
    lossy = [f"{r['task']}: {r['skipped_samples']} sample(s) skipped from corrupt shard(s) {r['skipped_shards']}"
             for r in rows if r.get("skipped_samples")]
    if lossy:  # data.on_corrupt=skip: the accuracies above saw less data than the manifest promises
        summary["skipped_samples"] = sum(r["skipped_samples"] for r in rows)
        log("warning: data.on_corrupt=skip dropped data; re-create the shards (mode=shards) to train on all of it")
        for line in lossy:
            log(f"  {line}")
    with tempfile.TemporaryDirectory(prefix="ksm-report-") as tmp:
        out = Path(tmp)
        notes = "".join(f"\n- skipped: {line}" for line in lossy)
        (out / "report.md").write_text(f"# {rc.run_name}\n\n" + format_table(results, markdown=True) + "\n"
                                       + (notes + "\n" if notes else ""))
        with open(out / "report.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([k for k, _ in COLUMNS] + ["run_id"])
            for r in rows:
                w.writerow([r.get(k) for k, _ in COLUMNS] + [r.get("run_id")])
        files = [out / "report.md", out / "report.csv"]
        if rows:
            files += _plots(rows, out)
        tracker.artifacts(parent_id, files, "report")
    tracker.metrics(parent_id, {k: v for k, v in summary.items() if v is not None})
    return summary
