"""mode=tune: Ray Tune over KSM's temperature T and threshold tau (optionally k and the learning rates) with ASHA,
tracked in MLflow as one sweep run with a child run per trial.

    python run_pipeline.py mode=tune tune.num_samples=16 tune.max_epochs=4

A trial adapts the shared backbone to the tuning task(s) with the sequence's own job code
(:func:`pipeline.jobs.train_task`), training on the rest of each task's TRAIN split and validating on its held-out
part (``tune.holdout``; the test split is never looked at). Several tuning tasks run in lockstep: one thread per task,
one epoch at a time, so a trial never uses more than its CPUs; after every epoch the trial reports the tasks' mean
validation accuracy, which is what ASHA compares to stop bad trials early.

The driver checks the whole ``tune`` section before Ray starts, reuses the shards and the backbone of the sequence
(same spec, same MLflow backbone run), and after the sweep fixes up the runs of the trials Tune stopped (their actor
is killed mid-trial: KILLED + tag ksm_early_stopped=true), picks the best trial among those that ran all epochs,
and writes ``{paths.output}/tune/{run_name}/best.yaml``, which ``python run_pipeline.py overrides_file=...`` applies.
"""
from __future__ import annotations

import math
import os
import queue
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import PipelineError, mask_hparams, method_params

__all__ = ["run_tune", "check_tune", "TuneSettings", "Dim", "benchmark_tasks", "SPACE_KEYS", "METRIC"]

Log = Callable[[str], None]

