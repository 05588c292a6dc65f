"""The masked training step's mask path, compiled once per process and shared by every task (issue #26).

What a masked task adds to a plain step is weight-shaped work: for every masked layer, M(Mr) (threshold, soft
part) and W * M forward, and sum-over-kernel plus the softmax trick's slope backward: ~13 element-wise passes
over the masks that eager PyTorch runs one kernel each. None of it depends on the batch, on the head or on which
task it is: only on the backbone's weight shapes and the mask spec's constants. So it is compiled as ONE graph
(every masked layer's W_task from (weights, real masks), forward and backward) per such key, kept in a
module-level cache for the life of the process (a Ray worker trains many tasks: the second one hits it, no
recompile), and fed each task's own tensors as inputs. The convolutions, BN and the per-task head stay eager,
so the head's width and the batch size (an epoch's smaller last batch included: it is neither padded nor
dropped, evaluation sees every sample) never trigger a recompile.

``train.compile=auto`` (``should_compile``): on when this process already holds the graph (free), or when the
task's own steps, or the eager masked steps this process has already run of the same graph, reach
``BREAK_EVEN_STEPS`` (buy once the rent paid equals the price); off for one-off short tasks. The fine-tune
baseline and plain networks have no mask path: nothing of theirs is cached (see ``ksm_core.train``).
"""
from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .masks import _MaskedWeight

__all__ = ["BREAK_EVEN_STEPS", "MaskedForward", "graph_key", "is_cached", "should_compile", "note_eager_steps",
           "cache_info", "clear_cache"]

#: train.compile=auto compiles once a process will have trained this many masked steps of one graph: the one-off
#: compile of the mask graph divided by what the compiled mask path saves per step (benchmarks/bench_compile.py,
#: RESULTS.md "Compile once per worker"). Measured on this 2-core CPU (narrow VGG16, 1 torch thread, batch 32, warm
#: inductor disk cache) on a quiet machine (load 0.7): 12.7 s to compile / 3.19 ms saved per step (29.35 -> 26.16 ms)
#: = 3998 steps. At load ~12 the same measure gave 63.2 s / 57.4 ms = 1101: load stretched the steps more than the
#: compile, so the quiet figure is the one kept.
BREAK_EVEN_STEPS = 4000

_CACHE: dict[tuple, Callable[[list[Tensor], list[Tensor]], list[Tensor]]] = {}
_EAGER_STEPS: dict[tuple, int] = {}
_STATS = {"compiled": 0, "hits": 0}


def graph_key(net: Any, task: int) -> tuple | None:
    """What the compiled graph depends on: every masked layer's weight shape, strides, dtype and device, the
    mask shape (granularity), and the spec's constants. None for a task with no mask path (fine-tune, base)."""
    spec = net.specs[task]
    if not spec.masked or spec.binarizer not in ("softmax", "ste"):
        return None
    k = str(task)
    layers = tuple((tuple(m.weight.shape), tuple(m.weight.stride()), str(m.weight.dtype), str(m.weight.device),
                    tuple(m.tasks[k].mask_real.shape)) for _, m in net.masked_layers())
    return layers + (float(spec.tau), float(spec.k / spec.T), bool(spec.soft), spec.binarizer == "ste")


def is_cached(key: tuple | None) -> bool:
    return key is not None and key in _CACHE


def should_compile(key: tuple | None, task_steps: int | None) -> bool:
    """``compile=auto``'s rule (module docstring): cached already, or enough steps ahead or behind."""
    if key is None:
        return False
    if key in _CACHE:
        return True
    return (task_steps or 0) >= BREAK_EVEN_STEPS or _EAGER_STEPS.get(key, 0) >= BREAK_EVEN_STEPS


def note_eager_steps(key: tuple | None, steps: int) -> None:
    """Count masked steps this process ran eagerly (``should_compile``'s rent paid so far)."""
    if key is not None:
        _EAGER_STEPS[key] = _EAGER_STEPS.get(key, 0) + steps


def _task_weights(weights: list[Tensor], masks: list[Tensor], tau: float, scale: float, soft: bool,
                  ste: bool) -> list[Tensor]:
    # the eager fused node itself, so values and gradients are the eager ones up to float summation order
    return [_MaskedWeight.apply(w, m, tau, scale, soft, ste) for w, m in zip(weights, masks)]


def _compiled(key: tuple) -> Callable[[list[Tensor], list[Tensor]], list[Tensor]]:
    tau, scale, soft, ste = key[-4:]

    def task_weights(weights: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        return _task_weights(weights, masks, tau, scale, soft, ste)

    # dynamo keeps its compiled entries on the function's code object, and recompiles of one code object are
    # capped (torch._dynamo.config.recompile_limit): each key gets a code object of its own, so any number of
    # keys (backbones, mask variants) never share, evict or exhaust each other's entries
    fn = types.FunctionType(task_weights.__code__.replace(), task_weights.__globals__, "ksm_task_weights", None,
                            task_weights.__closure__)
    return torch.compile(fn, dynamic=False, fullgraph=True)


class MaskedForward:
    """A KSMNet's training forward for one masked task with the compiled mask path: every layer's W_task from
    the cached graph, then the network's own (eager) forward using them. Construct per fit; ``new`` says
    whether this fit created the graph (it compiles on the first call, its backward on the first backward)."""

    def __init__(self, net: Any, task: int):
        self.net, self.task = net, task
        self.key = graph_key(net, task)
        if self.key is None:
            raise ValueError(f"task {task} ({net.specs[task].method}) has no mask path to compile")
        k = str(task)
        self.layers = [m for _, m in net.masked_layers()]
        self.weights = [m.weight for m in self.layers]
        self.masks = [m.tasks[k].mask_real for m in self.layers]
        self.new = self.key not in _CACHE
        if self.new:
            _CACHE[self.key] = _compiled(self.key)
            _STATS["compiled"] += 1
        else:
            _STATS["hits"] += 1
        self.fn = _CACHE[self.key]

    def __call__(self, x: Tensor) -> Tensor:
        if not (self.net.training and torch.is_grad_enabled()) or self.net.task != self.task:
            return self.net(x)  # eval / no-grad / another task: the eager path
        outs = self.fn(self.weights, self.masks)
        for m, w in zip(self.layers, outs):
            m.weight_override = w
        try:
            return self.net(x)
        finally:
            for m in self.layers:
                m.weight_override = None


def cache_info() -> dict[str, int]:
    """Graphs held, fits that created one, fits that reused one (this process)."""
    return {"graphs": len(_CACHE), **_STATS}


def clear_cache() -> None:
    """Forget every compiled graph and step count (e.g. after ``torch._dynamo.reset()``, which drops dynamo's
    compiled code under the cached wrappers)."""
    _CACHE.clear()
    _EAGER_STEPS.clear()
    _STATS.update(compiled=0, hits=0)
