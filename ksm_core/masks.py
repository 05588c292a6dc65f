"""Mask functions: from a real-valued mask Mr to the effective mask M that multiplies a frozen weight.

Two ways to binarise, one optional soft part, two granularities; the paper's ablation variants are
combinations of these switches (see ``MASK_METHODS``):

* KSM's softmax trick (Yang et al., Eq. 7/10): p = sigmoid(k (Mr - tau) / T); the forward value is the
  one-hot (hard) decision Mb = 1[p >= 0.5] but the gradient flows through p, so dMb/dMr = p (1 - p) k / T.
  A two-class softmax over (z, -z)/T is a sigmoid of 2z/T; k absorbs the constant.
* Piggyback (Mallya et al.): Mb = 1[Mr >= tau] with a straight-through gradient, dMb/dMr = 1.
* Soft part: weights that Mb zeroes are instead scaled by a per-layer min-max normalised copy of Mr in
  [0, 0.5] (authors' code: ``normal()``), carrying no gradient. M = Mb + (1 - Mb) * 0.5 * minmax((1 - Mb) Mr).
* Granularity: kernel-wise masks hold one value per (c_out, c_in) kernel and are broadcast over kh x kw;
  element-wise masks have the weight's shape.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MaskSpec",
    "MASK_METHODS",
    "METHODS",
    "ksm_mask",
    "piggyback_mask",
    "piggyback_soft_mask",
    "soft_values",
    "effective_mask",
    "mask_spec",
    "mask_shape",
    "masked_weight",
]

# Reference values from the authors' code.
MASK_INIT = 1e-2
TAU = 5e-3
K = 1200.0
T_DEFAULT = 100.0  # the temperature T (named so it does not clash with arguments called T)


def _check_hparams(tau: float, k: float | None = None, T: float | None = None) -> None:
    if not (math.isfinite(tau) and tau >= 0):
        # the real masks start at init (1e-2) and a negative threshold would keep every kernel on for good
        raise ValueError(f"mask threshold tau={tau!r} must be a finite number >= 0 (authors' value: {TAU})")
    if k is not None and not (math.isfinite(k) and k > 0):
        raise ValueError(f"mask scale k={k!r} must be a finite number > 0 (authors' value: {K})")
    if T is not None and not (math.isfinite(T) and T > 0):
        raise ValueError(f"mask temperature T={T!r} must be a finite number > 0 (authors' value: {T_DEFAULT})")



def soft_values(mask_real: Tensor, hard: Tensor) -> Tensor:
    """The soft part: 0.5 * per-layer min-max of (1 - Mb) * Mr, kept only where Mb == 0. No gradient.

    The min-max runs over the whole layer tensor (zeros from kept entries included), as ``normal()`` in the
    authors' code does; values lie in [0, 0.5]. A constant tensor (max == min) gives zeros.
    """
    with torch.no_grad():
        off = 1.0 - hard
        x = off * mask_real
        lo, hi = x.min(), x.max()
        # no Python branch on a tensor value (that would sync the GPU every forward): a constant tensor has
        # x - lo == 0 everywhere, so clamping the span only guards the division.
        span = (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)
        return off * (0.5 * (x - lo) / span)


def ksm_mask(
    mask_real: Tensor,
    *,
    tau: float = TAU,
    k: float = K,
    T: float = T_DEFAULT,
    soft: bool = True,
    training: bool = True,
) -> Tensor:
    """KSM's effective mask M (same shape as ``mask_real``).

    Training: p = sigmoid(k (Mr - tau) / T), forward Mb = 1[p >= 0.5], backward through p.
    Eval: Mb = 1[Mr >= tau] (the same decision, no graph). With ``soft``, zeroed entries get
    0.5 * minmax((1 - Mb) * Mr) in [0, 0.5] (no gradient).
    """
    _check_hparams(tau, k, T)
    if training:
        z = (mask_real - tau) * (k / T)
        p = torch.sigmoid(z)
        # 1[p >= 0.5] == 1[z >= 0]; testing z avoids sigmoid rounding to exactly 0.5 just below tau
        hard = (z >= 0).to(mask_real.dtype)
        # forward value: hard; gradient: dp/dMr (softmax trick, not a straight-through threshold)
        binary = hard + (p - p.detach())
    else:
        hard = (mask_real >= tau).to(mask_real.dtype)
        binary = hard
    if not soft:
        return binary
    return binary + soft_values(mask_real, hard)


def piggyback_mask(mask_real: Tensor, *, tau: float = TAU, soft: bool = False, training: bool = True) -> Tensor:
    """Piggyback's mask: Mb = 1[Mr >= tau] with a straight-through gradient (dMb/dMr = 1)."""
    _check_hparams(tau)
    hard = (mask_real >= tau).to(mask_real.dtype)
    binary = hard + (mask_real - mask_real.detach()) if training else hard
    if not soft:
        return binary
    return binary + soft_values(mask_real, hard)


