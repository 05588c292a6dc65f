"""What every job's Ray worker process shares, whichever job it runs (a task, the backbone, a Tune trial, a Ray
Train worker): its set-up (threads, allocator, GPU share), the stream's manifest read once per process, the
backbone network built from numpy state, and where the process runs (as run tags).
"""
from __future__ import annotations

import os
import socket
import warnings

import numpy as np
import torch
from torch import nn

from ksm_core import create_model
from ksm_core.cpu import tune_malloc

from .config import ModelCfg
from .data import Manifest

__all__ = ["BACKBONE_EVAL_BATCH", "prepare_worker", "cached_manifest", "state_to_numpy", "build_backbone",
           "node_info"]

_MANIFESTS: dict[tuple[str, int], Manifest] = {}
BACKBONE_EVAL_BATCH = 256  # the backbone's logged test accuracy is measured in batches of this size


def prepare_worker(cpus: float, gpus: float = 0.0) -> None:
    """Per-process set-up: torch threads matched to the CPUs Ray gave this job, allocator tuning, GPU share."""
    torch.set_num_threads(max(1, int(cpus)))
    tune_malloc()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # a reused worker: the previous job's tensors are garbage, give back their memory
    if gpus and torch.cuda.is_available() and 0 < gpus < 1:
        # fractional GPUs are bookkeeping only in Ray: cap this process's share of the memory ourselves
        torch.cuda.set_per_process_memory_fraction(float(gpus))


def cached_manifest(path: str) -> Manifest:
    """The shards' manifest, read once per worker while it is unchanged: a reused worker must see a stream's
    manifest rewritten since (a task appended), so a local file is keyed by its modification time too."""
    key = (path, os.stat(path).st_mtime_ns if os.path.isfile(path) else 0)
    if key not in _MANIFESTS:
        _MANIFESTS[key] = Manifest.load(path)
    return _MANIFESTS[key]


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}


def _width(model_cfg: ModelCfg) -> dict[str, float]:
    return {"width": model_cfg.width} if model_cfg.width is not None else {}


def build_backbone(model_cfg: ModelCfg, num_classes: int, state: dict[str, np.ndarray] | None = None, *,
                   weights_path: str | None = None) -> nn.Module:
    """The backbone network: fresh, from a weights file (``model.weights_path``), or with ``state`` (numpy, e.g.
    read zero-copy from Ray's object store), whose tensors are adopted without a copy (they are never written:
    the KSMNet keeps them frozen)."""
    kw = _width(model_cfg) | ({"weights_path": weights_path} if weights_path else {})
    model = create_model(model_cfg.name, num_classes=num_classes, **kw)
    if state is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, assign=True)
    return model


def node_info() -> dict[str, str]:
    """Where this process runs, as run tags: host name, and inside Ray the node id and IP."""
    info = {"ksm_host": socket.gethostname()}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info["ksm_node_id"] = ctx.get_node_id()
            info["ksm_node_ip"] = ray.util.get_node_ip_address()
    except Exception:  # not inside Ray: host name only
        pass
    return info
