"""The ``tune`` section, checked: the search space (which keys, which distributions, in which ranges), ASHA's
settings, the trials' resources and the tuning tasks. Runs before Ray or any data work, once, from
run_pipeline.py; nothing below this floor imports it.

Types were already checked by the schema (pipeline.config.TuneCfg); these are the checks a type cannot say,
each naming the key at fault and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ksm_core import mask_spec

from ..config import MethodCfg, RunConfig
from ..data import Manifest, task_names
from ..data.holdout import part_size
from ..errors import PipelineError

__all__ = ["Dim", "TuneSettings", "check_tune", "tune_tasks", "SPACE_KEYS", "METRIC"]

#: what a trial reports after every epoch (mean over the tuning tasks) and what ASHA and the best pick compare
METRIC = "val_acc"
#: the keys a search space may hold, and the config section each one overrides
SPACE_KEYS: dict[str, str] = {"T": "method", "tau": "method", "k": "method", "lr_mask": "train", "lr_head": "train"}
DISTRIBUTIONS = ("loguniform", "uniform", "choice")
#: the mask threshold is compared with real-valued masks that start at method.init (1e-2); far above that every
#: mask starts (and stays) off, far below it none ever turns off
TAU_RANGE = (0.0, 0.1)


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


def _check_value(key: str, v: Any, where: str, method: MethodCfg) -> None:
    """A value of ``key`` (a range bound, a choice, a start point) must be a number the method accepts."""
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
        raise PipelineError(f"{where}={v!r} must be a finite number")
    if key in ("T", "k") and v <= 0:
        what = "temperature T" if key == "T" else "logistic scale k"
        raise PipelineError(f"{where}={v!r} is out of range: the {what} must be > 0 (it divides or scales the "
                            f"mask's logit; a loguniform range needs low > 0 as well); e.g. "
                            f"{'tune.space.T.low=1' if key == 'T' else 'tune.space.k.low=100'}")
    if key == "tau" and not TAU_RANGE[0] <= v <= TAU_RANGE[1]:
        init = method.init if method.init is not None else 1e-2
        raise PipelineError(f"{where}={v!r} is outside the sane range [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}] for the "
                            f"mask threshold tau (masks start at method.init={init!r}; the "
                            "authors use 5e-3); e.g. tune.space.tau.low=0 tune.space.tau.high=0.02")
    if key in ("lr_mask", "lr_head") and not 0 < v <= 1:
        raise PipelineError(f"{where}={v!r} is out of range: a learning rate must be in (0, 1]; "
                            f"e.g. tune.space.{key}.low=1e-5 tune.space.{key}.high=1e-2")


def _parse_dim(key: str, spec: Any, method: MethodCfg) -> Dim:
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
    values = spec.get("values")
    if kind == "choice":
        if not isinstance(values, (list, tuple)) or not values:
            raise PipelineError(f"{where}.values={values!r} must be a non-empty list, e.g. "
                                f"{where}.values=[10,100,1000]")
        for i, v in enumerate(values):
            _check_value(key, v, f"{where}.values[{i}]", method)
        return Dim(key, kind, values=tuple(float(v) for v in values))
    if values is not None:
        raise PipelineError(f"{where}.values is set but {where}.type={kind!r} takes low and high; for a list of "
                            f"values set {where}.type=choice")
    low, high = spec.get("low"), spec.get("high")
    for name, v in (("low", low), ("high", high)):
        if v is None:
            raise PipelineError(f"{where}.{name} is missing; a {kind} range needs both low and high")
        _check_value(key, v, f"{where}.{name}", method)
    assert low is not None and high is not None
    if low == high:
        raise PipelineError(f"{where}: low={low!r} == high={high!r} is an empty range; give low < high, or drop "
                            f"{key} from the search ({where}=null) and set it in the method/train config instead")
    if low > high:
        raise PipelineError(f"{where}: low={low!r} >= high={high!r} is an empty or inverted range; give "
                            f"low < high, e.g. {where}.low={high!r} {where}.high={low!r}")
    if kind == "loguniform" and low <= 0:
        raise PipelineError(f"{where}.low={low!r}: a loguniform range needs low > 0; use type uniform, or a "
                            f"positive low such as {where}.low={high / 1000:g}")
    return Dim(key, kind, float(low), float(high))


def _method_ignores(method: MethodCfg, key: str) -> str | None:
    """Why ``method`` ignores ``key`` (None when it uses it)."""
    spec = mask_spec(method.name)
    name = method.name
    if key in ("T", "k") and spec.binarizer != "softmax":
        return (f"method.name={name!r} has no softmax trick, so {key} does nothing; tune it with a KSM method "
                f"(method=ksm) or drop it: tune.space.{key}=null")
    if key == "tau" and not spec.masked:
        return f"method.name={name!r} learns no mask, so tau does nothing; drop it: tune.space.tau=null"
    if key == "lr_mask" and name == "finetune":
        return "method.name='finetune' trains with train.lr_finetune, so lr_mask does nothing; drop it: " \
               "tune.space.lr_mask=null"
    return None


def _at_least(name: str, v: float, lo: float, hint: str = "") -> None:
    if not v >= lo:
        raise PipelineError(f"tune.{name}={v!r} must be {'an int' if isinstance(v, int) else 'a number'} >= {lo:g}{hint}")


def check_tune(rc: RunConfig) -> TuneSettings:
    """Validate the ``tune`` section (no Ray, no MLflow, no data); raises PipelineError naming the key and fix."""
    t, method = rc.tune, rc.method
    unknown = sorted(set(t.space) - set(SPACE_KEYS))
    if unknown:
        raise PipelineError(f"tune.space.{unknown[0]} is not a tunable key; valid keys: {', '.join(SPACE_KEYS)} "
                            f"(remove it, e.g. `~tune.space.{unknown[0]}`)")
    space = {k: _parse_dim(k, v, method) for k, v in t.space.items() if v is not None}
    if not space:
        raise PipelineError(f"tune.space has nothing to search (every key is null); give at least one of "
                            f"{', '.join(SPACE_KEYS)}, e.g. tune.space.T={{type:loguniform,low:1,high:1000}}")
    for key in space:
        why = _method_ignores(method, key)
        if why:
            raise PipelineError(f"tune.space.{key}: {why}")
    _at_least("num_samples", t.num_samples, 1)
    _at_least("max_epochs", t.max_epochs, 1)
    _at_least("grace_period", t.grace_period, 1)
    if t.grace_period > t.max_epochs:
        raise PipelineError(f"tune.grace_period={t.grace_period} > tune.max_epochs={t.max_epochs}: every trial would "
                            f"end before ASHA may stop it; set tune.grace_period <= {t.max_epochs}")
    if not t.reduction_factor > 1:
        raise PipelineError(f"tune.reduction_factor={t.reduction_factor:g} must be a number > 1 (2 keeps the top half "
                            "at each rung)")
    if not 0 < t.holdout < 1:
        raise PipelineError(f"tune.holdout={t.holdout:g} must be in (0, 1): the validation part of each task's train "
                            "split (the test split is never used for tuning); e.g. tune.holdout=0.2")
    if not t.cpus_per_trial > 0:
        raise PipelineError(f"tune.cpus_per_trial={t.cpus_per_trial:g} must be a number > 0")
    _at_least("gpus_per_trial", t.gpus_per_trial, 0, " (0 = CPU trials)")
    if t.gpus_per_trial > 1 and t.gpus_per_trial != int(t.gpus_per_trial):
        raise PipelineError(f"tune.gpus_per_trial={t.gpus_per_trial} must be a fraction <= 1 or a whole number")
    if t.max_concurrent is not None:
        _at_least("max_concurrent", t.max_concurrent, 1, ", or null (as many as fit)")
    tasks = _check_task_list(rc)
    if len(t.points_to_evaluate) > t.num_samples:
        raise PipelineError(f"tune.points_to_evaluate has {len(t.points_to_evaluate)} points but tune.num_samples="
                            f"{t.num_samples}; each point takes one sample: raise tune.num_samples to >= "
                            f"{len(t.points_to_evaluate)}")
    points = []
    for i, pt in enumerate(t.points_to_evaluate):
        where = f"tune.points_to_evaluate[{i}]"
        if set(pt) != set(space):
            raise PipelineError(f"{where}={dict(pt)!r} must give exactly the searched keys {sorted(space)}")
        for k, v in pt.items():
            _check_value(k, v, f"{where}.{k}", method)
            if not space[k].contains(float(v)):
                raise PipelineError(f"{where}.{k}={v!r} is outside tune.space.{k} = {space[k].describe()}; "
                                    "move the point inside the space or widen the space")
        points.append({k: float(v) for k, v in pt.items()})
    return TuneSettings(space=space, tasks=tasks, num_samples=t.num_samples, max_epochs=t.max_epochs,
                        grace_period=t.grace_period, reduction_factor=float(t.reduction_factor),
                        holdout=float(t.holdout), cpus_per_trial=float(t.cpus_per_trial),
                        gpus_per_trial=float(t.gpus_per_trial), max_concurrent=t.max_concurrent, seed=t.seed,
                        points_to_evaluate=points)


def _check_task_list(rc: RunConfig) -> list[str] | None:
    """tune.tasks: null, one bare name or a list of names, each a new task of the benchmark where its config
    says which tasks it has (else checked against the shards' manifest by :func:`tune_tasks`)."""
    tasks = rc.tune.tasks
    if tasks is None:
        return None
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(x, str) and x for x in tasks):
        raise PipelineError(f"tune.tasks={tasks!r} must be a non-empty list of task names, e.g. "
                            "tune.tasks=[t1,t2], or null for the benchmark's first two new tasks")
    if len(set(tasks)) != len(tasks):
        raise PipelineError(f"tune.tasks={list(tasks)} names a task twice")
    known = task_names(rc.benchmark)
    if known:
        _check_tasks(list(tasks), known[1:], rc.benchmark.get("name"), known[0])
    return list(tasks)


def _check_tasks(tasks: list[str], new_tasks: list[str], bench_name: Any, initial: str | None = None) -> None:
    for name in tasks:
        if name not in new_tasks:
            hint = f" ({name} is the initial task: it trains the backbone)" if initial and name == initial else ""
            raise PipelineError(f"tune.tasks: {name!r} is not a new task of benchmark {bench_name!r}{hint}; its new "
                                f"tasks: {', '.join(new_tasks) or '(none)'}; "
                                f"e.g. tune.tasks=[{','.join(new_tasks[:2])}]")


def tune_tasks(ts: TuneSettings, manifest: Manifest) -> list[str]:
    """The tuning tasks checked against the shards' manifest, each with a non-empty fit and validation part."""
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