def piggyback_soft_mask(mask_real: Tensor, *, tau: float = TAU, training: bool = True) -> Tensor:
    """Piggyback's straight-through binary mask plus KSM's soft part on the zeroed entries."""
    return piggyback_mask(mask_real, tau=tau, soft=True, training=training)


@dataclass(frozen=True)
class MaskSpec:
    """How one task's masks are made: a named method plus its hyperparameters.

    ``binarizer``: "softmax" (KSM) or "ste" (Piggyback); ``granularity``: "kernel" or "element";
    ``soft``: add the soft part. ``method == "finetune"`` means no mask: the task trains its own full copy of
    every weight (the baseline). ``method == "base"`` is the backbone's own initial task (no mask, no training).
    """

    method: str = "ksm"
    binarizer: str = "softmax"
    granularity: str = "kernel"
    soft: bool = True
    tau: float = TAU
    k: float = K
    T: float = T_DEFAULT
    init: float = MASK_INIT

    @property
    def masked(self) -> bool:
        return self.method not in ("finetune", "base")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MaskSpec":
        return cls(**d)


# The paper's ablation variants by name: each differs from its neighbour by one switch.
MASK_METHODS: dict[str, MaskSpec] = {
    "piggyback": MaskSpec("piggyback", binarizer="ste", granularity="element", soft=False),
    "piggyback_kernelwise": MaskSpec("piggyback_kernelwise", binarizer="ste", granularity="kernel", soft=False),
    "piggyback_soft": MaskSpec("piggyback_soft", binarizer="ste", granularity="element", soft=True),
    "ksm_softmax": MaskSpec("ksm_softmax", binarizer="softmax", granularity="kernel", soft=False),
    "ksm_elementwise": MaskSpec("ksm_elementwise", binarizer="softmax", granularity="element", soft=True),
    "ksm": MaskSpec("ksm", binarizer="softmax", granularity="kernel", soft=True),
}
# Everything a task can be trained with: the mask variants plus the whole-net fine-tuning baseline.
METHODS: tuple[str, ...] = tuple(MASK_METHODS) + ("finetune",)


def mask_spec(method: str = "ksm", **hparams: Any) -> MaskSpec:
    """The MaskSpec for a method name, with hyperparameter overrides (tau, k, T, init).

    Raises ValueError naming the method and the valid ones, or the out-of-range hyperparameter.
    """
    name = method
    if name == "finetune":
        base = MaskSpec("finetune", binarizer="none", granularity="none", soft=False)
    elif name == "base":
        base = MaskSpec("base", binarizer="none", granularity="none", soft=False)
    elif name in MASK_METHODS:
        base = MASK_METHODS[name]
    else:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    allowed = {"tau", "k", "T", "init"}
    unknown = set(hparams) - allowed
    if unknown:
        raise ValueError(f"unknown mask hyperparameter(s) {sorted(unknown)}; valid: {sorted(allowed)}")
    spec = replace(base, **{k: float(v) for k, v in hparams.items() if v is not None})
    _check_hparams(spec.tau, spec.k, spec.T)
    if not math.isfinite(spec.init):
        raise ValueError(f"mask init={spec.init!r} must be finite")
    return spec


def mask_shape(weight_shape: torch.Size | tuple[int, ...], granularity: str) -> tuple[int, ...]:
    """Shape of the real mask for a weight: (c_out, c_in) kernel-wise, the weight's shape element-wise."""
    if granularity == "kernel":
        return tuple(weight_shape[:2])
    if granularity == "element":
        return tuple(weight_shape)
    raise ValueError(f"unknown mask granularity {granularity!r}; valid: 'kernel', 'element'")


def effective_mask(mask_real: Tensor, spec: MaskSpec, *, training: bool) -> Tensor:
    """M for a real mask under a spec, in the real mask's own shape (broadcasting is the layer's job)."""
    if spec.binarizer == "softmax":
        return ksm_mask(mask_real, tau=spec.tau, k=spec.k, T=spec.T, soft=spec.soft, training=training)
    if spec.binarizer == "ste":
        return piggyback_mask(mask_real, tau=spec.tau, soft=spec.soft, training=training)
    raise ValueError(f"method {spec.method!r} has no mask (binarizer {spec.binarizer!r})")


_NONES = (None, None, None, None)


