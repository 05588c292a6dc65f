"""PackNet (Mallya & Lazebnik, CVPR 2018) on ksm_core's backbones: the sequential baseline of issue #28.

One shared weight tensor per Conv2d / Linear (the head excepted) and, beside it, one uint8 *owner* tensor of
the same shape: 0 = free, ``t + 1`` = owned by task ``t`` (task 0 is the backbone's own task, as in KSMNet).
Task ``t`` sees every weight owned by tasks ``0..t`` and nothing else::

    W_t = W * (1 <= owner <= t + 1)

Per task, in order (a chain: task t needs tasks < t):

1. **train** the free weights (they become task t's; earlier tasks' weights are read, never written), with
   the task's own BatchNorm and head, as KSMNet's tasks have;
2. **prune** a fraction ``prune`` of task t's weights in each layer, smallest magnitude first: they are zeroed
   and freed for the next task;
3. **retrain** the weights task t kept for ``retrain_epochs``;
4. **freeze** them: task t's accuracy can never change again (no forgetting, by construction).

The initial task follows their scripts (ImageNet-pretrained VGG -> prune 0.5 -> retrain -> next task): task 0
owns every weight of the trained backbone at first, and ``train_task(0, ...)`` skips step 1 (the backbone is
trained already), prunes it once and retrains the kept weights, its BN and head on the initial task's data.
``retrain_epochs=0`` prunes without retraining. Without that, no weight is free for task 1.

Simplifications against their code (``arunmallya/packnet``), each for comparability with our KSM runs: Adam with
ksm_core's ``TrainConfig`` learning rates (``lr_finetune`` for the weights, ``lr_mask`` for BN, ``lr_head``) and
cosine schedule instead of SGD; per-task BN and head (theirs: BN and biases frozen after the first task); the
hidden Linear layers' biases stay the backbone's (ours have bias, the convs do not); the optional head refit
(``TrainConfig.head_refit``) after the retrain, as for KSM tasks. Freed weights restart from 0, as theirs do.

Why frozen weights stay bit-identical: the layer's forward uses ``where(owner == t + 1, W, W.detach())``, so
the gradient is exactly 0 outside task t's own weights, and Adam (no weight decay: refused) moves a weight whose
gradient has always been 0 by exactly 0.

Bytes per task (``task_bytes``), counted as the papers count PackNet: the shared weight tensor never grows (it
is the backbone's size, whatever the number of tasks), so what task t adds is its ownership, 1 bit per weight
(whether it owns it; the uint8 owner map is these bits for up to 254 tasks), and its BN + head as fp32. Its
artifact (``save_task``) also stores the *values* of the weights it owns (fp32), so that the chain can be
rebuilt from the original backbone: ``artifact_bytes`` is that file's size, reported beside.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save as np_save
from torch import Tensor, nn

from .artifact import BackboneMismatch, load_bn_head, pack_bn_head, read_metadata, write_atomic
from .layers import TaskAware, TaskBatchNorm, TaskHeads, modules_of
from .network import find_head, fingerprint, swap_task_layers
from .train import (EpochCallback, FitResult, TrainConfig, _fit_epochs, drain_epochs, evaluate, refit_head,
                    resolve_device)

__all__ = ["PackNet", "PackNetResult", "PackedConv2d", "PackedLinear", "FORMAT", "CHAIN_FORMAT", "PRUNE_DEFAULT"]

FORMAT = "ksm-packnet/1"
CHAIN_FORMAT = "ksm-packnet-chain/1"   # the whole chain after its last task, in one file (save_chain)
FREE = 0
MAX_TASKS = 254          # owner ids 1..255 in a uint8
PRUNE_DEFAULT = 0.5      # the default, Mallya's for the ImageNet step; CPG's CIFAR-100 PackNet script: 0.6


def check_epochs(name: str, n: int) -> int:
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise ValueError(f"{name}={n!r} must be an int >= 0")
    return n


def check_prune(prune: float) -> float:
    if not (isinstance(prune, (int, float)) and math.isfinite(prune) and 0 < prune < 1):
        raise ValueError(f"prune={prune!r} must be a number in (0, 1): the fraction of a task's weights freed "
                         f"for the next tasks (their scripts: {PRUNE_DEFAULT})")
    return float(prune)


class _PackedLayer(TaskAware):
    """A Conv2d / Linear whose one weight tensor is shared by every task, with a uint8 owner per weight."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        # the backbone's task 0 owns everything at first (owner id 1); biases stay the backbone's, frozen
        self.register_buffer("owner", torch.ones(weight.shape, dtype=torch.uint8, device=weight.device))
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    def task_weight(self, task: int | None = None) -> Tensor:
        """W_t: the weights of tasks 0..t; gradient only into task t's own (where() with a detached branch)."""
        oid = (self.task if task is None else task) + 1
        own = self.owner == oid
        visible = (self.owner != FREE) & (self.owner <= oid)
        return torch.where(own, self.weight, self.weight.detach()) * visible.to(self.weight.dtype)