#: what a trial reports after every epoch (mean over the tuning tasks) and what ASHA and the best pick compare
METRIC = "val_acc"
#: the keys a search space may hold, and the config section each one overrides
SPACE_KEYS: dict[str, str] = {"T": "method", "tau": "method", "k": "method", "lr_mask": "train", "lr_head": "train"}
DISTRIBUTIONS = ("loguniform", "uniform", "choice")
#: the mask threshold is compared with real-valued masks that start at method.init (1e-2); far above that every
#: mask starts (and stays) off, far below it none ever turns off
TAU_RANGE = (0.0, 0.1)


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Dim:
    """One searched hyperparameter: ``type`` loguniform/uniform over [low, high], or choice over ``values``."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    values: tuple[float, ...] = ()

    def contains(self, v: float) -> bool:
        if self.type == "choice":
            return any(math.isclose(v, c, rel_tol=1e-9, abs_tol=1e-12) for c in self.values)
        assert self.low is not None and self.high is not None
        return self.low <= v <= self.high

    def describe(self) -> str:
        if self.type == "choice":
            return f"choice{list(self.values)}"
        return f"{self.type}[{self.low:g}, {self.high:g}]"

    def sampler(self) -> Any:
        from ray import tune

        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        return tune.choice(list(self.values))


@dataclass
class TuneSettings:
    """The validated ``tune`` section."""

    space: dict[str, Dim]
    tasks: list[str] | None
    num_samples: int
    max_epochs: int
    grace_period: int
    reduction_factor: float
    holdout: float
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent: int | None
    seed: int
    points_to_evaluate: list[dict[str, float]] = field(default_factory=list)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(key: str, v: Any, where: str, method: dict[str, Any]) -> None:
    """A value of ``key`` (a range bound, a choice, a start point) must be a number the method accepts."""
    if not _is_num(v):
        raise PipelineError(f"{where}={v!r} must be a finite number")
    if key in ("T", "k") and v <= 0:
        what = "temperature T" if key == "T" else "logistic scale k"
        raise PipelineError(f"{where}={v!r} is out of range: the {what} must be > 0 (it divides or scales the "
                            f"mask's logit; a loguniform range needs low > 0 as well); e.g. "
                            f"{'tune.space.T.low=1' if key == 'T' else 'tune.space.k.low=100'}")
    if key == "tau" and not TAU_RANGE[0] <= v <= TAU_RANGE[1]:
        raise PipelineError(f"{where}={v!r} is outside the sane range [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}] for the "
                            f"mask threshold tau (masks start at method.init={method.get('init', 1e-2)!r}; the "
                            "authors use 5e-3); e.g. tune.space.tau.low=0 tune.space.tau.high=0.02")
    if key in ("lr_mask", "lr_head") and not 0 < v <= 1:
        raise PipelineError(f"{where}={v!r} is out of range: a learning rate must be in (0, 1]; "
                            f"e.g. tune.space.{key}.low=1e-5 tune.space.{key}.high=1e-2")


def _parse_dim(key: str, spec: Any, method: dict[str, Any]) -> Dim:
    where = f"tune.space.{key}"
    if not isinstance(spec, dict):
        raise PipelineError(f"{where}={spec!r} must be a mapping such as {{type: loguniform, low: 1, high: 1000}} "
                            f"(or null to leave {key} out of the search)")
    kind = spec.get("type")
    if kind not in DISTRIBUTIONS:
        raise PipelineError(f"{where}.type={kind!r} is not a distribution; valid: {', '.join(DISTRIBUTIONS)}")
    # low/high next to values is not an error: Hydra merges `tune.space.T={type:choice,values:[..]}` into the
    # default {type: loguniform, low, high}; the type says which keys count
    extra = set(spec) - {"type", "low", "high", "values"}
    if extra:
        raise PipelineError(f"{where} has unknown key(s) {sorted(extra)}; "
                            f"{'choice takes `values`' if kind == 'choice' else f'{kind} takes `low` and `high`'}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, (list, tuple)) or not values:
            raise PipelineError(f"{where}.values={values!r} must be a non-empty list, e.g. "
                                f"{where}.values=[10,100,1000]")
        for i, v in enumerate(values):
            _check_value(key, v, f"{where}.values[{i}]", method)
        return Dim(key, kind, values=tuple(float(v) for v in values))
    if spec.get("values") is not None:
        raise PipelineError(f"{where}.values is set but {where}.type={kind!r} takes low and high; for a list of "
                            f"values set {where}.type=choice")
    low, high = spec.get("low"), spec.get("high")
    for name, v in (("low", low), ("high", high)):
        if v is None:
            raise PipelineError(f"{where}.{name} is missing; a {kind} range needs both low and high")
        _check_value(key, v, f"{where}.{name}", method)
    if low >= high:
        raise PipelineError(f"{where}: low={low!r} >= high={high!r} is an empty or inverted range; give "
                            f"low < high, e.g. {where}.low={min(low, high)!r} {where}.high={max(low, high)!r}"
                            if low != high else
                            f"{where}: low={low!r} == high={high!r} is an empty range; give low < high, or drop "
                            f"{key} from the search ({where}=null) and set it in the method/train config instead")
    if kind == "loguniform" and low <= 0:
        raise PipelineError(f"{where}.low={low!r}: a loguniform range needs low > 0; use type uniform, or a "
                            f"positive low such as {where}.low={high / 1000:g}")
    return Dim(key, kind, float(low), float(high))


def _method_uses(method: dict[str, Any], key: str) -> str | None:
    """Why ``method`` ignores ``key`` (None when it uses it)."""
    from ksm_core import mask_spec

    spec = mask_spec(method["name"])
    name = method["name"]
    if key in ("T", "k") and spec.binarizer != "softmax":
        return (f"method.name={name!r} has no softmax trick, so {key} does nothing; tune it with a KSM method "
                f"(method=ksm) or drop it: tune.space.{key}=null")
    if key == "tau" and not spec.masked:
        return f"method.name={name!r} learns no mask, so tau does nothing; drop it: tune.space.tau=null"
    if key == "lr_mask" and name == "finetune":
        return "method.name='finetune' trains with train.lr_finetune, so lr_mask does nothing; drop it: " \
               "tune.space.lr_mask=null"
    return None


def check_tune(rc: dict[str, Any]) -> TuneSettings:
    """Validate the ``tune`` section (no Ray, no MLflow, no data); raises PipelineError naming the key and fix."""
    t = rc.get("tune")
    if not isinstance(t, dict):
        raise PipelineError("the config has no `tune` section; keep `tune: asha` in configs/config.yaml's defaults")
    method = rc["method"]
    raw = t.get("space") or {}
    if not isinstance(raw, dict):
        raise PipelineError(f"tune.space={raw!r} must be a mapping of key -> distribution")
    unknown = sorted(set(raw) - set(SPACE_KEYS))
    if unknown:
        raise PipelineError(f"tune.space.{unknown[0]} is not a tunable key; valid keys: {', '.join(SPACE_KEYS)} "
                            f"(remove it, e.g. `~tune.space.{unknown[0]}`)")
    space = {k: _parse_dim(k, v, method) for k, v in raw.items() if v is not None}
    if not space:
        raise PipelineError(f"tune.space has nothing to search (every key is null); give at least one of "
                            f"{', '.join(SPACE_KEYS)}, e.g. tune.space.T={{type:loguniform,low:1,high:1000}}")
    for key in space:
        why = _method_uses(method, key)
        if why:
            raise PipelineError(f"tune.space.{key}: {why}")

    def int_at_least(name: str, lo: int) -> int:
        v = t.get(name)
        if not (_is_int(v) and v >= lo):
            raise PipelineError(f"tune.{name}={v!r} must be an int >= {lo}")
        return v

    num_samples = int_at_least("num_samples", 1)
    max_epochs = int_at_least("max_epochs", 1)
    grace = int_at_least("grace_period", 1)
    if grace > max_epochs:
        raise PipelineError(f"tune.grace_period={grace} > tune.max_epochs={max_epochs}: every trial would end "
                            f"before ASHA may stop it; set tune.grace_period <= {max_epochs}")
    rf = t.get("reduction_factor")
    if not (_is_num(rf) and rf > 1):
        raise PipelineError(f"tune.reduction_factor={rf!r} must be a number > 1 (2 keeps the top half at each rung)")
    h = t.get("holdout")
    if not (_is_num(h) and 0 < h < 1):
        raise PipelineError(f"tune.holdout={h!r} must be in (0, 1): the validation part of each task's train split "
                            "(the test split is never used for tuning); e.g. tune.holdout=0.2")
    cpus, gpus = t.get("cpus_per_trial"), t.get("gpus_per_trial")
    if not (_is_num(cpus) and cpus > 0):
        raise PipelineError(f"tune.cpus_per_trial={cpus!r} must be a number > 0")
    if not (_is_num(gpus) and gpus >= 0):
        raise PipelineError(f"tune.gpus_per_trial={gpus!r} must be a number >= 0 (0 = CPU trials)")
    if gpus > 1 and gpus != int(gpus):
        raise PipelineError(f"tune.gpus_per_trial={gpus} must be a fraction <= 1 or a whole number")
    mc = t.get("max_concurrent")
    if mc is not None and not (_is_int(mc) and mc >= 1):
        raise PipelineError(f"tune.max_concurrent={mc!r} must be an int >= 1, or null (as many as fit)")
    seed = t.get("seed", 0)
    if not _is_int(seed):
        raise PipelineError(f"tune.seed={seed!r} must be an int")
    tasks = t.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if tasks is not None:
        if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(x, str) and x for x in tasks):
            raise PipelineError(f"tune.tasks={tasks!r} must be a non-empty list of task names, e.g. "
                                "tune.tasks=[t1,t2], or null for the benchmark's first two new tasks")
        if len(set(tasks)) != len(tasks):
            raise PipelineError(f"tune.tasks={list(tasks)} names a task twice")
        tasks = list(tasks)
        known = benchmark_tasks(rc["benchmark"])
        if known:
            _check_tasks(tasks, known[1:], rc["benchmark"].get("name"), known[0])
    points = t.get("points_to_evaluate") or []
    if not isinstance(points, (list, tuple)):
        raise PipelineError(f"tune.points_to_evaluate={points!r} must be a list of mappings, e.g. "
                            "[{T: 100, tau: 5.0e-3}]")
    if len(points) > num_samples:
        raise PipelineError(f"tune.points_to_evaluate has {len(points)} points but tune.num_samples={num_samples}; "
                            f"each point takes one sample: raise tune.num_samples to >= {len(points)}")
    clean_points = []
    for i, pt in enumerate(points):
        where = f"tune.points_to_evaluate[{i}]"
        if not isinstance(pt, dict) or set(pt) != set(space):
            raise PipelineError(f"{where}={pt!r} must give exactly the searched keys {sorted(space)}")
        for k, v in pt.items():
            _check_value(k, v, f"{where}.{k}", method)
            if not space[k].contains(float(v)):
                raise PipelineError(f"{where}.{k}={v!r} is outside tune.space.{k} = {space[k].describe()}; "
                                    "move the point inside the space or widen the space")
        clean_points.append({k: float(v) for k, v in pt.items()})
    return TuneSettings(space=space, tasks=tasks, num_samples=num_samples, max_epochs=max_epochs,
                        grace_period=grace, reduction_factor=float(rf), holdout=float(h), cpus_per_trial=float(cpus),
                        gpus_per_trial=float(gpus), max_concurrent=mc, seed=seed, points_to_evaluate=clean_points)


def benchmark_tasks(bench: dict[str, Any]) -> list[str] | None:
    """The benchmark's task names (initial task first) as its config determines them without loading data; None
    when only the shards' manifest knows (e.g. sequence entries named after their source)."""
    kind = bench.get("kind")
    if kind == "class_split":
        lists = bench.get("class_lists")
        n = len(lists) if lists is not None else bench.get("num_tasks")
        return [f"t{i}" for i in range(int(n))] if _is_int(n) else None
    if kind == "sequence":
        entries = bench.get("tasks") or []
        if entries and all(isinstance(e, dict) and e.get("name") for e in entries):
            return [str(e["name"]) for e in entries]
        return None
    if kind == "cifar100_superclass":
        from .data import CPG_ORDER

        return list(bench.get("superclasses") or CPG_ORDER)
    return None