class _MaskedWeight(torch.autograd.Function):
    """W_task = W * M(Mr) in one autograd node: the same values and gradients as ``effective_mask`` times W,
    in a few in-place passes, saving only W and Mr for backward (no p, no intermediate masks).

    forward:  Mb = 1[Mr >= tau]; M = Mb, or with soft: Mb + (1 - Mb) 0.5 minmax((1 - Mb) Mr); W_task = W * M.
    backward: dL/dM = sum over the kernel of dL/dW_task * W; dL/dMr = dL/dM * p (1 - p) k / T (softmax trick)
              or dL/dM (straight-through).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, mask_real: Tensor, tau: float, scale: float, soft: bool, ste: bool) -> Tensor:
        ctx.save_for_backward(weight, mask_real)
        ctx.tau, ctx.scale, ctx.ste = tau, scale, ste
        return _apply_mask(weight, _mask_values(mask_real, tau, soft))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, mask_real = ctx.saved_tensors
        g = grad_out * weight
        if mask_real.dim() < weight.dim():  # kernel-wise: reduce first, the rest runs on the small (c_out, c_in)
            g = g.sum(dim=tuple(range(mask_real.dim(), weight.dim())))
        if ctx.ste:
            return None, g, *_NONES
        return None, g.mul_(_sigmoid_slope(mask_real, ctx.tau, ctx.scale)), *_NONES


def _sigmoid_slope(mask_real: Tensor, tau: float, scale: float) -> Tensor:
    """dp/dMr = p (1 - p) k / T for p = sigmoid(scale (Mr - tau)), scale = k / T.

    Written as (1 - tanh(z / 2)^2) scale / 4 (the same function, sigmoid(z) = (1 + tanh(z / 2)) / 2) in
    in-place passes over one buffer: on a CPU, tanh is vectorised and ~4x cheaper than sigmoid, and fresh
    buffers cost more than the arithmetic.
    """
    t = torch.sub(mask_real, tau).mul_(0.5 * scale).tanh_()
    return t.mul_(t).sub_(1.0).mul_(-0.25 * scale)


def _mask_values(mask_real: Tensor, tau: float, soft: bool) -> Tensor:
    """The forward value of M (identical in training and eval): Mb, plus the soft part if asked.

    Bit-identical to ``ksm_mask``'s forward value, in arithmetic passes only: boolean masks (masked_fill, where)
    run ~10x slower than float arithmetic on a CPU, and Mb as a float 0/1 turns "keep where Mb" into products.
    """
    hard = torch.ge(mask_real, tau, out=torch.empty_like(mask_real))  # Mb as 0./1.: one vectorised pass
    if not soft:
        return hard
    off = 1.0 - hard
    x = mask_real * off  # (1 - Mb) * Mr
    lo, hi = torch.aminmax(x)
    span = (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)
    # 0.5 (x - lo) / span where Mb = 0, and exactly 1 where Mb = 1 (0 * finite + 1)
    return x.sub_(lo).mul_(0.5).div_(span).mul_(off).add_(hard)


def _apply_mask(weight: Tensor, m: Tensor) -> Tensor:
    """W * M, consuming M (a fresh buffer): element-wise in place, kernel-wise broadcast over kh x kw."""
    if m.shape == weight.shape and weight.is_contiguous():  # (a channels_last W keeps its layout via W * M)
        return m.mul_(weight)
    return weight * m.reshape(m.shape + (1,) * (weight.dim() - m.dim()))


def masked_weight(weight: Tensor, mask_real: Tensor, spec: MaskSpec, *, training: bool) -> Tensor:
    """W_task for a real mask (kernel-wise masks broadcast over kh x kw): the layers' fused fast path."""
    if spec.binarizer not in ("softmax", "ste"):
        raise ValueError(f"method {spec.method!r} has no mask (binarizer {spec.binarizer!r})")
    if not (training and torch.is_grad_enabled() and mask_real.requires_grad):
        return _apply_mask(weight, _mask_values(mask_real.detach(), spec.tau, spec.soft))
    scale, ste = spec.k / spec.T, spec.binarizer == "ste"
    if torch.compiler.is_compiling():  # traced by torch.compile (ksm_core.compiled): plain ops, see below
        return _plain_masked_weight(weight, mask_real, spec.tau, scale, spec.soft, ste)
    return _MaskedWeight.apply(weight, mask_real, spec.tau, scale, spec.soft, ste)


def _plain_masked_weight(weight: Tensor, mask_real: Tensor, tau: float, scale: float, soft: bool,
                         ste: bool) -> Tensor:
    """``_MaskedWeight`` in plain differentiable ops: the same forward value (Mb, or Mb plus the soft part, from
    Mr detached) and the same gradient, carried by ``g - g.detach()`` (exactly 0 forward) with g = p for the
    softmax trick (dg/dMr = p (1 - p) k / T) or g = Mr for straight-through (dg/dMr = 1).

    Why a second form: under ``torch.compile`` a custom ``autograd.Function`` is traced into the joint graph
    afresh by every process (it keeps the graph out of AOTAutograd's on-disk cache: KSM's whole-network compile
    took 4.8 s in a warm fresh process, 1.1 s in these ops; benchmarks/RESULTS.md, issue #26), while these ops
    are fused by inductor into the same few passes the custom node makes by hand. Eagerly, the custom node
    stays: it saves only W and Mr for backward where these ops would keep p and the mask.
    """
    value = _mask_values(mask_real.detach(), tau, soft)
    g = mask_real if ste else torch.sigmoid((mask_real - tau) * scale)
    m = value + (g - g.detach())
    return weight * m.reshape(m.shape + (1,) * (weight.dim() - m.dim()))
