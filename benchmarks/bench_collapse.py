"""Issue #22: how often a task ends at chance, over seeds, with and without the head refit and under the other
suspects' settings. The pipeline's own training path (``jobs.train_task``: the shards, loaders and recipe a Ray
job uses) in one process, no Ray or MLflow, so each task costs only its training (~3 s at 1 epoch here).

    # the report's case: split_fashion_mnist, a 2-epoch backbone, 1 epoch per task, 8 seeds, task t2
    .venv/bin/python benchmarks/bench_collapse.py --tasks t2 --epochs 1 --bb-epochs 2 --seeds 0-7
    # a suspect: the authors' mask learning rate; BN recalibrated after training; a zero-initialised head
    .venv/bin/python benchmarks/bench_collapse.py --tasks t2 --epochs 1 --bb-epochs 2 --seeds 0-7 \
        --over train.lr_mask=2e-4 --bn-recal --zero-head
    # the README's tables (3 seeds; fashion_hard 5 epochs, fashion_to_digits 10): with and without the refit
    .venv/bin/python benchmarks/bench_collapse.py --stream fashion_hard --epochs 5 --bb-epochs 4 --seeds 0-2 \
        --methods ksm,piggyback,finetune

Each run prints one JSON line per task run (method, seed, head refit on/off, test accuracy, at chance or not)
and a table: per method and refit setting, the runs at chance and the mean over tasks (mean ± std over seeds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from ksm_core import at_chance, evaluate  # noqa: E402
from ksm_core.layers import TaskHeads  # noqa: E402
from pipeline import jobs  # noqa: E402
from pipeline.compare import method_settings  # noqa: E402
from pipeline.config import resolve  # noqa: E402
from pipeline.data import ensure_shards, make_loader  # noqa: E402


def seeds(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(s) for s in spec.split(",")]


def zero_heads() -> None:
    """The zero-initialised head suspect: a new task's head starts at W = 0, b = 0 (so the masks get no gradient
    until the head has learnt something)."""
    add = TaskHeads.add_task

    def add_zero(self, task: int, num_classes: int) -> None:
        add(self, task, num_classes)
        torch.nn.init.zeros_(self.tasks[str(task)].weight)
        torch.nn.init.zeros_(self.tasks[str(task)].bias)

    TaskHeads.add_task = add_zero


@torch.no_grad()
def bn_recalibrated_acc(out, m, task: str, seed: int, batch_size: int) -> float:
    """The BN suspect: the trained task's BN running statistics recomputed over its train split (cumulative
    average, eval-mode masks), then its test accuracy."""
    net = out.net.set_task(out.task)
    for _, bn in net.batchnorms():
        b = bn.tasks[str(out.task)]
        b.reset_running_stats()
        b.momentum = None
    net.train()
    for x, _ in make_loader(m, task, "train", batch_size=batch_size, seed=seed):
        net(x)
    net.eval()
    return evaluate(net, make_loader(m, task, "test", batch_size=batch_size, seed=seed))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", default="split_fashion_mnist", help="a configs/benchmark/ stream")
    ap.add_argument("--tasks", default="all", help="comma-separated task names, or all new tasks")
    ap.add_argument("--methods", default="ksm,piggyback")
    ap.add_argument("--seeds", default="0-7", help="0-7 or 0,3,5")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--bb-epochs", type=int, default=2)
    ap.add_argument("--refit", default="off,on", help="head refit settings to run: off, on or off,on")
    ap.add_argument("--over", nargs="*", default=[], help="more Hydra overrides, e.g. train.lr_mask=2e-4")
    ap.add_argument("--bn-recal", action="store_true", help="also report the BN-recalibrated accuracy")
    ap.add_argument("--zero-head", action="store_true", help="new heads start at zero (a suspect)")
    ap.add_argument("--root", default=None, help="shards and backbone cache (default: a temp folder)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # what a 1-CPU Ray job uses
    if a.zero_head:
        zero_heads()
    root = Path(a.root or tempfile.mkdtemp(prefix="ksm-collapse-"))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"benchmark={a.stream}", f"train.epochs={a.epochs}",
                                           f"train.backbone.epochs={a.bb_epochs}", f"paths.root={root}",
                                           f"tracking.uri=sqlite:///{root}/unused.db", *a.over])
    rc = resolve(cfg)
    m = ensure_shards(rc.benchmark, rc.paths.shards, log=lambda *_: None)
    cache = root / f"backbone-{a.stream}-{a.bb_epochs}.npz"
    if not cache.exists():
        out = jobs.backbone_job(rc, str(m.path))
        np.savez(cache, **out.state)
        print(f"backbone: test acc {out.fit.test_acc:.3f} on {m.initial_task}", flush=True)
    state = dict(np.load(cache))
    tasks = m.new_tasks if a.tasks == "all" else a.tasks.split(",")
    rows = []
    for refit in a.refit.split(","):
        for meth in a.methods.split(","):
            for s in seeds(a.seeds):
                r = dataclasses.replace(rc, seed=s, train=dataclasses.replace(rc.train, head_refit=refit == "on"))
                for task in tasks:
                    out = jobs.train_task(r, str(m.path), task, state, method=method_settings(r, meth))
                    row = {"method": meth, "seed": s, "task": task, "head_refit": refit,
                           "test_acc": round(out.fit.test_acc, 4), "test_loss": round(out.fit.test_loss, 4),
                           "train_acc": round(out.fit.history[-1]["train_acc"], 4),
                           "at_chance": at_chance(out.fit.test_acc, len(out.classes), rc.train.chance_margin),
                           "train_seconds": round(out.fit.train_seconds, 2),
                           "refit_seconds": round(out.fit.refit_seconds, 3)}
                    if a.bn_recal:
                        acc = bn_recalibrated_acc(out, m, task, s, r.train.batch_size)
                        row["bn_recal_acc"] = round(acc, 4)
                        row["bn_recal_at_chance"] = at_chance(acc, len(out.classes), rc.train.chance_margin)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\n{a.stream}, {a.epochs} epoch(s) per task, {a.bb_epochs}-epoch backbone, seeds {a.seeds}, "
          f"tasks {','.join(tasks)}{', ' + ' '.join(a.over) if a.over else ''}{', zero head' if a.zero_head else ''}:")
    for refit in a.refit.split(","):
        for meth in a.methods.split(","):
            rs = [r for r in rows if r["method"] == meth and r["head_refit"] == refit]
            per_seed = [statistics.fmean(r["test_acc"] for r in rs if r["seed"] == s) for s in seeds(a.seeds)]
            spread = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
            extra = ""
            if a.bn_recal:
                extra = f"; BN recalibrated: {sum(r['bn_recal_at_chance'] for r in rs)} at chance"
            print(f"  {meth:10s} refit {refit:3s}: {sum(r['at_chance'] for r in rs)}/{len(rs)} runs at chance; "
                  f"mean test acc {statistics.fmean(per_seed):.3f} ± {spread:.3f} (min {min(r['test_acc'] for r in rs):.3f})"
                  f"; refit {statistics.fmean(r['refit_seconds'] for r in rs):.2f} s vs train "
                  f"{statistics.fmean(r['train_seconds'] for r in rs):.2f} s per task{extra}")


if __name__ == "__main__":
    main()
