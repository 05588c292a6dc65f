"""One Tune trial: adapt the shared backbone to every tuning task with the sampled values, one epoch of each
task at a time, and report the tasks' mean validation accuracy after every epoch (what ASHA compares).

The tasks are stepped in lockstep in ONE thread: ``pipeline.jobs.task_epochs`` is a generator that trains one
epoch per ``next()``, so a trial uses its CPUs and no more, and sees epoch e of every task before any task starts
epoch e + 1. The trial's MLflow run is created here; its final status is set by the driver's callback
(pipeline.tune.driver.TrialRuns), which is the one place that knows whether Tune finished, stopped or lost it.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from ksm_core import at_chance

from ..config import RunConfig
from ..jobs import task_epochs
from ..worker import cached_manifest, node_info, prepare_worker
from ..params import method_params
from ..report import CHANCE_LEVEL
from ..tracking import Tracker
from .space import METRIC, SPACE_KEYS

__all__ = ["TrialContext", "run_trial"]


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares, made by the driver."""

    manifest: str
    experiment_id: str
    parent_run_id: str
    sweep_id: str
    tasks: tuple[str, ...]
    max_epochs: int
    holdout: float


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs))


def _split_sizes(ctx: TrialContext) -> dict[str, int]:
    """Per tuning task: samples of the train split it trains on (fit) and validates on (the held-out part)."""
    from ..data.holdout import part_size

    m = cached_manifest(ctx.manifest)
    out = {}
    for name in ctx.tasks:
        info = m.task(name)
        out[f"fit_samples.{name}"] = part_size(info, "train", ctx.holdout, "fit")
        out[f"val_samples.{name}"] = part_size(info, "train", ctx.holdout, "holdout")
    return out


def _finish_all(steppers: list[Any]) -> list[Any]:
    """One more ``next()`` per task: it deploys the masks and evaluates; the TaskOutcomes, in task order."""
    outs = []
    for s in steppers:
        try:
            next(s)
        except StopIteration as done:
            outs.append(done.value)
        else:
            raise RuntimeError("a tuning task trained past the trial's last epoch")
    return outs


def run_trial(config: dict[str, Any], rc: RunConfig, ctx: TrialContext, refs: dict[str, Any]) -> None:
    """The Tune trainable: ``config`` holds the sampled values, ``refs`` the backbone in Ray's object store."""
    import ray
    from ray import tune

    prepare_worker(rc.cluster.cpus_per_task, rc.cluster.gpus_per_task)
    state = ray.get(refs["backbone"])
    method = dataclasses.replace(rc.method, **{k: float(v) for k, v in config.items() if SPACE_KEYS[k] == "method"})
    train = dataclasses.replace(rc.train, epochs=ctx.max_epochs,
                                **{k: float(v) for k, v in config.items() if SPACE_KEYS[k] == "train"})
    trial_id = tune.get_context().get_trial_id()
    tr = Tracker(rc.tracking.uri, ctx.experiment_id, rc.tracking.outage_s)
    run_id = tr.start(f"trial-{trial_id}", {"ksm_kind": "tune_trial", "ksm_sweep": ctx.sweep_id,
                                            "ksm_trial": trial_id, "ksm_tasks": ",".join(ctx.tasks), **node_info()},
                      parent=ctx.parent_run_id)
    tr.params(run_id, {**method_params(method, train), "epochs": ctx.max_epochs, "batch_size": train.batch_size,
                       "tasks": ",".join(ctx.tasks), "holdout": ctx.holdout, "seed": rc.seed,
                       "sampled": ",".join(sorted(config)), "trial_id": trial_id, **_split_sizes(ctx)})
    classes = {n: cached_manifest(ctx.manifest).task(n).num_classes for n in ctx.tasks}
    t0 = time.perf_counter()
    steppers = [task_epochs(rc, ctx.manifest, name, state, method=method, train=train, holdout=ctx.holdout,
                            evaluate_on="holdout") for name in ctx.tasks]
    for epoch in range(ctx.max_epochs):
        recs = [next(s) for s in steppers]
        # the tasks' test_acc/test_loss are measured on evaluate_on="holdout": the validation part
        m = {METRIC: _mean([r["test_acc"] for r in recs]), "val_loss": _mean([r["test_loss"] for r in recs]),
             "train_loss": _mean([r["train_loss"] for r in recs]), "train_acc": _mean([r["train_acc"] for r in recs]),
             "epoch_seconds": float(sum(r["epoch_seconds"] for r in recs))}
        for name, r in zip(ctx.tasks, recs):
            m[f"val_acc.{name}"], m[f"train_loss.{name}"] = r["test_acc"], r["train_loss"]
        # tuning tasks at chance this epoch: a sampled point can look bad only because one task did not learn
        m["at_chance"] = sum(at_chance(r["test_acc"], classes[n], train.chance_margin) for n, r in zip(ctx.tasks, recs))
        if epoch == ctx.max_epochs - 1:  # the last epoch: deploy the masks first, report the deployed accuracy too
            outs = _finish_all(steppers)
            m["val_acc_deployed"] = _mean([o.fit.test_acc for o in outs])
            dead = [n for n, o in zip(ctx.tasks, outs) if at_chance(o.fit.test_acc, classes[n], train.chance_margin)]
            m["at_chance_deployed"] = len(dead)
            if dead:
                tr.tags(run_id, {"ksm_warning": CHANCE_LEVEL, "ksm_at_chance_tasks": ",".join(dead)})
            m.update({f"val_acc_deployed.{name}": o.fit.test_acc for name, o in zip(ctx.tasks, outs)})
            m["trial_seconds"] = time.perf_counter() - t0
            tr.params(run_id, {"device": outs[0].fit.device})
        tr.metrics(run_id, m, step=epoch)
        # the last report comes after every write to the run: the driver may close it as soon as it sees it
        tune.report({k.replace(".", "_"): v for k, v in m.items()} | {"epoch": epoch + 1})