def _check_tasks(tasks: list[str], new_tasks: list[str], bench_name: Any, initial: str | None = None) -> None:
    for name in tasks:
        if name not in new_tasks:
            hint = f" ({name} is the initial task: it trains the backbone)" if initial and name == initial else ""
            raise PipelineError(f"tune.tasks: {name!r} is not a new task of benchmark {bench_name!r}{hint}; its new "
                                f"tasks: {', '.join(new_tasks) or '(none)'}; "
                                f"e.g. tune.tasks=[{','.join(new_tasks[:2])}]")


def _tune_tasks(ts: TuneSettings, manifest: Any) -> list[str]:
    """The tuning tasks checked against the shards' manifest, each with a non-empty fit and validation part."""
    from .data.loader import part_size

    new = manifest.new_tasks
    if ts.tasks is None:
        if not new:
            raise PipelineError(f"benchmark {manifest.benchmark!r} has no new task to tune on")
        tasks = new[:2]
    else:
        _check_tasks(ts.tasks, new, manifest.benchmark, manifest.initial_task)
        tasks = ts.tasks
    for name in tasks:
        info = manifest.task(name)
        held = part_size(info, "train", ts.holdout, "holdout")
        fit = info.counts["train"] - held
        if held < 1 or fit < 1:
            raise PipelineError(f"tune.holdout={ts.holdout} leaves task {name} ({info.counts['train']} train samples) "
                                f"{held} validation and {fit} training samples; both must be >= 1: change "
                                "tune.holdout or the benchmark's caps")
    return tasks


