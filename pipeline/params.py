"""What a run records about its method in MLflow: only the hyperparameters that had an effect."""
from __future__ import annotations

from typing import Any

from ksm_core import mask_spec

from .config import MethodCfg, TrainCfg

__all__ = ["method_params"]


def method_params(method: MethodCfg, train: TrainCfg) -> dict[str, Any]:
    """The method's name and the hyperparameters it actually uses, as run params: T and k only for the softmax
    trick, tau and the mask lr only for masked methods, lr_finetune only for the fine-tune baseline. A param
    that had no effect would read, in the MLflow UI, as a setting that was compared."""
    spec = mask_spec(method.name, **method.hparams())
    out: dict[str, Any] = {"method": method.name}
    if spec.masked:
        out.update(tau=spec.tau, init=spec.init)
        if spec.binarizer == "softmax":
            out.update(k=spec.k, T=spec.T)
        out["lr_mask"] = train.lr_mask
    else:
        out["lr_finetune"] = train.lr_finetune
    out["lr_head"] = train.lr_head
    return out
