"""What a run records about its method in MLflow: only the hyperparameters that had an effect."""
from __future__ import annotations

from typing import Any

from ksm_core import mask_spec
from ksm_core.packnet import PRUNE_DEFAULT

from .config import MethodCfg, TrainCfg

__all__ = ["method_params", "sequential_settings"]


def method_params(method: MethodCfg, train: TrainCfg) -> dict[str, Any]:
    """The method's name and the hyperparameters it actually uses, as run params: T and k only for the softmax
    trick, tau and the mask lr only for masked methods, lr_finetune only for the fine-tune baseline. A param
    that had no effect would read, in the MLflow UI, as a setting that was compared."""
    if method.sequential():  # PackNet / CPG: their settings (null ones at ksm_core's defaults) and the three rates
        return {"method": method.name, **sequential_settings(method), "lr_finetune": train.lr_finetune,
                "lr_mask": train.lr_mask, "lr_head": train.lr_head}
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


#: ksm_core's defaults for the settings a sequential method's config leaves null ("default": it depends on
#: train.epochs, as ksm_core.packnet / cpg compute it)
_SEQUENTIAL_DEFAULTS = {"packnet": {"prune": PRUNE_DEFAULT, "retrain_epochs": "default"},
                        "cpg": {"prune": 0.95, "step": 0.1, "allow_loss": 0.0, "prune_epochs": "default",
                                "retrain_epochs": "default"}}


def sequential_settings(method: MethodCfg) -> dict[str, Any]:
    """A sequential method's settings as run params: each set one, else ksm_core's default. lr_finetune trains
    the task's own weights, lr_mask its BatchNorm (and CPG's pick mask), lr_head its head."""
    return {**_SEQUENTIAL_DEFAULTS[method.name], **method.chain_settings()}