def _embedded(rc: dict[str, Any]) -> bool:
    return (os.environ.get("RAY_ADDRESS") or rc["cluster"].get("address") or "local") == "local"


def _check_resources_before_ray(rc: dict[str, Any], ts: TuneSettings) -> None:
    """What can be known about the cluster without starting it: an embedded one has this machine's CPUs/GPUs."""
    import ray

    if ray.is_initialized():
        _check_resources(ts)
        return
    if not _embedded(rc):
        return  # a remote cluster: checked once connected
    gpus = rc["cluster"].get("num_gpus")
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cl = rc["cluster"]
    cpus = cl.get("num_cpus") or os.cpu_count() or 1
    what = "the embedded Ray runtime (this machine"
    what += f", cluster.num_cpus={cl['num_cpus']}" if cl.get("num_cpus") else ""
    what += f", cluster.num_gpus={cl['num_gpus']}" if cl.get("num_gpus") is not None else ""
    _check_against(ts, cpus, gpus, what + ")")


def _check_resources(ts: TuneSettings) -> None:
    import ray

    res = ray.cluster_resources()
    _check_against(ts, res.get("CPU", 0), res.get("GPU", 0), f"the Ray cluster (resources: {res})")


def _check_against(ts: TuneSettings, cpus: float, gpus: float, what: str) -> None:
    if ts.gpus_per_trial > 0 and gpus <= 0:
        raise PipelineError(f"tune.gpus_per_trial={ts.gpus_per_trial:g} but {what} has no GPU; set "
                            "tune.gpus_per_trial=0 (CPU trials) or run on a cluster with GPUs (cluster=remote)")
    if ts.gpus_per_trial > gpus:
        raise PipelineError(f"tune.gpus_per_trial={ts.gpus_per_trial:g} exceeds the {gpus:g} GPU(s) of {what}: "
                            "no trial could start; lower it")
    if ts.cpus_per_trial > cpus:
        raise PipelineError(f"tune.cpus_per_trial={ts.cpus_per_trial:g} exceeds the {cpus:g} CPU(s) of {what}: "
                            "no trial could start; lower it")


# ------------------------------------------------------------------------------------------------- a trial
class _Lockstep:
    """One ``train_task`` per tuning task, each in its own thread, taking turns: a thread runs one epoch, hands
    its record over and waits for its next turn. Only one trains at any time (a trial uses its CPUs, no more),
    and the trial sees epoch e of every task before any task starts epoch e + 1."""

    def __init__(self, tasks: list[str], run_one: Callable[[str, Callable[[int, dict], None]], Any]):
        self.tasks = tasks
        self._turn = [threading.Semaphore(0) for _ in tasks]
        self._out: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._work, args=(i, name, run_one), daemon=True,
                                          name=f"ksm-tune-{name}") for i, name in enumerate(tasks)]
        for th in self._threads:
            th.start()

    def _work(self, i: int, name: str, run_one: Callable) -> None:
        try:
            self._turn[i].acquire()

            def on_epoch(epoch: int, rec: dict[str, float]) -> None:
                self._out.put(("epoch", i, (epoch, rec)))
                self._turn[i].acquire()  # until every task has done this epoch and the trial has reported

            self._out.put(("done", i, run_one(name, on_epoch)))
        except BaseException as e:  # handed to the trial's thread, which raises it
            self._out.put(("error", i, e))

    def _step(self, i: int) -> tuple[str, Any]:
        self._turn[i].release()
        kind, j, payload = self._out.get()
        assert j == i, (j, i)
        if kind == "error":
            raise payload
        return kind, payload

    def epochs(self, n: int) -> Iterator[tuple[int, list[dict[str, float]]]]:
        for epoch in range(n):
            recs = []
            for i, name in enumerate(self.tasks):
                kind, payload = self._step(i)
                if kind != "epoch" or payload[0] != epoch:
                    raise RuntimeError(f"task {name}: expected epoch {epoch}, got {kind} {payload!r:.80}")
                recs.append(payload[1])
            yield epoch, recs

    def finish(self) -> list[Any]:
        """Let every task deploy its masks and evaluate once more; their TaskOutcomes, in task order."""
        outs = []
        for i, name in enumerate(self.tasks):
            kind, payload = self._step(i)
            if kind != "done":
                raise RuntimeError(f"task {name}: trained past the trial's last epoch")
            outs.append(payload)
        for th in self._threads:
            th.join(timeout=60)
        return outs


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs))


