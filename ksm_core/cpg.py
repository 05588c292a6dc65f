"""CPG-lite: Compacting, Picking and Growing (Hung et al., NeurIPS 2019, ``ivclab/CPG``), on PackNet's machinery.

Like PackNet (ksm_core.packnet), one shared weight tensor per layer with a uint8 owner per weight, tasks in a
chain, no forgetting by construction. Per task t, as their CIFAR-100 script (experiment1/CPG_cifar100_scratch_
mul_1.5.sh) runs it:

1. **pick + train**: the free weights become task t's and train; task t also learns a Piggyback mask (element-
   wise, real-valued, threshold 5e-3, straight-through) over the weights of tasks < t, which it may use or not.
   Theirs: 100 epochs, lr 1e-2 weights / 5e-4 mask. Task 0 (the backbone, trained already) skips this step.
2. **compact** by gradual pruning: prune task t's own weights to sparsity 0.1, 0.2, ..., 0.9, 0.95 (of what it
   was given), each step followed by ``prune_epochs`` of training (weights, BN, head; mask frozen, as their
   ``--lr_mask 0.0``) and a test; stop at the first step below the accuracy goal and go back to the sparsest
   one that reached it (none: unpruned), as their ``choose_appropriate_pruning_ratio_for_next_task.py``.
   Theirs: 20 epochs a step.
3. **retrain** mask and kept weights for ``retrain_epochs`` (theirs: 30), kept only if the accuracy rose (their
   ``choose_retrain_or_not.py``). Then freeze.

The accuracy goal: theirs is the accuracy of a network trained on task t alone (``baseline_cifar100_acc.txt``,
trained beforehand and not in their time); here ``goal`` if the caller gives one (e.g. a KSM or fine-tune run's
accuracy on the task), else the task's own accuracy after step 1 (allow_acc_loss 0, as theirs).

Simplifications, each measured or named in the result:

* **No growing.** Theirs widens every layer by 0.5x (up to 1.5x) and repeats step 1 when its accuracy stays
  below the goal. Here the task goes on below its goal and ``CPGResult.goal_met`` says so (growth = 0).
* As PackNet here: Adam with ``TrainConfig``'s rates and cosine schedule (not SGD), per-task BN and head, the
  backbone's biases frozen; step 1/2/3 epochs default to ``cfg.epochs`` and 0.2x / 0.3x of it (their 100/20/30).
* The goal is checked on ``test_loader``, as theirs checks it on the test set.

Bytes per task: PackNet's (1 bit of ownership per shared weight + BN + head) plus the pick mask, 1 bit per
shared weight. The network never grows here.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .masks import MASK_INIT, TAU, piggyback_mask
from .packnet import FREE, PackedConv2d, PackedLinear, PackNet, check_epochs
from .train import EpochCallback, FitResult, TrainConfig

__all__ = ["CPG", "CPGResult", "CPGConv2d", "CPGLinear", "sparsity_steps", "CHAINS"]


def sparsity_steps(step: float, last: float) -> list[float]:
    """Their schedule: step, 2 step, ... below ``last``, then ``last`` (0.1 .. 0.9, 0.95)."""
    out, k = [], 1
    while k * step < last - 1e-9:
        out.append(round(k * step, 6))
        k += 1
    return out + [last]


class _Picking:
    """Per task t, a mask over the weights of tasks < t: which of them t uses. Trained: a Parameter; frozen: the
    binary decision as a bool buffer (what the artifact stores)."""

    def add_pick(self, task: int) -> None:
        self.picks.register_parameter(f"t{task}", nn.Parameter(torch.full_like(self.weight, MASK_INIT),
                                                                requires_grad=False))

    @torch.no_grad()
    def freeze_pick(self, task: int, bits: Tensor | None = None) -> None:
        name = f"t{task}"
        cur = getattr(self.picks, name, None)
        if cur is None or (bits is None and cur.dtype == torch.bool):
            return
        hard = bits.to(self.weight.device) if bits is not None else cur.detach() >= TAU
        delattr(self.picks, name)
        self.picks.register_buffer(name, hard.reshape(self.weight.shape))

    def task_weight(self, task: int | None = None) -> Tensor:
        t = self.task if task is None else task
        pick = getattr(self.picks, f"t{t}", None)
        if pick is None:  # task 0: no earlier task to pick from
            return super().task_weight(task)
        oid = t + 1
        own = self.owner == oid
        earlier = ((self.owner != FREE) & (self.owner < oid)).to(self.weight.dtype)
        mb = pick.to(self.weight.dtype) if pick.dtype == torch.bool else piggyback_mask(pick, training=self.training)
        # own weights: values with gradient; earlier ones: frozen values, times the pick (gradient into the pick)
        return torch.where(own, self.weight, self.weight.detach() * (earlier * mb))


class CPGConv2d(_Picking, PackedConv2d):
    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv)
        self.picks = nn.Module()


class CPGLinear(_Picking, PackedLinear):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.picks = nn.Module()


@dataclass
class CPGResult:
    """One CPG task: its phases, the gradual pruning's record, and whether its goal was met."""

    train: FitResult | None
    retrain: FitResult | None
    prune_steps: list[dict[str, float]] = field(default_factory=list)  # {"sparsity", "test_acc", "seconds"}
    sparsity: float = 0.0         # the chosen one
    goal: float = float("nan")    # a step is kept while its test_acc + allow_loss >= goal
    goal_met: bool = True         # after step 1: False is where theirs would grow the network
    grown: float = 0.0            # width added (not implemented: always 0)
    retrain_kept: bool = False
    test_acc: float = float("nan")
    test_loss: float = float("nan")
    train_seconds: float = 0.0    # every phase, the prunes, the tests that choose, the head refit
    owned: int = 0
    free_after: int = 0
    total_weights: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CPG(PackNet):
    """CPG-lite. ``from_backbone(model, prune=0.95, step=0.1)``: ``prune`` is the sparsest step the gradual
    pruning tries, ``step`` the increment. Then as PackNet: ``train_task(0, ...)`` and add_task/train_task."""

    FORMAT = "ksm-cpg/1"
    CHAIN_FORMAT = "ksm-cpg-chain/1"
    CONV, LINEAR = CPGConv2d, CPGLinear

    @classmethod
    def from_backbone(cls, backbone: nn.Module, prune: float = 0.95, head: str = "auto", step: float = 0.1) -> "CPG":
        net = super().from_backbone(backbone, prune=prune, head=head)
        if not (isinstance(step, (int, float)) and 0 < step <= prune):
            raise ValueError(f"step={step!r} must be a number in (0, prune={prune}]")
        net.step = float(step)
        return net

    def _chain_settings(self) -> dict[str, Any]:
        return {"step": self.step}

    @classmethod
    def _settings_from(cls, meta: dict[str, Any]) -> dict[str, Any]:
        return {"step": float(meta["step"])}

    def add_task(self, num_classes: int, name: str | None = None) -> int:
        t = super().add_task(num_classes, name)
        for _, m in self.packed_layers():
            m.add_pick(t)
        return t

    def _picks(self, task: int) -> list[nn.Parameter]:
        return [p for _, m in self.packed_layers() for p in [getattr(m.picks, f"t{task}", None)]
                if isinstance(p, nn.Parameter)]

    def _groups(self, task, cfg):
        groups, trainable = super()._groups(task, cfg)
        picks = self._picks(task)
        for p in picks:
            p.requires_grad_(True)
        return groups + [{"params": picks, "lr": cfg.lr_mask, "pick": True}], trainable + picks

    def _freeze(self, task: int) -> None:
        super()._freeze(task)
        for _, m in self.packed_layers():
            m.freeze_pick(task)

    def _bits_per_weight(self, task: int) -> int:
        return 2 if task else 1  # ownership + pick

    def _extra_arrays(self, task: int) -> dict[str, np.ndarray]:
        out = {}
        for name, m in self.packed_layers():
            pick = getattr(m.picks, f"t{task}", None)
            if pick is not None:
                out[f"pick.{name}.bits"] = np.packbits((pick.detach() >= TAU if pick.dtype != torch.bool else pick)
                                                       .reshape(-1).cpu().numpy())
        return out

    def _load_extra(self, task: int, arrays: dict[str, np.ndarray]) -> None:
        for name, m in self.packed_layers():
            key = f"pick.{name}.bits"
            if key in arrays:
                bits = np.unpackbits(arrays[key], count=m.weight.numel()).astype(bool)
                m.freeze_pick(task, torch.from_numpy(bits))

    # -- snapshots: the gradual pruning goes back to its best step ------------------------------------------
    @torch.no_grad()
    def _snapshot(self, task: int) -> dict[str, Any]:
        return {"layers": [(m.weight.detach().clone(), m.owner.clone()) for _, m in self.packed_layers()],
                "picks": [p.detach().clone() for p in self._picks(task)],
                "task": [{k: v.clone() for k, v in mod.state_dict().items()} for mod in self._task_modules(task)]}

    @torch.no_grad()
    def _restore(self, task: int, snap: dict[str, Any]) -> None:
        for (_, m), (w, o) in zip(self.packed_layers(), snap["layers"]):
            m.weight.copy_(w)
            m.owner.copy_(o)
        for p, v in zip(self._picks(task), snap["picks"]):
            p.copy_(v)
        for mod, sd in zip(self._task_modules(task), snap["task"]):
            mod.load_state_dict(sd)

    # -- training -----------------------------------------------------------------------------------------
    def train_task(self, task: int, train_loader: Iterable, test_loader: Iterable | None = None,
                   cfg: TrainConfig | None = None, retrain_epochs: int | None = None,
                   on_epoch: EpochCallback | None = None, *, goal: float | None = None,
                   allow_loss: float = 0.0, prune_epochs: int | None = None) -> CPGResult:
        """Pick + train, compact by gradual pruning down to the accuracy ``goal``, retrain, freeze (see module
        doc). A pruning step is kept while its accuracy + ``allow_loss`` >= ``goal`` (their ``--allow_acc_loss``,
        0 in their script). ``prune_epochs`` / ``retrain_epochs``: default 0.2x / 0.3x ``cfg.epochs`` (at least 1).
        A task that keeps every weight it was given leaves none for the next: theirs grows the network then,
        here the next task's train_task raises ValueError."""
        cfg = cfg or TrainConfig()
        if test_loader is None:
            raise ValueError("test_loader=None: CPG chooses its sparsity by the accuracy it measures there")
        if goal is not None and not (isinstance(goal, (int, float)) and 0 <= goal <= 1):
            raise ValueError(f"goal={goal!r} must be an accuracy in [0, 1] or None (the task's own, unpruned)")
        if not (isinstance(allow_loss, (int, float)) and 0 <= allow_loss <= 1):
            raise ValueError(f"allow_loss={allow_loss!r} must be in [0, 1] (their script: 0)")
        prune_epochs = max(1, round(0.2 * cfg.epochs)) if prune_epochs is None else prune_epochs
        retrain_epochs = max(1, round(0.3 * cfg.epochs)) if retrain_epochs is None else retrain_epochs
        check_epochs("prune_epochs", prune_epochs)
        check_epochs("retrain_epochs", retrain_epochs)
        dev = self._begin(task, cfg)
        groups, trainable = self._groups(task, cfg)
        no_pick = [g for g in groups if not g.get("pick")]  # their prune stage: --lr_mask 0.0
        t_start = time.perf_counter()

        def phase(name, gs, epochs):
            return self._phase(name, gs, train_loader, None, replace(cfg, epochs=epochs), dev, on_epoch)

        res = CPGResult(None, None)
        try:
            res.train = phase("train", groups, cfg.epochs) if task > 0 else None
            acc = self.evaluate(task, test_loader, cfg)[0]
            res.goal = acc if goal is None else float(goal)
            res.goal_met = acc >= res.goal   # theirs would grow the network here when not
            given = self.owned_per_layer(task)
            best, best_acc = self._snapshot(task), acc
            for s in sparsity_steps(self.step, self.prune):
                t0 = time.perf_counter()
                self._prune(task, self._keep(task, s, given))
                if prune_epochs:
                    phase(f"prune{s}", no_pick, prune_epochs)
                acc = self.evaluate(task, test_loader, cfg)[0]
                res.prune_steps.append({"sparsity": s, "test_acc": acc, "seconds": time.perf_counter() - t0})
                if acc + allow_loss < res.goal:
                    break
                best, best_acc, res.sparsity = self._snapshot(task), acc, s
            self._restore(task, best)
            if task > 0 and retrain_epochs:
                res.retrain = phase("retrain", groups, retrain_epochs)
                acc = self.evaluate(task, test_loader, cfg)[0]
                res.retrain_kept = acc > best_acc
                if not res.retrain_kept:
                    self._restore(task, best)
            self._refit(task, train_loader, cfg)
        finally:
            for p in trainable:
                p.requires_grad_(False)
        self._freeze(task)
        res.train_seconds = time.perf_counter() - t_start  # all of it: CPG's tests are part of its choice
        res.owned, res.free_after, res.total_weights = self.owned(task), self.free(), self.total_weights()
        res.test_acc, res.test_loss = self.evaluate(task, test_loader, cfg)
        return res


#: the sequential methods by name (the pipeline's method=packnet|cpg): the class that trains a chain and loads its
#: file (``load_chain``), for the pipeline and for the served model alike
CHAINS: dict[str, type[PackNet]] = {"packnet": PackNet, "cpg": CPG}
