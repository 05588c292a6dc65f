"""What a sweep leaves for the user: the trials read back from MLflow, the best trial, best.yaml (the overrides
file a sequence applies), the trials table, the trials plot and the command that runs the sequence with the best
values."""
from __future__ import annotations

import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ROOT, RunConfig
from ..present import pyplot, text_table
from ..redact import redact_text
from ..tracking import Tracker
from .space import METRIC, SPACE_KEYS, TuneSettings

__all__ = ["TrialSummary", "collect", "pick_best", "write_best", "plot", "table", "follow_up"]


@dataclass
class TrialSummary:
    run_id: str
    trial_id: str
    status: str                 # the MLflow run's: FINISHED, KILLED (ASHA stopped it) or FAILED
    early_stopped: bool
    params: dict[str, float]
    epochs: int
    val_acc: float | None
    val_loss: float | None
    val_acc_deployed: float | None
    curve: list[float]


def collect(tr: Tracker, sweep_id: str, ts: TuneSettings) -> list[TrialSummary]:
    """The sweep's trials as MLflow holds them (the record of truth: their status was set by the driver's
    callback as each trial ended)."""
    out = []
    for r in tr.find(None, ksm_kind="tune_trial", ksm_sweep=sweep_id):
        rid = r.info.run_id
        curve = [m.value for m in sorted(tr.client.get_metric_history(rid, METRIC), key=lambda m: m.step)]
        m = r.data.metrics
        out.append(TrialSummary(rid, r.data.tags.get("ksm_trial", ""), r.info.status,
                                r.data.tags.get("ksm_early_stopped") == "true",
                                {k: float(r.data.params[k]) for k in ts.space if k in r.data.params}, len(curve),
                                curve[-1] if curve else None, m.get("val_loss"), m.get("val_acc_deployed"), curve))
    return sorted(out, key=lambda t: t.trial_id)


def pick_best(trials: list[TrialSummary]) -> TrialSummary | None:
    """The best trial that ran every epoch (early-stopped ones lost at a rung); higher val_acc, then lower loss."""
    full = [t for t in trials if t.status == "FINISHED" and t.val_acc is not None]
    pool = full or [t for t in trials if t.val_acc is not None and t.status != "FAILED"]
    if not pool:
        return None
    return max(pool, key=lambda t: (t.val_acc, -(t.val_loss if t.val_loss is not None else math.inf)))


def write_best(path: Path, best: TrialSummary, ts: TuneSettings, rc: RunConfig, tasks: list[str],
               sweep_id: str, parent_id: str) -> dict[str, dict[str, Any]]:
    """best.yaml: the best trial's values as ``method:`` / ``train:`` sections, with a header saying where they
    come from and how to apply them."""
    import yaml

    method: dict[str, Any] = {"name": rc.method.name}
    train: dict[str, Any] = {}
    for k in ts.space:
        (method if SPACE_KEYS[k] == "method" else train)[k] = float(f"{best.params[k]:.6g}")
    data = {"method": method, "train": train}
    header = (f"# Best of Ray Tune sweep {sweep_id} (MLflow run {parent_id}, trial {best.trial_id}):\n"
              f"# mean validation accuracy {best.val_acc:.4f} on {', '.join(tasks)} after {best.epochs} epoch(s)\n"
              f"# (held-out {ts.holdout:g} of each task's train split; lr_mask={rc.train.lr_mask:g}, "
              f"lr_head={rc.train.lr_head:g} unless tuned).\n"
              f"# Apply: python run_pipeline.py overrides_file={path}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    return data


def plot(trials: list[TrialSummary], best: TrialSummary | None, keys: list[str], path: Path, title: str) -> Path:
    """One panel per searched key (validation accuracy against the value, by outcome), and the learning curves."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    shown = [t for t in trials if t.val_acc is not None]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.6 * (len(keys) + 1), 4.0), squeeze=False)
    styles = {"FINISHED": dict(marker="o", color="C0", label="ran every epoch"),
              "KILLED": dict(marker="x", color="C1", label="stopped early (ASHA)"),
              "FAILED": dict(marker="s", color="C3", label="failed")}
    for ax, key in zip(axes[0], keys):
        for status, st in styles.items():
            pts = [(t.params[key], t.val_acc) for t in shown if t.status == status and key in t.params]
            if pts:
                ax.scatter(*zip(*pts), s=36, **st)
        if best is not None and key in best.params:
            ax.scatter([best.params[key]], [best.val_acc], marker="*", s=260, facecolors="none",
                       edgecolors="C2", linewidths=1.6, label="best")
        if key in ("T", "k", "lr_mask", "lr_head"):
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_xlabel(key)
        ax.set_ylabel("mean validation accuracy (last epoch run)")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8, loc="best")
    ax = axes[0][-1]
    for t in shown:
        st = styles.get(t.status, styles["FINISHED"])
        ax.plot(range(1, len(t.curve) + 1), t.curve, marker=st["marker"], color=st["color"], alpha=0.7, lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean validation accuracy")
    ax.set_title("learning curves")
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(trials: list[TrialSummary], keys: list[str], best: TrialSummary | None) -> str:
    """The trials, best first, as a console table."""
    rows = []
    for t in sorted(trials, key=lambda t: -(t.val_acc if t.val_acc is not None else -1)):
        status = "early-stopped" if t.early_stopped else t.status.lower()
        rows.append([t.trial_id + (" *" if best is not None and t is best else ""),
                     *[f"{t.params[k]:.4g}" if k in t.params else "-" for k in keys], str(t.epochs),
                     f"{t.val_acc:.4f}" if t.val_acc is not None else "-", status])
    return text_table(["trial", *keys, "epochs", "val_acc", "status"], rows)


def follow_up(best_path: Path) -> str:
    """The exact command that runs the sequence with the best values: this run's own overrides (from Hydra, when
    run from the command line) minus the tune-only ones, plus overrides_file."""
    over: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            over = [o for o in HydraConfig.get().overrides.task
                    if not o.lstrip("+~").startswith(("mode=", "tune.", "tune=", "overrides_file=", "hydra."))]
    except Exception:  # not run through @hydra.main: overrides unknown
        over = []
    # an override may carry a secret (tracking.uri=postgresql://user:pw@...): the printed command shows it masked
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), f"overrides_file={best_path}", *map(redact_text, over)]
    return f"cd {shlex.quote(os.getcwd())} && " + " ".join(shlex.quote(c) for c in cmd)