def _split_sizes(m: Any, tasks: list[str], holdout: float) -> dict[str, int]:
    """Per tuning task: samples of the train split it trains on (fit) and validates on (the held-out part)."""
    from .data.loader import part_size

    out = {}
    for name in tasks:
        info = m.task(name)
        out[f"fit_samples.{name}"] = part_size(info, "train", holdout, "fit")
        out[f"val_samples.{name}"] = part_size(info, "train", holdout, "holdout")
    return out


def _trial(config: dict[str, Any], rc: dict[str, Any], refs: dict[str, Any]) -> None:
    """One Tune trial: adapt the backbone to every tuning task with the sampled values, report per epoch."""
    import ray
    from ray import tune

    from .jobs import manifest, node_info, prepare_worker, train_task
    from .tracking import Tracker

    run = rc["_run"]
    prepare_worker(rc["cluster"]["cpus_per_task"], rc["cluster"]["gpus_per_task"])
    state = ray.get(refs["backbone"])
    method = {**rc["method"], **{k: float(v) for k, v in config.items() if SPACE_KEYS.get(k) == "method"}}
    train = {**rc["train"], "epochs": run["max_epochs"],
             **{k: float(v) for k, v in config.items() if SPACE_KEYS.get(k) == "train"}}
    tasks: list[str] = run["tasks"]
    epochs: int = run["max_epochs"]
    trial_id = tune.get_context().get_trial_id()
    tr = Tracker(rc["tracking"]["uri"], run["experiment_id"])
    run_id = tr.start(f"trial-{trial_id}", {"ksm_kind": "tune_trial", "ksm_sweep": run["sweep_id"],
                                            "ksm_trial": trial_id, "ksm_tasks": ",".join(tasks), **node_info()},
                      parent=run["parent_run_id"])
    tr.params(run_id, {**method_params(method, train), "epochs": epochs, "batch_size": train["batch_size"],
                       "tasks": ",".join(tasks), "holdout": run["holdout"], "seed": rc["seed"],
                       "sampled": ",".join(sorted(config)), "trial_id": trial_id,
                       **_split_sizes(manifest(run["manifest"]), tasks, run["holdout"])})
    done = 0
    completed = False
    t0 = time.perf_counter()
    try:
        def run_one(name: str, on_epoch: Callable[[int, dict], None]) -> Any:
            return train_task(rc, name, state, method=method, train=train, on_epoch=on_epoch,
                              holdout=run["holdout"], evaluate_on="holdout")

        steps = _Lockstep(tasks, run_one)
        for epoch, recs in steps.epochs(epochs):
            # fit_task's test_acc/test_loss are measured on evaluate_on="holdout": the validation part
            m = {METRIC: _mean([r["test_acc"] for r in recs]), "val_loss": _mean([r["test_loss"] for r in recs]),
                 "train_loss": _mean([r["train_loss"] for r in recs]),
                 "train_acc": _mean([r["train_acc"] for r in recs]),
                 "epoch_seconds": float(sum(r["epoch_seconds"] for r in recs))}
            for name, r in zip(tasks, recs):
                m[f"val_acc.{name}"], m[f"train_loss.{name}"] = r["test_acc"], r["train_loss"]
            if epoch == epochs - 1:  # the last epoch: deploy the masks first, report the deployed accuracy too
                outs = steps.finish()
                m["val_acc_deployed"] = _mean([o.fit.test_acc for o in outs])
                for name, o in zip(tasks, outs):
                    m[f"val_acc_deployed.{name}"] = o.fit.test_acc
                tr.params(run_id, {"device": outs[0].fit.device})
            tr.metrics(run_id, m, step=epoch)
            done = epoch + 1
            if done == epochs:
                tr.metrics(run_id, {"trial_seconds": time.perf_counter() - t0}, step=epoch)
                tr.tags(run_id, {"ksm_early_stopped": "false", "ksm_epochs": str(done)})
                tr.finish(run_id, "FINISHED")  # before the last report: ASHA stops every trial that reaches max_t
                completed = True
            tune.report({k.replace(".", "_"): v for k, v in m.items()} | {"epoch": done})
    except SystemExit:  # Tune stops a trial (ASHA) by ending its thread inside tune.report
        if not completed:
            tr.tags(run_id, {"ksm_early_stopped": "true", "ksm_epochs": str(done)})
            tr.finish(run_id, "KILLED")
        raise
    except BaseException as e:
        if not completed:
            tr.tags(run_id, {"ksm_error": f"{type(e).__name__}: {e}"[:5000], "ksm_epochs": str(done)})
            tr.finish(run_id, "FAILED")
        raise


