"""Task-aware layers: masked Conv2d / Linear around one frozen, shared weight; per-task BatchNorm and heads.

Each layer holds the backbone's tensors once, as buffers (never parameters, so no optimizer can reach them),
plus one small ``TaskState`` per task. The network sets ``layer.task`` to choose which task's state the next
forward uses.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import MaskSpec, effective_mask, mask_shape, masked_weight

__all__ = ["TaskState", "MaskedConv2d", "MaskedLinear", "TaskBatchNorm", "TaskHeads", "TaskAware", "modules_of"]

M = TypeVar("M", bound=nn.Module)


def modules_of(root: nn.Module, kind: type[M]) -> Iterator[tuple[str, M]]:
    """(qualified name, module) of every submodule of ``root`` that is a ``kind``, in module order."""
    for n, m in root.named_modules():
        if isinstance(m, kind):
            yield n, m


class TaskState(nn.Module):
    """One task's state in a masked layer.

    Training state: ``mask_real`` (Parameter). Deployed state: ``mask`` (buffer, the fixed effective mask with
    fp16-exact soft values, exactly what an artifact stores). Fine-tune baseline: ``weight`` / ``bias``
    (Parameters, full copies). The backbone's own task ("base") holds nothing.
    """

    def __init__(self, spec: MaskSpec):
        super().__init__()
        self.spec = spec

    @property
    def deployed(self) -> bool:
        return hasattr(self, "mask") and not hasattr(self, "mask_real")


class TaskAware(nn.Module):
    """Base of every module whose behaviour depends on the active task."""

    task: int = 0

    def _key(self, task: int | None = None) -> str:
        return str(self.task if task is None else task)


class _MaskedLayer(TaskAware):
    """Common part of masked Conv2d and Linear: a frozen weight (and bias) and per-task TaskStates."""

    #: (task, W_task, bias) held for an inference pass by ``KSMNet.fixed_weights``: the mask cannot change within
    #: a no-grad pass, so W_task is built once for it instead of once per batch; None: built at each forward
    _fixed: tuple[int, Tensor, Tensor | None] | None = None

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        # Shared and frozen: buffers, detached from any graph. Taken as-is (no copy) so a backbone put once in
        # shared memory stays shared.
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", bias.detach() if bias is not None else None)
        self.tasks = nn.ModuleDict()
        self.tasks["0"] = TaskState(MaskSpec("base", binarizer="none", granularity="none", soft=False))

    # -- tasks --------------------------------------------------------------------------------------------
    def add_task(self, task: int, spec: MaskSpec) -> None:
        state = TaskState(spec)
        if spec.method == "finetune":
            state.weight = nn.Parameter(self.weight.detach().clone())
            state.bias = nn.Parameter(self.bias.detach().clone()) if self.bias is not None else None
        elif spec.masked:
            shape = mask_shape(self.weight.shape, spec.granularity)
            state.mask_real = nn.Parameter(torch.full(shape, spec.init, dtype=torch.float32, device=self.weight.device))
        self.tasks[str(task)] = state

    def state_for(self, task: int | None = None) -> TaskState:
        return self.tasks[self._key(task)]

    def mask(self, task: int | None = None) -> Tensor | None:
        """The effective mask M of a task in its own (mask) shape; None for unmasked tasks."""
        st = self.state_for(task)
        if st.deployed:
            return st.mask
        if not st.spec.masked:
            return None
        return effective_mask(st.mask_real, st.spec, training=self.training)

    @torch.no_grad()
    def deploy(self, task: int) -> None:
        """Fix a task's mask: eval-mode decision, soft values rounded to fp16 (what an artifact stores)."""
        st = self.state_for(task)
        if st.deployed or not st.spec.masked:
            return
        m = effective_mask(st.mask_real, st.spec, training=False)
        hard = m >= 1.0
        m = torch.where(hard, torch.ones_like(m), m.half().float())
        del st.mask_real
        st.register_buffer("mask", m)

    @torch.no_grad()
    def load_mask(self, task: int, mask: Tensor) -> None:
        st = self.state_for(task)
        expected = mask_shape(self.weight.shape, st.spec.granularity)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not fit layer weight {tuple(self.weight.shape)} "
                             f"({st.spec.granularity}-wise mask shape {expected})")
        if hasattr(st, "mask_real"):
            del st.mask_real
        st.register_buffer("mask", mask.to(self.weight.device, torch.float32))

    def task_weight(self, task: int | None = None) -> tuple[Tensor, Tensor | None]:
        """W_task (and bias) for the active task: W * M broadcast over the kernel, or the task's own copy."""
        if task is None and self._fixed is not None and self._fixed[0] == self.task and not torch.is_grad_enabled():
            return self._fixed[1], self._fixed[2]
        st = self.state_for(task)
        if st.spec.method == "finetune":
            return st.weight, st.bias
        if not st.spec.masked:
            return self.weight, self.bias
        if not st.deployed:  # training state: the fused W * M(Mr) path
            return masked_weight(self.weight, st.mask_real, st.spec, training=self.training), self.bias
        m = st.mask
        if m.dim() < self.weight.dim():  # kernel-wise: (c_out, c_in) -> (c_out, c_in, 1, 1)
            m = m.reshape(m.shape + (1,) * (self.weight.dim() - m.dim()))
        return self.weight * m, self.bias

    def base_state(self, prefix: str) -> dict[str, Tensor]:
        out = {prefix + "weight": self.weight}
        if self.bias is not None:
            out[prefix + "bias"] = self.bias
        return out


