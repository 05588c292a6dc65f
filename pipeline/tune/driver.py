"""mode=tune: Ray Tune over KSM's temperature T and threshold tau (optionally k and the learning rates) with ASHA,
tracked in MLflow as one sweep run with a child run per trial.

    python run_pipeline.py mode=tune tune.num_samples=16 tune.max_epochs=4

A trial (pipeline.tune.trial) adapts the shared backbone to the tuning task(s) with the sequence's own job code,
training on the rest of each task's TRAIN split and validating on its held-out part (``tune.holdout``; the test
split is never looked at). The driver reuses the shards and the backbone of the sequence (same spec, same MLflow
backbone run); its :class:`TrialRuns` callback gives each trial's run its final status as Tune ends the trial
(FINISHED after every epoch, KILLED when ASHA stopped it, FAILED on an error); then it picks the best trial among
those that ran all epochs and writes ``{paths.output}/tune/{run_name}/best.yaml``, which
``python run_pipeline.py overrides_file=...`` applies.

This module imports Ray Tune: only run_pipeline.py imports it, and only for mode=tune.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from ..config import RunConfig
from ..errors import Log, PipelineError
from ..lineage import open_inputs
from ..runtime import check_fits_before_ray, ray_session
from ..sequence import backbone_stage
from ..tracking import Tracker
from . import outputs
from .space import METRIC, SPACE_KEYS, TuneSettings, tune_tasks
from .trial import TrialContext, run_trial

__all__ = ["run_tune", "TrialRuns"]


def _trial_resources(ts: TuneSettings) -> tuple[tuple[str, float], tuple[str, float]]:
    return ("tune.cpus_per_trial", ts.cpus_per_trial), ("tune.gpus_per_trial", ts.gpus_per_trial)


def run_tune(rc: RunConfig, ts: TuneSettings, log: Log = print) -> dict[str, Any]:
    """mode=tune with its validated settings; returns {"parent_run_id", "best", "best_val_acc", "best_yaml",
    "trials", ...}."""
    check_fits_before_ray(rc.cluster, *_trial_resources(ts))  # e.g. gpus_per_trial > 0 on a machine without GPU
    p = open_inputs(rc, log)                # tracking reachable, shards written or reused, experiment created
    tasks = tune_tasks(ts, p.manifest)
    with ray_session(rc.cluster, log):
        check_fits_before_ray(rc.cluster, *_trial_resources(ts))  # now against the cluster Ray reports
        state, fp, bb_run = backbone_stage(p, log)
        return _sweep(rc, ts, p.tracker, str(p.manifest.path), tasks, state, fp, bb_run, log)


class TrialRuns(Callback):
    """Driver-side owner of every trial run's final MLflow status, set the moment Tune ends the trial: FINISHED
    when it reported every epoch, KILLED when the scheduler (ASHA) stopped it earlier, FAILED with its error.
    (A trial cannot do this itself: ASHA ends it inside ``tune.report``, and a lost actor runs no code at all.)"""

    def __init__(self, uri: str, experiment_id: str, sweep_id: str, max_epochs: int) -> None:
        self.uri, self.experiment_id, self.sweep_id, self.max_epochs = uri, experiment_id, sweep_id, max_epochs
        self.iterations: dict[str, int] = {}
        self._tracker: Tracker | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.experiment_id)
        return self._tracker

    def _close(self, trial_id: str, status: str, tags: dict[str, str]) -> None:
        run = self.tracker.find_one("RUNNING", ksm_kind="tune_trial", ksm_sweep=self.sweep_id, ksm_trial=trial_id)
        if run is not None:
            self.tracker.tags(run.info.run_id, {"ksm_epochs": str(self.iterations.get(trial_id, 0)), **tags})
            self.tracker.finish(run.info.run_id, status)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.iterations[trial.trial_id] = int(result.get("training_iteration", 0))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        done = self.iterations.get(trial.trial_id, 0) >= self.max_epochs
        self._close(trial.trial_id, "FINISHED" if done else "KILLED", {"ksm_early_stopped": str(not done).lower()})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial.trial_id, "FAILED", {"ksm_early_stopped": "false", "ksm_error": _error_of(trial)})

    def close_interrupted(self) -> None:
        """An interrupted sweep: the trials still RUNNING are KILLED, tagged as interrupted."""
        for r in self.tracker.find("RUNNING", ksm_kind="tune_trial", ksm_sweep=self.sweep_id):
            self._close(r.data.tags.get("ksm_trial", ""), "KILLED",
                        {"ksm_early_stopped": "false", "ksm_interrupted": "true"})


def _error_of(trial: Any) -> str:
    """The last lines of a failed trial's error file (Tune writes the traceback there)."""
    path = getattr(trial, "error_file", None)
    try:
        return Path(path).read_text().strip().splitlines()[-1][:5000] if path else "error"
    except OSError:
        return str(path)