def _trial_dirname(trial: Any) -> str:
    return f"trial-{trial.trial_id}"


# --------------------------------------------------------------------------------------------- the driver
def _outcomes_callback() -> Any:
    from ray.tune import Callback

    class Outcomes(Callback):
        """Driver-side record of every trial: iterations reached and error, by Tune trial id."""

        def __init__(self) -> None:
            self.trials: dict[str, dict[str, Any]] = {}

        def _rec(self, trial: Any) -> dict[str, Any]:
            return self.trials.setdefault(trial.trial_id,
                                          {"iterations": 0, "error": None, "config": dict(trial.config)})

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self._rec(trial)["iterations"] = int(result.get("training_iteration", 0))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._rec(trial)["error"] = str(getattr(trial, "error_file", None) or "error")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._rec(trial)

    return Outcomes()


@dataclass
class TrialSummary:
    run_id: str
    trial_id: str
    status: str
    early_stopped: bool
    params: dict[str, float]
    epochs: int
    val_acc: float | None
    val_loss: float | None
    val_acc_deployed: float | None
    curve: list[float]


def _fixup_and_collect(tr: Any, sweep_id: str, outcomes: dict[str, dict[str, Any]], ts: TuneSettings,
                       log: Log) -> list[TrialSummary]:
    """Give every trial run a final status (Tune kills a stopped trial's actor, which may leave its run RUNNING)
    and read the trials back from MLflow, the record of truth."""
    out = []
    for r in tr.find(None, ksm_kind="tune_trial", ksm_sweep=sweep_id):
        rid, tags = r.info.run_id, r.data.tags
        tid = tags.get("ksm_trial", "")
        info = outcomes.get(tid, {})
        curve = [m.value for m in sorted(tr.client.get_metric_history(rid, METRIC), key=lambda m: m.step)]
        epochs = len(curve)
        status = r.info.status
        if status == "RUNNING":
            if info.get("error"):
                tr.tags(rid, {"ksm_error": info["error"][:5000], "ksm_epochs": str(epochs)})
                status = "FAILED"
            elif epochs >= ts.max_epochs:
                tr.tags(rid, {"ksm_early_stopped": "false", "ksm_epochs": str(epochs)})
                status = "FINISHED"
            else:  # stopped by ASHA (or the sweep was interrupted) before its last epoch
                tr.tags(rid, {"ksm_early_stopped": "true", "ksm_epochs": str(epochs)})
                status = "KILLED"
            tr.finish(rid, status)
        early = status == "KILLED" and epochs < ts.max_epochs and not info.get("error")
        if status == "KILLED" and tags.get("ksm_early_stopped") != "true" and early:
            tr.tags(rid, {"ksm_early_stopped": "true", "ksm_epochs": str(epochs)})
        params = {k: float(r.data.params[k]) for k in ts.space if k in r.data.params}
        m = r.data.metrics
        out.append(TrialSummary(rid, tid, status, early, params, epochs, curve[-1] if curve else None,
                                m.get("val_loss"), m.get("val_acc_deployed"), curve))
    missing = set(outcomes) - {t.trial_id for t in out}
    if missing:
        log(f"[tune] warning: {len(missing)} trial(s) never reached MLflow (failed while starting): "
            f"{', '.join(sorted(missing))}; see the Tune logs")
    return sorted(out, key=lambda t: t.trial_id)


def _pick_best(trials: list[TrialSummary]) -> TrialSummary | None:
    """The best trial that ran every epoch (early-stopped ones lost at a rung); higher val_acc, then lower loss."""
    full = [t for t in trials if t.status == "FINISHED" and t.val_acc is not None]
    pool = full or [t for t in trials if t.val_acc is not None and t.status != "FAILED"]
    if not pool:
        return None
    return max(pool, key=lambda t: (t.val_acc, -(t.val_loss if t.val_loss is not None else math.inf)))


def _fmt_value(v: float) -> float:
    return float(f"{v:.6g}")