class PackedConv2d(_PackedLayer):
    def __init__(self, conv: nn.Conv2d):
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode={conv.padding_mode!r} is not supported; use 'zeros'")
        super().__init__(conv.weight, conv.bias)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        w = self.task_weight()
        if w.dtype != x.dtype and not torch.is_autocast_enabled():
            w = w.to(x.dtype)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PackedLinear(_PackedLayer):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.task_weight(), self.bias)


@dataclass
class PackNetResult:
    """One task's two phases (``train`` is None for task 0: the backbone comes trained) and what it kept."""

    train: FitResult | None
    retrain: FitResult | None
    test_acc: float = float("nan")
    test_loss: float = float("nan")
    train_seconds: float = 0.0   # both phases, the prune and the head refit: the task's whole training cost
    owned: int = 0               # weights task t kept (after the prune)
    pruned: int = 0              # weights it freed for the next tasks
    free_after: int = 0          # free weights left for the next tasks
    total_weights: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PackNet(nn.Module):
    """A backbone whose weights are packed task after task. Build with ``PackNet.from_backbone(model)``; then
    ``train_task(0, ...)`` (prune the backbone), and for each new task ``add_task`` + ``train_task``."""

    FORMAT = FORMAT
    CHAIN_FORMAT = CHAIN_FORMAT
    CONV, LINEAR = PackedConv2d, PackedLinear   # a subclass (ksm_core.cpg) swaps in its own layers

    def __init__(self, body: nn.Module, head_name: str, backbone_fingerprint: str, prune: float):
        super().__init__()
        self.body = body
        self.head_name = head_name
        self.backbone_fingerprint = backbone_fingerprint
        self.prune = check_prune(prune)
        self.task_names: list[str] = ["base"]
        self.frozen: list[bool] = [False]
        self._active = 0
        self._aware = [m for m in body.modules() if isinstance(m, TaskAware)]

    @classmethod
    def from_backbone(cls, backbone: nn.Module, prune: float = PRUNE_DEFAULT, head: str = "auto") -> "PackNet":
        """Wrap a trained conv net (copied: the caller's model is never written)."""
        check_prune(prune)
        head_name = find_head(backbone, head)
        fp = fingerprint(backbone.state_dict())
        body = copy.deepcopy(backbone)
        swap_task_layers(body, head_name, cls.CONV, cls.LINEAR)  # all frozen: made trainable while their task trains
        return cls(body, head_name, fp, prune)

    # -- tasks --------------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def heads(self) -> TaskHeads:  # what ksm_core.train.refit_head reads
        return self.body.get_submodule(self.head_name)

    def packed_layers(self) -> Iterator[tuple[str, _PackedLayer]]:
        return modules_of(self.body, _PackedLayer)

    def batchnorms(self) -> Iterator[tuple[str, TaskBatchNorm]]:
        return modules_of(self.body, TaskBatchNorm)

    def check_task(self, task: int) -> int:
        if not isinstance(task, int) or isinstance(task, bool) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task={task!r} does not exist; valid tasks: 0..{self.num_tasks - 1}")
        return task

    def set_task(self, task: int) -> "PackNet":
        self.check_task(task)
        for m in self._aware:
            m.task = task
        self._active = task
        return self

    def add_task(self, num_classes: int, name: str | None = None) -> int:
        """Add the next task of the chain (its BN from the backbone's, a fresh head); returns its index. The
        previous task must be frozen first: task t trains on what tasks < t left free."""
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be a positive int")
        if not self.frozen[-1]:
            raise ValueError(f"task {self.num_tasks - 1} ({self.task_names[-1]}) is not trained yet: PackNet is "
                             "sequential, train_task() it before adding the next (task 0 = prune the backbone)")
        if self.num_tasks >= MAX_TASKS:
            raise ValueError(f"PackNet holds at most {MAX_TASKS} tasks (uint8 owner ids)")
        t = self.num_tasks
        for m in self._aware:
            if isinstance(m, TaskBatchNorm):
                m.add_task(t)
            elif isinstance(m, TaskHeads):
                m.add_task(t, num_classes)
        for p in self.parameters():  # TaskBatchNorm / TaskHeads made the new task's trainable: only train_task may
            p.requires_grad_(False)
        self.task_names.append(name or f"task{t}")
        self.frozen.append(False)
        return t

    def num_classes(self, task: int) -> int:
        return self.heads.num_classes(self.check_task(task))

    # -- counts -------------------------------------------------------------------------------------------
    def total_weights(self) -> int:
        return sum(m.weight.numel() for _, m in self.packed_layers())

    def owned_per_layer(self, task: int) -> dict[str, int]:
        return {n: int((m.owner == task + 1).sum()) for n, m in self.packed_layers()}

    def owned(self, task: int) -> int:
        return sum(self.owned_per_layer(task).values())

    def free(self) -> int:
        return sum(int((m.owner == FREE).sum()) for _, m in self.packed_layers())

    def _task_modules(self, task: int) -> list[nn.Module]:
        k = str(task)
        return [m.tasks[k] for _, m in self.batchnorms()] + [self.heads.tasks[k]]

    def task_bytes(self, task: int) -> int:
        """What task t adds, as the papers count PackNet: 1 bit per shared weight (does t own it) + BN + head
        (fp32). The weight values are in the shared tensor, whose size never grows."""
        self.check_task(task)
        bits = math.ceil(self.total_weights() / 8) * self._bits_per_weight(task)
        return bits + sum(v.numel() * 4 for mod in self._task_modules(task) for v in mod.state_dict().values()
                          if v.is_floating_point())

    def _bits_per_weight(self, task: int) -> int:
        return 1  # ownership

    # -- training -----------------------------------------------------------------------------------------
    def train_task(self, task: int, train_loader: Iterable, test_loader: Iterable | None = None,
                   cfg: TrainConfig | None = None, retrain_epochs: int | None = None,
                   on_epoch: EpochCallback | None = None) -> PackNetResult:
        """Train, prune, retrain and freeze task ``task`` (the last one added, not frozen yet). Task 0: prune
        the backbone and retrain what it keeps. ``retrain_epochs``: default ceil(cfg.epochs / 2) (Mallya's scripts:
        20 + 10 epochs; CPG's CIFAR-100 PackNet script: 100 + 30); 0 = no retrain. ``on_epoch(epoch, record)``
        sees both phases (record["phase"])."""
        cfg = cfg or TrainConfig()
        if retrain_epochs is None:
            retrain_epochs = math.ceil(cfg.epochs / 2)
        check_epochs("retrain_epochs", retrain_epochs)
        dev = self._begin(task, cfg)
        groups, trainable = self._groups(task, cfg)

        def phase(name: str, c: TrainConfig) -> FitResult:
            return self._phase(name, groups, train_loader, test_loader, c, dev, on_epoch)

        try:
            first = phase("train", cfg) if task > 0 else None
            t_prune = time.perf_counter()
            pruned = self._prune(task, self._keep(task, self.prune))
            prune_s = time.perf_counter() - t_prune
            again = phase("retrain", replace(cfg, epochs=retrain_epochs)) if retrain_epochs else None
            refit_s = self._refit(task, train_loader, cfg)
        finally:
            for p in trainable:
                p.requires_grad_(False)
        self._freeze(task)
        # the training cost as FitResult counts it (steps, prune, refit; not the per-epoch evaluations), so it
        # compares with a KSM task's train_seconds
        seconds = sum(r.train_seconds for r in (first, again) if r is not None) + prune_s + refit_s
        res = PackNetResult(first, again, train_seconds=seconds, owned=self.owned(task), pruned=pruned,
                            free_after=self.free(), total_weights=self.total_weights())
        if test_loader is not None:
            res.test_acc, res.test_loss = self.evaluate(task, test_loader, cfg)
        return res

    def _begin(self, task: int, cfg: TrainConfig) -> torch.device:
        """Check that ``task`` is the chain's next, move to the device, hand it every free weight."""
        self.check_task(task)
        if self.frozen[task]:
            raise ValueError(f"task={task} ({self.task_names[task]}) is frozen: its weights serve it and every later "
                             "task; add_task() a new one to train")
        if task != self.num_tasks - 1 or not all(self.frozen[:task]):
            raise ValueError(f"task={task} is not the next of the chain: train tasks in order")
        if cfg.weight_decay:
            raise ValueError(f"weight_decay={cfg.weight_decay!r}: PackNet needs 0 (a decay would move the frozen "
                             "weights of earlier tasks, whose gradient is 0)")
        torch.manual_seed(cfg.seed)
        dev = resolve_device(cfg.device)
        self.to(dev)
        if dev.type == "cuda" and cfg.channels_last:
            self.to(memory_format=torch.channels_last)
        self.set_task(task)
        oid = task + 1
        if task > 0:
            with torch.no_grad():
                for _, m in self.packed_layers():
                    m.owner[m.owner == FREE] = oid  # every free weight is task t's to train
            if self.owned(task) == 0:
                raise ValueError(f"no free weight left for task={task}: every weight is owned by earlier tasks (an "
                                 "earlier task kept all it was given; CPG would grow the network here)")
        return dev

    def _groups(self, task: int, cfg: TrainConfig) -> tuple[list[dict], list[nn.Parameter]]:
        """The optimizer's groups for task t (all shared weights: only t's get a gradient; its BN; its head),
        made trainable; and the list to make frozen again."""
        weights = [m.weight for _, m in self.packed_layers()]
        bn = [p for mod in self._task_modules(task)[:-1] for p in mod.parameters()]
        head = list(self.heads.tasks[str(task)].parameters())
        for p in weights + bn + head:
            p.requires_grad_(True)
        return ([{"params": weights, "lr": cfg.lr_finetune}, {"params": bn, "lr": cfg.lr_mask},
                 {"params": head, "lr": cfg.lr_head}], weights + bn + head)

    def _phase(self, name: str, groups: list[dict], train_loader: Iterable, test_loader: Iterable | None,
               cfg: TrainConfig, dev: torch.device, on_epoch: EpochCallback | None) -> FitResult:
        """ksm_core.train's loop over the groups (a fresh Adam: a phase starts without the last one's moments)."""
        def tagged(ep: int, rec: dict) -> None:
            rec["phase"] = name
            if on_epoch is not None:
                on_epoch(ep, rec)
        return drain_epochs(_fit_epochs(self, groups, train_loader, test_loader, cfg, dev), tagged)

    def _refit(self, task: int, train_loader: Iterable, cfg: TrainConfig) -> float:
        t0 = time.perf_counter()
        if cfg.head_refit:
            refit_head(self, task, train_loader, cfg)
        return time.perf_counter() - t0

    def _freeze(self, task: int) -> None:
        self.frozen[task] = True

    def _keep(self, task: int, sparsity: float, given: dict[str, int] | None = None) -> dict[str, int]:
        """Per layer, how many of task t's weights to keep so that ``sparsity`` of what it was ``given`` (default:
        what it owns now) is freed: n - round(sparsity * n)."""
        given = given or self.owned_per_layer(task)
        return {n: c - int(round(sparsity * c)) for n, c in given.items()}

    @torch.no_grad()
    def _prune(self, task: int, keep: dict[str, int]) -> int:
        """Keep the ``keep[layer]`` largest-magnitude weights of task t in each layer, free the rest (smallest
        |w| first; ties: lowest index). Returns how many were freed."""
        oid, freed = task + 1, 0
        for name, m in self.packed_layers():
            idx = torch.nonzero((m.owner == oid).reshape(-1)).squeeze(1)
            k = idx.numel() - keep[name]
            if k <= 0:
                continue
            mags = m.weight.detach().reshape(-1)[idx].abs()
            drop = idx[torch.sort(mags, stable=True).indices[:k]]
            m.owner.view(-1)[drop] = FREE
            m.weight.data.view(-1)[drop] = 0.0  # freed weights restart from 0 for the next task, as in their code
            freed += k
        return freed

    def evaluate(self, task: int, loader: Iterable, cfg: TrainConfig | None = None) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of task ``task`` over a loader."""
        return evaluate(self.set_task(self.check_task(task)), loader, cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    # -- artifacts ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def chain_fingerprint(self, task: int) -> str:
        """sha256 of what tasks 0..task left in the shared layers (their ownership and weight values): the
        identity task task + 1 was trained on. A changed earlier task changes it, invalidating later ones."""
        h = hashlib.sha256(self.backbone_fingerprint.encode())
        for name, m in self.packed_layers():
            mine = (m.owner != FREE) & (m.owner <= task + 1)
            h.update(name.encode())
            # where(), not a product: a product leaves -0.0 where a hidden weight is negative, a loaded chain 0.0
            h.update(torch.where(mine, m.owner, 0).cpu().numpy().tobytes())
            h.update(torch.where(mine, m.weight, 0.0).float().cpu().numpy().tobytes())
        return h.hexdigest()

    def save_task(self, task: int, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> int:
        """Write a frozen task's artifact: which weights it owns (bit-packed), their values (fp32), its BN and
        head; and the fingerprint of the chain it was trained on. Atomic; returns the size in bytes."""
        self.check_task(task)
        if not self.frozen[task]:
            raise ValueError(f"task={task} is not trained (frozen) yet; nothing to save")
        oid = task + 1
        tensors: dict[str, np.ndarray] = {}
        for name, m in self.packed_layers():
            own = (m.owner == oid).reshape(-1).cpu()
            tensors[f"own.{name}.bits"] = np.packbits(own.numpy())
            tensors[f"value.{name}"] = m.weight.detach().reshape(-1).cpu()[own].float().numpy()
        tensors.update(self._extra_arrays(task))
        tensors.update(pack_bn_head(self, task))
        meta = {"format": self.FORMAT, "task": task, "task_name": self.task_names[task], "prune": self.prune,
                "num_classes": self.num_classes(task), "backbone_fingerprint": self.backbone_fingerprint,
                "parent_fingerprint": self.chain_fingerprint(task - 1) if task else self.backbone_fingerprint,
                "fingerprint": self.chain_fingerprint(task), "task_bytes": self.task_bytes(task)}
        if extra:
            meta["extra"] = extra
        return write_atomic(np_save(tensors, metadata={"ksm": json.dumps(meta)}), path)

    @classmethod
    def load(cls, backbone: nn.Module, paths: list[str | os.PathLike], head: str = "auto") -> "PackNet":
        """Rebuild a chain from the backbone it started from and its artifacts 0..n-1, in order. Refuses another
        backbone (BackboneMismatch) and an artifact trained on another chain (a changed earlier task)."""
        if not paths:
            raise ValueError("paths is empty: give the artifacts of tasks 0..n-1, task 0 (the pruned backbone) first")
        metas = [read_metadata(p, cls.FORMAT) for p in paths]
        net = cls.from_backbone(backbone, prune=metas[0]["prune"], head=head)
        with torch.no_grad():
            for _, m in net.packed_layers():  # nothing is owned until task 0's artifact says what the backbone kept
                m.owner.zero_()
                m.weight.zero_()
        for i, (path, meta) in enumerate(zip(paths, metas)):
            if meta["backbone_fingerprint"] != net.backbone_fingerprint:
                raise BackboneMismatch(f"artifact {path} was made on backbone {meta['backbone_fingerprint'][:12]}..., "
                                       f"not this one ({net.backbone_fingerprint[:12]}...)")
            if meta["task"] != i:
                raise ValueError(f"paths[{i}] ({path}) holds task {meta['task']}; give tasks 0..n-1 in order")
            parent = net.chain_fingerprint(i - 1) if i else net.backbone_fingerprint
            if meta["parent_fingerprint"] != parent:
                raise ValueError(f"artifact {path} (task {i}) was trained on another chain: an earlier task changed "
                                 "since, so this task and every later one must be trained again")
            if i:
                net.add_task(int(meta["num_classes"]), name=meta["task_name"])
            net._load_arrays(i, np_load_file(str(path)))
            net._freeze(i)
            net.task_names[i] = meta["task_name"]
            if net.chain_fingerprint(i) != meta["fingerprint"]:
                raise ValueError(f"artifact {path} does not reproduce its own fingerprint: damaged; "
                                 f"train task {i} again")
        return net

    @torch.no_grad()
    def _load_arrays(self, task: int, arrays: dict[str, np.ndarray]) -> None:
        oid = task + 1
        for name, m in self.packed_layers():
            own = torch.from_numpy(np.unpackbits(arrays[f"own.{name}.bits"], count=m.weight.numel()).astype(bool))
            own = own.to(m.owner.device)
            m.owner.view(-1)[own] = oid
            m.weight.data.view(-1)[own] = torch.from_numpy(arrays[f"value.{name}"]).to(m.weight)
        load_bn_head(self, task, arrays)
        self._load_extra(task, arrays)

    # -- the whole chain in one file: what the next task of a chain and its evaluation load ----------------
    def save_chain(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> int:
        """Write the chain after its last task, every task frozen, as ONE safetensors file: each task's arrays as
        ``save_task`` stores them (prefixed ``t<i>.``), and JSON metadata (the tasks' names, classes and bytes, the
        backbone's fingerprint, ``parent_fingerprint`` = the chain the last task was trained on, ``fingerprint`` =
        the chain after it). ``load_chain`` rebuilds exactly this network from it and the backbone. Atomic;
        returns the size in bytes. Its size is about the backbone's (each shared weight's value is stored by the
        one task that owns it) plus one or two bits a weight per task, plus every task's BN and head."""
        if not all(self.frozen):
            raise ValueError(f"task {self.frozen.index(False)} is not trained (frozen) yet: save_chain stores a chain "
                             "whose every task is trained")
        last = self.num_tasks - 1
        tensors: dict[str, np.ndarray] = {}
        tasks = []
        for t in range(self.num_tasks):
            oid = t + 1
            for name, m in self.packed_layers():
                own = (m.owner == oid).reshape(-1).cpu()
                tensors[f"t{t}.own.{name}.bits"] = np.packbits(own.numpy())
                tensors[f"t{t}.value.{name}"] = m.weight.detach().reshape(-1).cpu()[own].float().numpy()
            tensors.update({f"t{t}.{k}": v for k, v in {**self._extra_arrays(t), **pack_bn_head(self, t)}.items()})
            tasks.append({"task_name": self.task_names[t], "num_classes": self.num_classes(t),
                          "task_bytes": self.task_bytes(t)})
        meta = {"format": self.CHAIN_FORMAT, "tasks": tasks, "prune": self.prune, **self._chain_settings(),
                "backbone_fingerprint": self.backbone_fingerprint,
                "parent_fingerprint": self.chain_fingerprint(last - 1) if last else self.backbone_fingerprint,
                "fingerprint": self.chain_fingerprint(last)}
        if extra:
            meta["extra"] = extra
        return write_atomic(np_save(tensors, metadata={"ksm": json.dumps(meta)}), path)

    @classmethod
    def load_chain(cls, backbone: nn.Module, path: str | os.PathLike, head: str = "auto") -> "PackNet":
        """The chain ``save_chain`` wrote, rebuilt on the backbone it started from (every task frozen, ready for
        ``evaluate`` or the next ``add_task``). Refuses another backbone (BackboneMismatch) and a file whose
        content does not reproduce its fingerprint (damaged). Reads no pickle: safetensors + JSON only."""
        meta = read_metadata(path, cls.CHAIN_FORMAT)
        net = cls.from_backbone(backbone, prune=meta["prune"], head=head, **cls._settings_from(meta))
        if meta["backbone_fingerprint"] != net.backbone_fingerprint:
            raise BackboneMismatch(f"chain {path} was made on backbone {meta['backbone_fingerprint'][:12]}..., "
                                   f"not this one ({net.backbone_fingerprint[:12]}...)")
        arrays = np_load_file(str(path))
        with torch.no_grad():
            for _, m in net.packed_layers():  # nothing is owned until task 0's arrays say what the backbone kept
                m.owner.zero_()
                m.weight.zero_()
        for t, info in enumerate(meta["tasks"]):
            if t:
                net.add_task(int(info["num_classes"]), name=info["task_name"])
            prefix = f"t{t}."
            net._load_arrays(t, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
            net._freeze(t)
            net.task_names[t] = info["task_name"]
        if net.chain_fingerprint(net.num_tasks - 1) != meta["fingerprint"]:
            raise ValueError(f"chain {path} does not reproduce its own fingerprint: damaged; train its last task again")
        return net

    @classmethod
    def read_chain_metadata(cls, path: str | os.PathLike) -> dict[str, Any]:
        """A chain file's JSON metadata, without loading its tensors."""
        return read_metadata(path, cls.CHAIN_FORMAT)

    def _chain_settings(self) -> dict[str, Any]:
        return {}  # what from_backbone needs beyond prune (CPG: step)

    @classmethod
    def _settings_from(cls, meta: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _extra_arrays(self, task: int) -> dict[str, np.ndarray]:
        return {}

    def _load_extra(self, task: int, arrays: dict[str, np.ndarray]) -> None:
        pass

