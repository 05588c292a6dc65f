"""ksm_core: Kernel-wise Soft Masks (Yang et al.) in pure PyTorch.

Adapt one frozen backbone to many tasks by learning, per task, a real-valued mask per conv kernel (binarised
with a softmax trick, zeroed kernels softly rescaled), plus the task's BatchNorm and head. No Ray, MLflow or
Hydra in here: this package runs anywhere torch runs.
"""
from . import compiled
from .artifact import ArtifactWriteError, BackboneMismatch, load_task, read_metadata, save_task, write_atomic
from .backbones import create_model, list_models
from .masks import MASK_METHODS, METHODS, MaskSpec, ksm_mask, mask_spec, piggyback_mask, piggyback_soft_mask
from .network import KSMNet, fingerprint
from .train import (FitResult, TrainConfig, at_chance, drain_epochs, evaluate, fit_task, fit_task_epochs, refit_head,
                    train_backbone)

__all__ = [
    "ArtifactWriteError", "BackboneMismatch", "load_task", "read_metadata", "save_task", "write_atomic",
    "create_model", "list_models", "MASK_METHODS", "METHODS", "MaskSpec", "ksm_mask", "mask_spec", "piggyback_mask", "piggyback_soft_mask", "KSMNet",
    "fingerprint", "FitResult", "TrainConfig", "drain_epochs", "evaluate", "fit_task", "fit_task_epochs",
    "train_backbone", "refit_head", "at_chance", "compiled",
]