def _write_best(path: Path, best: TrialSummary, ts: TuneSettings, rc: dict[str, Any], tasks: list[str],
                sweep_id: str, parent_id: str) -> dict[str, dict[str, Any]]:
    import yaml

    method: dict[str, Any] = {"name": rc["method"]["name"]}
    train: dict[str, Any] = {}
    for k in ts.space:
        (method if SPACE_KEYS[k] == "method" else train)[k] = _fmt_value(best.params[k])
    data = {"method": method, "train": train}
    header = (f"# Best of Ray Tune sweep {sweep_id} (MLflow run {parent_id}, trial {best.trial_id}):\n"
              f"# mean validation accuracy {best.val_acc:.4f} on {', '.join(tasks)} after {best.epochs} epoch(s)\n"
              f"# (held-out {ts.holdout:g} of each task's train split; lr_mask={rc['train']['lr_mask']:g}, "
              f"lr_head={rc['train']['lr_head']:g} unless tuned).\n"
              f"# Apply: python run_pipeline.py overrides_file={path}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    return data


def _plot(trials: list[TrialSummary], best: TrialSummary | None, keys: list[str], path: Path,
          title: str) -> Path:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    for noisy in ("matplotlib", "matplotlib.font_manager"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import matplotlib.pyplot as plt
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


def _table(trials: list[TrialSummary], keys: list[str], best: TrialSummary | None) -> str:
    head = ["trial", *keys, "epochs", "val_acc", "status"]
    rows = []
    for t in sorted(trials, key=lambda t: -(t.val_acc if t.val_acc is not None else -1)):
        status = "early-stopped" if t.early_stopped else t.status.lower()
        rows.append([t.trial_id + (" *" if best is not None and t is best else ""),
                     *[f"{t.params[k]:.4g}" if k in t.params else "-" for k in keys], str(t.epochs),
                     f"{t.val_acc:.4f}" if t.val_acc is not None else "-", status])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def _follow_up(best_path: Path) -> str:
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
    script = Path(__file__).resolve().parents[1] / "run_pipeline.py"
    cmd = [sys.executable, str(script), f"overrides_file={best_path}", *over]
    return f"cd {shlex.quote(os.getcwd())} && " + " ".join(shlex.quote(c) for c in cmd)


def run_tune(rc: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """mode=tune: the sweep; returns {"parent_run_id", "best", "best_val_acc", "best_yaml", "trials", ...}."""
    from .orchestrate import backbone_stage, prepare, ray_session

    ts = check_tune(rc)                       # the whole tune section, before any work
    _check_resources_before_ray(rc, ts)       # e.g. gpus_per_trial > 0 on a machine without GPU
    p = prepare(rc, log)                      # tracking reachable, shards written or reused, experiment created
    tasks = _tune_tasks(ts, p.manifest)
    with ray_session(rc, log):
        _check_resources(ts)
        state, fp, bb_run = backbone_stage(p, log)
        return _sweep(rc, ts, p, tasks, state, fp, bb_run, log)


def _sweep(rc: dict[str, Any], ts: TuneSettings, p: Any, tasks: list[str], state: dict[str, Any], fp: str,
           bb_run: str, log: Log) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tr = p.tracker
    sweep_id = uuid.uuid4().hex[:12]
    out_dir = Path(rc["paths"]["output"]) / "tune" / rc["run_name"]
    keys = [k for k in SPACE_KEYS if k in ts.space]
    parent_id = tr.start(f"tune-{rc['run_name']}", {"ksm_kind": "tune_sweep", "ksm_sweep": sweep_id,
                                                    "ksm_backbone_run": bb_run, "ksm_fingerprint": fp,
                                                    "ksm_tasks": ",".join(tasks)})
    tr.params(parent_id, {
        "run_name": rc["run_name"], "benchmark": rc["benchmark"]["name"], "method": rc["method"]["name"],
        "model": rc["model"]["name"], "model_width": rc["model"].get("width"), "tasks": ",".join(tasks),
        **{f"space.{k}": d.describe() for k, d in ts.space.items()},
        "num_samples": ts.num_samples, "max_epochs": ts.max_epochs, "grace_period": ts.grace_period,
        "reduction_factor": ts.reduction_factor, "holdout": ts.holdout, "cpus_per_trial": ts.cpus_per_trial,
        "gpus_per_trial": ts.gpus_per_trial, "max_concurrent": ts.max_concurrent, "tune_seed": ts.seed,
        "points_to_evaluate": len(ts.points_to_evaluate), "lr_mask": rc["train"]["lr_mask"],
        "lr_head": rc["train"]["lr_head"], "batch_size": rc["train"]["batch_size"], "seed": rc["seed"],
        **{f"fixed.{k}": v for k, v in mask_hparams(rc["method"]).items() if k not in ts.space},
    })
    log(f"[tune] sweep {sweep_id}: {ts.num_samples} trial(s) on {', '.join(tasks)} "
        f"(validation: held-out {ts.holdout:g} of each train split), up to {ts.max_epochs} epoch(s) each, ASHA "
        f"grace {ts.grace_period} rf {ts.reduction_factor:g}; space: "
        + ", ".join(f"{k} ~ {d.describe()}" for k, d in ts.space.items()))
    t0 = time.perf_counter()
    status = "FAILED"
    try:
        refs = {"backbone": ray.put(state)}  # once: every trial maps the same arrays zero-copy
        job_rc = {**rc, "cluster": {**rc["cluster"], "cpus_per_task": ts.cpus_per_trial,
                                    "gpus_per_task": ts.gpus_per_trial},
                  "_run": {"manifest": str(p.manifest.path), "experiment_id": tr.experiment_id,
                           "parent_run_id": parent_id, "sweep_id": sweep_id, "tasks": tasks,
                           "max_epochs": ts.max_epochs, "holdout": ts.holdout}}
        trainable = tune.with_resources(tune.with_parameters(_trial, rc=job_rc, refs=refs),
                                        {"cpu": ts.cpus_per_trial, "gpu": ts.gpus_per_trial})
        outcomes = _outcomes_callback()
        tuner = tune.Tuner(
            trainable,
            param_space={k: d.sampler() for k, d in ts.space.items()},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=ts.num_samples,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=ts.max_epochs,
                                        grace_period=ts.grace_period, reduction_factor=ts.reduction_factor),
                search_alg=BasicVariantGenerator(points_to_evaluate=[dict(x) for x in ts.points_to_evaluate],
                                                 random_state=ts.seed),
                max_concurrent_trials=ts.max_concurrent, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=f"sweep-{sweep_id}", storage_path=str(out_dir / "ray"),
                                      callbacks=[outcomes], verbose=1 if rc.get("progress", True) else 0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
        wall = time.perf_counter() - t0
        trials = _fixup_and_collect(tr, sweep_id, outcomes.trials, ts, log)
        best = _pick_best(trials)
        n_early = sum(t.early_stopped for t in trials)
        n_failed = sum(t.status == "FAILED" for t in trials) + len(set(outcomes.trials) - {t.trial_id for t in trials})
        tr.metrics(parent_id, {"trials": len(trials), "trials_finished": sum(t.status == "FINISHED" for t in trials),
                               "trials_early_stopped": n_early, "trials_failed": n_failed, "wall_seconds": wall})
        log("\n" + _table(trials, keys, best))
        title = (f"sweep {sweep_id}: {len(trials)} trials on {', '.join(tasks)}, {n_early} stopped early "
                 f"(ASHA), {ts.max_epochs} epochs max")
        if best is None:
            errors = [str(e) for e in grid.errors][:1]
            raise PipelineError(f"no trial of sweep {sweep_id} produced a validation accuracy ({n_failed} failed); "
                                f"first error: {errors[0].splitlines()[-1][:500] if errors else 'see the Tune logs'} "
                                f"(trial logs under {out_dir / 'ray'})")
        plot = _plot(trials, best, keys, out_dir / "trials.png", title)
        tr.artifact(parent_id, plot, "tune")
        best_path = out_dir / "best.yaml"
        data = _write_best(best_path, best, ts, rc, tasks, sweep_id, parent_id)
        tr.artifact(parent_id, best_path, "tune")
        best_vals = {**data["method"], **data["train"]}
        tr.params(parent_id, {**{f"best.{k}": v for k, v in best_vals.items() if k != "name"},
                              "best.trial": best.trial_id, "best.run_id": best.run_id})
        tr.metrics(parent_id, {"best_val_acc": best.val_acc,
                               **({"best_val_acc_deployed": best.val_acc_deployed}
                                  if best.val_acc_deployed is not None else {})})
        tr.tags(parent_id, {"ksm_best_run": best.run_id, "ksm_best_yaml": str(best_path)})
        command = _follow_up(best_path)
        log(f"\n[tune] best trial {best.trial_id}: "
            + ", ".join(f"{k}={v:.6g}" for k, v in best_vals.items() if k != "name")
            + f" -> mean validation accuracy {best.val_acc:.4f} ({len(trials)} trials, {n_early} stopped early, "
            f"{n_failed} failed, {wall:.0f} s)")
        log(f"[tune] wrote {best_path} and {plot}")
        log(f"[tune] run the sequence with these values:\n  {command}")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for r in tr.find("RUNNING", ksm_kind="tune_trial", ksm_sweep=sweep_id):  # an interrupted sweep
            tr.tags(r.info.run_id, {"ksm_early_stopped": "false", "ksm_interrupted": "true"})
            tr.finish(r.info.run_id, "KILLED")
        tr.finish(parent_id, status)
    return {"parent_run_id": parent_id, "sweep_id": sweep_id, "experiment_id": tr.experiment_id,
            "best": best_vals, "best_val_acc": best.val_acc, "best_trial": best.trial_id,
            "best_yaml": str(best_path), "plot": str(plot), "command": command, "tasks": tasks,
            "trials": [t.__dict__ for t in trials], "early_stopped": n_early, "failed": n_failed,
            "wall_seconds": wall, "storage": str(out_dir / "ray")}