def _trial_dirname(trial: Any) -> str:
    return f"trial-{trial.trial_id}"


def _sweep(rc: RunConfig, ts: TuneSettings, tr: Tracker, manifest: str, tasks: list[str], state: dict[str, Any],
           fp: str, bb_run: str, log: Log) -> dict[str, Any]:
    sweep_id = uuid.uuid4().hex[:12]
    out_dir = Path(rc.paths.output) / "tune" / rc.run_name
    keys = [k for k in SPACE_KEYS if k in ts.space]
    parent_id = tr.start(f"tune-{rc.run_name}", {"ksm_kind": "tune_sweep", "ksm_sweep": sweep_id,
                                                 "ksm_backbone_run": bb_run, "ksm_fingerprint": fp,
                                                 "ksm_tasks": ",".join(tasks)})
    tr.params(parent_id, {
        "run_name": rc.run_name, "benchmark": rc.benchmark["name"], "method": rc.method.name,
        "model": rc.model.name, "model_width": rc.model.width, "tasks": ",".join(tasks),
        **{f"space.{k}": d.describe() for k, d in ts.space.items()},
        "num_samples": ts.num_samples, "max_epochs": ts.max_epochs, "grace_period": ts.grace_period,
        "reduction_factor": ts.reduction_factor, "holdout": ts.holdout, "cpus_per_trial": ts.cpus_per_trial,
        "gpus_per_trial": ts.gpus_per_trial, "max_concurrent": ts.max_concurrent, "tune_seed": ts.seed,
        "points_to_evaluate": len(ts.points_to_evaluate), "lr_mask": rc.train.lr_mask,
        "lr_head": rc.train.lr_head, "batch_size": rc.train.batch_size, "seed": rc.seed,
        **{f"fixed.{k}": v for k, v in rc.method.hparams().items() if k not in ts.space},
    })
    log(f"[tune] sweep {sweep_id}: {ts.num_samples} trial(s) on {', '.join(tasks)} "
        f"(validation: held-out {ts.holdout:g} of each train split), up to {ts.max_epochs} epoch(s) each, ASHA "
        f"grace {ts.grace_period} rf {ts.reduction_factor:g}; space: "
        + ", ".join(f"{k} ~ {d.describe()}" for k, d in ts.space.items()))
    t0 = time.perf_counter()
    runs = TrialRuns(rc.tracking.uri, tr.experiment_id, sweep_id, ts.max_epochs)
    with tr.running(parent_id):  # FINISHED; KILLED when interrupted; FAILED on an error
        try:
            refs = {"backbone": ray.put(state)}  # once: every trial maps the same arrays zero-copy
            trial_rc = dataclasses.replace(rc, cluster=dataclasses.replace(rc.cluster, cpus_per_task=ts.cpus_per_trial,
                                                                           gpus_per_task=ts.gpus_per_trial))
            ctx = TrialContext(manifest=manifest, experiment_id=tr.experiment_id, parent_run_id=parent_id,
                               sweep_id=sweep_id, tasks=tuple(tasks), max_epochs=ts.max_epochs, holdout=ts.holdout)
            trainable = tune.with_resources(tune.with_parameters(run_trial, rc=trial_rc, ctx=ctx, refs=refs),
                                            {"cpu": ts.cpus_per_trial, "gpu": ts.gpus_per_trial})
            tuner = tune.Tuner(
                trainable,
                param_space={k: d.sampler() for k, d in ts.space.items()},
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode="max", num_samples=ts.num_samples,
                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=ts.max_epochs,
                                            grace_period=ts.grace_period, reduction_factor=ts.reduction_factor),
                    # the limit goes to the generator itself: Tune ignores max_concurrent_trials (with a warning)
                    # when the search_alg is a BasicVariantGenerator, a SearchGenerator rather than a Searcher
                    search_alg=BasicVariantGenerator(points_to_evaluate=[dict(x) for x in ts.points_to_evaluate],
                                                     random_state=ts.seed, max_concurrent=ts.max_concurrent or 0),
                    trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(name=f"sweep-{sweep_id}", storage_path=str(out_dir / "ray"),
                                          callbacks=[runs], verbose=1 if rc.progress else 0,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
            grid = tuner.fit()
            wall = time.perf_counter() - t0
            trials = outputs.collect(tr, sweep_id, ts)
            best = outputs.pick_best(trials)
            n_early = sum(t.early_stopped for t in trials)
            n_failed = sum(t.status == "FAILED" for t in trials) + max(0, len(grid) - len(trials))
            tr.metrics(parent_id, {"trials": len(trials),
                                   "trials_finished": sum(t.status == "FINISHED" for t in trials),
                                   "trials_early_stopped": n_early, "trials_failed": n_failed, "wall_seconds": wall})
            log("\n" + outputs.table(trials, keys, best))
            if best is None:
                errors = [str(e) for e in grid.errors][:1]
                first = errors[0].splitlines()[-1][:500] if errors else "see the Tune logs"
                raise PipelineError(f"no trial of sweep {sweep_id} produced a validation accuracy ({n_failed} "
                                    f"failed); first error: {first} (trial logs under {out_dir / 'ray'})")
            title = (f"sweep {sweep_id}: {len(trials)} trials on {', '.join(tasks)}, {n_early} stopped early "
                     f"(ASHA), {ts.max_epochs} epochs max")
            plot = outputs.plot(trials, best, keys, out_dir / "trials.png", title)
            tr.artifact(parent_id, plot, "tune")
            best_path = out_dir / "best.yaml"
            data = outputs.write_best(best_path, best, ts, rc, tasks, sweep_id, parent_id)
            tr.artifact(parent_id, best_path, "tune")
            best_vals = {**data["method"], **data["train"]}
            tr.params(parent_id, {**{f"best.{k}": v for k, v in best_vals.items() if k != "name"},
                                  "best.trial": best.trial_id, "best.run_id": best.run_id})
            tr.metrics(parent_id, {"best_val_acc": best.val_acc,
                                   **({"best_val_acc_deployed": best.val_acc_deployed}
                                      if best.val_acc_deployed is not None else {})})
            tr.tags(parent_id, {"ksm_best_run": best.run_id, "ksm_best_yaml": str(best_path)})
            command = outputs.follow_up(best_path)
            log(f"\n[tune] best trial {best.trial_id}: "
                + ", ".join(f"{k}={v:.6g}" for k, v in best_vals.items() if k != "name")
                + f" -> mean validation accuracy {best.val_acc:.4f} ({len(trials)} trials, {n_early} stopped early, "
                f"{n_failed} failed, {wall:.0f} s)")
            log(f"[tune] wrote {best_path} and {plot}")
            log(f"[tune] run the sequence with these values:\n  {command}")
        finally:
            runs.close_interrupted()  # nothing is left RUNNING, whatever ended the sweep (before the sweep's run)
    return {"parent_run_id": parent_id, "sweep_id": sweep_id, "experiment_id": tr.experiment_id,
            "best": best_vals, "best_val_acc": best.val_acc, "best_trial": best.trial_id,
            "best_yaml": str(best_path), "plot": str(plot), "command": command, "tasks": tasks,
            "trials": [dataclasses.asdict(t) for t in trials], "early_stopped": n_early, "failed": n_failed,
            "wall_seconds": wall, "storage": str(out_dir / "ray")}
