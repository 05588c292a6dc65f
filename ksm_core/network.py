"""Wrap a trained backbone for multi-task adaptation: swap in masked layers, per-task BN and heads.

Task 0 is the backbone itself (its own BN and head, no mask). Every task added later gets a real mask per
Conv2d / Linear (the head excepted), its own BN copied from the backbone's, and a fresh head. The backbone's
tensors are stored once, as buffers, and no task can write them: ``fingerprint`` proves it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .layers import MaskedConv2d, MaskedLinear, TaskAware, TaskBatchNorm, TaskHeads, _MaskedLayer, modules_of
from .masks import MaskSpec, mask_spec

__all__ = ["KSMNet", "fingerprint", "find_head"]


def fingerprint(state: Mapping[str, Tensor | np.ndarray]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes: the identity of a backbone."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        # np.asarray, not np.ascontiguousarray: the latter turns 0-d tensors (BN's num_batches_tracked) into
        # shape (1,), and a backbone must hash the same as torch tensors and as numpy arrays
        a = t.detach().cpu().contiguous().numpy() if isinstance(t, Tensor) else np.asarray(t, order="C")
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def find_head(model: nn.Module, head: str = "auto") -> str:
    """The qualified name of the classifier head: the given name, or the last nn.Linear in module order."""
    names = {n: m for n, m in model.named_modules()}
    if head != "auto":
        if head not in names or not isinstance(names[head], nn.Linear):
            linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"head {head!r} is not an nn.Linear of {type(model).__name__}; Linear layers: {linears}")
        return head
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear to use as the classifier head; "
                         "pass a network that ends in a Linear layer")
    return linears[-1]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def swap_task_layers(body: nn.Module, head_name: str, conv: Callable[[nn.Conv2d], nn.Module],
                     linear: Callable[[nn.Linear], nn.Module]) -> None:
    """In place: the head becomes per-task heads, every BatchNorm per-task, every other Conv2d / Linear what
    ``conv`` / ``linear`` make of it (KSM's masked layers, PackNet's packed ones); then every parameter is frozen
    (anything not swapped, e.g. a PReLU, belongs to the frozen backbone; a method makes trainable what it trains)."""
    for name, m in list(body.named_modules()):
        if name == head_name:
            _set_module(body, name, TaskHeads(m))
        elif isinstance(m, nn.Conv2d):
            _set_module(body, name, conv(m))
        elif isinstance(m, nn.Linear):
            _set_module(body, name, linear(m))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            _set_module(body, name, TaskBatchNorm(m))
    for p in body.parameters():
        p.requires_grad_(False)


class KSMNet(nn.Module):
    """A frozen backbone serving many tasks; ``set_task(i)`` picks which task the next forward computes.

    Build with ``KSMNet.from_backbone(model)``; add tasks with ``add_task(num_classes, method=...)``.
    """

    def __init__(self, body: nn.Module, head_name: str, backbone_fingerprint: str):
        super().__init__()
        self.body = body
        self.head_name = head_name
        self.backbone_fingerprint = backbone_fingerprint
        self.specs: list[MaskSpec] = [mask_spec("base")]
        self.task_names: list[str] = ["base"]
        self._active = 0
        self._aware = [m for m in body.modules() if isinstance(m, TaskAware)]

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: nn.Module, head: str = "auto", *, copy_backbone: bool = True) -> "KSMNet":
        """Wrap a trained conv net. Every Conv2d and Linear (but the head) becomes masked, every BatchNorm
        per-task, the head a per-task head. ``copy_backbone=False`` adopts the module's tensors in place (no
        copy: e.g. a backbone read zero-copy from shared memory)."""
        if not any(isinstance(m, nn.Conv2d) for m in backbone.modules()):
            raise ValueError(f"backbone {type(backbone).__name__} has no nn.Conv2d layer: KSM masks convolution "
                             "kernels, so it needs a convolutional network (e.g. create_model('vgg16_bn_cifar'))")
        head_name = find_head(backbone, head)
        fp = fingerprint(backbone.state_dict())
        body = copy.deepcopy(backbone) if copy_backbone else backbone
        swap_task_layers(body, head_name, MaskedConv2d, MaskedLinear)
        return cls(body, head_name, fp)

    # -- tasks --------------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.specs)

    @property
    def task(self) -> int:
        return self._active

    def add_task(self, num_classes: int, method: str = "ksm", name: str | None = None, **hparams) -> int:
        """Add a task trained by ``method`` (a mask variant or 'finetune'); returns its index. Does not select it."""
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be a positive int")
        spec = mask_spec(method, **hparams)
        if spec.method == "base":
            raise ValueError("method 'base' is reserved for the backbone's own task 0")
        t = self.num_tasks
        for m in self._aware:
            if isinstance(m, _MaskedLayer):
                m.add_task(t, spec)
            elif isinstance(m, TaskBatchNorm):
                m.add_task(t)
            elif isinstance(m, TaskHeads):
                m.add_task(t, num_classes)
        self.specs.append(spec)
        self.task_names.append(name or f"task{t}")
        return t

    def remove_task(self, task: int) -> None:
        """Drop the LAST task (its masks, BN and head), so the indices of the others stay as they are: a server
        that evaluates or serves artifacts one at a time loads one, uses it and removes it before the next. The
        backbone's own task 0 cannot be removed. The active task falls back to 0 if it was the removed one."""
        self.check_task(task)
        if task == 0 or task != self.num_tasks - 1:
            raise ValueError(f"only the last added task ({self.num_tasks - 1}) can be removed, not {task}; task 0 "
                             "is the backbone itself")
        k = str(task)
        for m in self._aware:
            if isinstance(m, (_MaskedLayer, TaskBatchNorm, TaskHeads)):
                del m.tasks[k]
        self.specs.pop()
        self.task_names.pop()
        if self._active == task:
            self.set_task(0)

    def check_task(self, task: int) -> int:
        if not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task!r} does not exist; valid task indices: 0..{self.num_tasks - 1} "
                             f"({', '.join(f'{i}={n}' for i, n in enumerate(self.task_names))})")
        return task

    def set_task(self, task: int) -> "KSMNet":
        self.check_task(task)
        for m in self._aware:
            m.task = task
        self._active = task
        return self

    @contextlib.contextmanager
    def fixed_weights(self) -> Iterator["KSMNet"]:
        """Within the block, every masked layer uses the active task's W_task built once at entry, for each no-grad
        forward of that task: an inference pass (evaluation, the head refit's feature pass), where the mask cannot
        change. Built per batch, it cost a KSM evaluation ~30% over fine-tune's on the narrow VGG (85 vs 66 ms for
        7 batches; benchmarks/RESULTS.md, issue #26). Holds one masked copy of the backbone's weights meanwhile.
        A forward with grad enabled, or of another task, builds its own as always."""
        layers = [m for _, m in self.masked_layers()]
        with torch.no_grad():
            for m in layers:
                m._fixed = (m.task, *m.task_weight())
        try:
            yield self
        finally:
            for m in layers:
                m._fixed = None

    def num_classes(self, task: int | None = None) -> int:
        return self.heads.num_classes(self.check_task(self.task if task is None else task))

    # -- views --------------------------------------------------------------------------------------------
    @property
    def heads(self) -> TaskHeads:
        return self.body.get_submodule(self.head_name)

    def masked_layers(self) -> Iterator[tuple[str, _MaskedLayer]]:
        return modules_of(self.body, _MaskedLayer)

    def batchnorms(self) -> Iterator[tuple[str, TaskBatchNorm]]:
        return modules_of(self.body, TaskBatchNorm)

    def task_parameters(self, task: int) -> dict[str, list[nn.Parameter]]:
        """The trainable tensors of one task, grouped: masks (or fine-tune weights), BN affine, head."""
        self.check_task(task)
        if task == 0:
            raise ValueError("task 0 is the frozen backbone; add a task with add_task() and train that one")
        k = str(task)
        masks = [p for _, m in self.masked_layers() for p in m.tasks[k].parameters()]
        bn = [p for _, m in self.batchnorms() for p in m.tasks[k].parameters()]
        head = list(self.heads.tasks[k].parameters())
        return {"masks": masks, "bn": bn, "head": head}

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The backbone's tensors under their original names (weights, task-0 BN and head)."""
        out: dict[str, Tensor] = {}
        for n, m in self.body.named_modules():
            if isinstance(m, (_MaskedLayer, TaskBatchNorm, TaskHeads)):
                out.update(m.base_state(n + "."))
        return {k: v for k, v in out.items() if v is not None}

    def fingerprint(self) -> str:
        """The backbone's fingerprint recomputed now; equals ``backbone_fingerprint`` unless it was written to."""
        return fingerprint(self.backbone_state_dict())

    @torch.no_grad()
    def deploy(self, task: int) -> None:
        """Fix a task's masks (eval decision + fp16 soft values) so it matches its artifact exactly."""
        self.check_task(task)
        for _, m in self.masked_layers():
            m.deploy(task)

    def is_deployed(self, task: int) -> bool:
        spec = self.specs[self.check_task(task)]
        return (not spec.masked) or all(m.state_for(task).deployed for _, m in self.masked_layers())

    @torch.no_grad()
    def mask_stats(self, task: int) -> dict:
        """Fraction of kept kernels (Mb = 1), of soft ones (0 < M < 1) and per-layer kept ratios."""
        spec = self.specs[self.check_task(task)]
        if not spec.masked:
            return {"ones": 1.0, "soft": 0.0, "zeros": 0.0, "layers": {}}
        was = self.training
        self.eval()
        n = ones = soft = 0
        layers = {}
        for name, m in self.masked_layers():
            mk = m.mask(task)
            o = int((mk >= 1.0).sum())
            s = int(((mk > 0) & (mk < 1.0)).sum())
            layers[name] = o / mk.numel()
            n, ones, soft = n + mk.numel(), ones + o, soft + s
        self.train(was)
        return {"ones": ones / n, "soft": soft / n, "zeros": (n - ones - soft) / n, "layers": layers}

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
