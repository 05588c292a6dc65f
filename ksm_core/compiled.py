"""A task's training forward through torch.compile, compiled once per process and shared by every task (issue #26).

What is compiled: the network's whole training forward up to the head (masked convs and Linears with their
masks, per-task BN, ReLU, pooling; backward through AOTAutograd), so inductor fuses each masked layer's
element-wise passes (threshold, soft part, W * M forward; kernel sum and the softmax trick's slope backward) and
the BN / ReLU around the convs. Under tracing the mask is written in plain differentiable ops
(``masks._plain_masked_weight``), which AOTAutograd's on-disk cache can hold: a fresh process finds the graph
there instead of compiling it again.

What makes it once per process: one compiled function per key (``graph_key``: the layers' shapes and the mask
spec's constants), kept in a module-level cache for the life of the process (a Ray worker trains many tasks);
dynamo treats a module's parameters and buffers as graph inputs, so a new task's network of the same shapes
hits the same compiled code. Two things that differ between tasks are kept out of the graph:

* the head: while the compiled trunk runs, ``TaskHeads.passthrough`` makes the heads return their input, and
  the task's head (its width is the task's number of classes) is applied eagerly to the trunk's output;
* the batch size: the graph is compiled for the first training batch's shape; any other batch (an epoch's
  smaller last batch) runs the eager forward, which computes the same values. Nothing is padded or dropped.

Evaluation, deploy and the head refit always run the network itself, eagerly.

``train.compile=auto`` (``should_compile``): on when this process already holds the graph (free), or when the
task's own steps, or the steps this process has already run eagerly for the same key, reach ``BREAK_EVEN_STEPS``
(buy once the rent paid equals the price); off for one-off short tasks.
"""
from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["BREAK_EVEN_STEPS", "TrainForward", "graph_key", "is_cached", "should_compile", "note_eager_steps",
           "cache_info", "clear_cache"]

#: train.compile=auto compiles once a process will have trained this many steps of one key: the one-off compile
#: divided by what a compiled step saves (benchmarks/bench_compile.py, RESULTS.md "Compile once per worker").
#: Measured on this 2-core CPU (vgg16_bn_cifar width 0.125, 1 torch thread, batch 32): a compiled KSM step saves
#: 9.5 ms alone, 6.7 ms through the pipeline (its data loading and short last batch stay eager). The price is
#: what a worker pays the first time: 1.9 s when inductor's disk cache already holds the graph (a machine that
#: ran it before: ~300 steps), 19.4 s when it is cold (a fresh machine, CI: ~2900 steps). The cold price is the
#: one kept, so that auto never loses more than a compile's worth on a fresh machine; a long stream on warm nodes
#: gains from ``train.compile=true`` (RESULTS.md).
BREAK_EVEN_STEPS = 3000


@dataclass
class _Entry:
    fn: Callable[[Any, Tensor], Tensor]
    shape: tuple[int, ...] | None = None   # the input shape the graph was compiled for (its first call's)


_CACHE: dict[tuple, _Entry] = {}
_EAGER_STEPS: dict[tuple, int] = {}
_STATS = {"compiled": 0, "hits": 0}


def graph_key(net: Any, task: int) -> tuple | None:
    """What the compiled graph depends on beyond dynamo's own guards: every masked layer's weight shape, strides,
    dtype and device, the task's state shape (mask granularity, or a fine-tune copy), and the spec's constants
    (they are constants in the graph). None for the backbone's own task (nothing trains)."""
    spec = net.specs[task]
    if spec.method == "base":
        return None
    k = str(task)
    layers = tuple((type(m).__name__, tuple(m.weight.shape), tuple(m.weight.stride()), str(m.weight.dtype),
                    str(m.weight.device), tuple(m.tasks[k].mask_real.shape) if spec.masked else None)
                   for _, m in net.masked_layers())
    return layers + (spec.method, float(spec.tau), float(spec.k / spec.T), bool(spec.soft), spec.binarizer)


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
    """Count steps this process ran eagerly for a key (``should_compile``'s rent paid so far)."""
    if key is not None:
        _EAGER_STEPS[key] = _EAGER_STEPS.get(key, 0) + steps


def _trunk(net: Any, x: Tensor) -> Tensor:
    return net(x)


def _compiled() -> Callable[[Any, Tensor], Tensor]:
    # dynamo keeps its compiled entries on the function's code object, and recompiles of one code object are
    # capped (torch._dynamo.config.recompile_limit): each key gets a code object of its own, so any number of
    # keys (backbones, mask variants, Tune's thresholds) never share, evict or exhaust each other's entries
    fn = types.FunctionType(_trunk.__code__.replace(), _trunk.__globals__, "ksm_train_trunk")
    return torch.compile(fn, dynamic=False)


class TrainForward:
    """A KSMNet's training forward for one task with the process's compiled trunk (module docstring). Construct
    per fit; ``new`` says whether this fit created the graph (it compiles on its first full batch)."""

    def __init__(self, net: Any, task: int):
        self.net, self.task = net, task
        self.key = graph_key(net, task)
        if self.key is None:
            raise ValueError(f"task {task} ({net.specs[task].method}) trains nothing: no forward to compile")
        self.head = net.heads.tasks[str(task)]
        self.new = self.key not in _CACHE
        if self.new:
            _CACHE[self.key] = _Entry(_compiled())
            _STATS["compiled"] += 1
        else:
            _STATS["hits"] += 1
        self.entry = _CACHE[self.key]
        self.ok: bool | None = None   # the head is the body's last step (checked on the first call)

    def _head_is_last(self, x: Tensor) -> bool:
        """The trunk-then-head split computes what the network does: checked once per fit, in eval mode (no BN
        statistics move) on a few samples. A body that does anything after its head (a squeeze, a softmax)
        trains eagerly instead."""
        was = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                xs = x[:2]
                want = self.net(xs)
                self.net.heads.passthrough = True
                try:
                    got = self.head(self.net(xs))
                finally:
                    self.net.heads.passthrough = False
        finally:
            self.net.train(was)
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)

    def __call__(self, x: Tensor) -> Tensor:
        net = self.net
        if not (net.training and torch.is_grad_enabled()) or net.task != self.task:
            return net(x)  # eval / no-grad / another task: the eager path
        if self.ok is None:
            self.ok = self._head_is_last(x)
        if not self.ok:
            return net(x)
        entry = self.entry
        if entry.shape is None:
            entry.shape = tuple(x.shape)
        if tuple(x.shape) != entry.shape:  # another batch size (the short last batch): eager, same values
            return net(x)
        net.heads.passthrough = True
        try:
            feats = entry.fn(net, x)
        finally:
            net.heads.passthrough = False
        return self.head(feats)


def cache_info() -> dict[str, int]:
    """Graphs held, fits that created one, fits that reused one (this process)."""
    return {"graphs": len(_CACHE), **_STATS}


def clear_cache() -> None:
    """Forget every compiled graph and step count (e.g. after ``torch._dynamo.reset()``, which drops dynamo's
    compiled code under the cached wrappers)."""
    _CACHE.clear()
    _EAGER_STEPS.clear()
    _STATS.update(compiled=0, hits=0)