class MaskedConv2d(_MaskedLayer):
    """A Conv2d whose weight is the frozen backbone's, multiplied by the active task's mask."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.weight, conv.bias)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode={conv.padding_mode!r} is not supported; use 'zeros'")

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.task_weight()
        if w.dtype != x.dtype and not torch.is_autocast_enabled():
            w = w.to(x.dtype)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return f"{i * self.groups}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, tasks={len(self.tasks)}"


class MaskedLinear(_MaskedLayer):
    """A Linear whose weight is the frozen backbone's times the active task's mask (a 1x1 'kernel' per weight)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.task_weight()
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        o, i = self.weight.shape
        return f"{i}, {o}, tasks={len(self.tasks)}"


class TaskBatchNorm(TaskAware):
    """One BatchNorm per task (affine parameters and running statistics); new tasks start from the backbone's."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.tasks = nn.ModuleDict({"0": bn})
        for p in bn.parameters():
            p.requires_grad_(False)  # the backbone's own BN is part of the frozen backbone

    def add_task(self, task: int) -> None:
        bn = copy.deepcopy(self.tasks["0"])
        for p in bn.parameters():
            p.requires_grad_(True)
        self.tasks[str(task)] = bn

    def forward(self, x: Tensor) -> Tensor:
        return self.tasks[self._key()](x)

    def base_state(self, prefix: str) -> dict[str, Tensor]:
        return {prefix + k: v for k, v in self.tasks["0"].state_dict(keep_vars=True).items()}


class TaskHeads(TaskAware):
    """One classifier head per task on the backbone's penultimate features."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.in_features = head.in_features
        self.tasks = nn.ModuleDict({"0": head})
        for p in head.parameters():
            p.requires_grad_(False)

    def add_task(self, task: int, num_classes: int) -> None:
        dev = self.tasks["0"].weight.device
        self.tasks[str(task)] = nn.Linear(self.in_features, num_classes, device=dev)

    def num_classes(self, task: int) -> int:
        return self.tasks[str(task)].out_features

    #: True while ``ksm_core.compiled`` runs the network's compiled trunk: the heads pass their input through,
    #: and the compiled step applies the task's head eagerly after the graph, so that a head's width (a task's
    #: number of classes) is never part of what the graph was compiled for
    passthrough: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if self.passthrough:
            return x
        return self.tasks[self._key()](x)

    def base_state(self, prefix: str) -> dict[str, Tensor]:
        return {prefix + k: v for k, v in self.tasks["0"].state_dict(keep_vars=True).items()}
