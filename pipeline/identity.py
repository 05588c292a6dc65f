"""What makes two things the same, as hashes of their content (ARCHITECTURE.md, "Identity and resume"): a backbone
(``ksm_backbone``), a trained task's result (``ksm_result``) and a stream run (``ksm_sequence``). Pure functions of
the config and the manifest: no Ray, no MLflow.
"""
from __future__ import annotations

import os

from .config import RunConfig, stable_hash
from .data import Manifest

__all__ = ["backbone_key", "result_key", "sequence_key"]


def backbone_key(rc: RunConfig, manifest: Manifest) -> str:
    """What makes two backbones the same: the model, where its weights come from (its training config or a weights
    file), the initial task's content identity and the seed. Nothing about the other tasks: appending a task to a
    stream keeps its backbone."""
    init = manifest.task(manifest.initial_task)
    wp = rc.model.weights_path
    src = {"file": wp, "size": os.path.getsize(wp), "mtime": int(os.path.getmtime(wp))} if wp else \
        rc.train_identity()["backbone"]
    key = {"model": {k: v for k, v in rc.section("model").items() if k != "weights_path"}, "source": src,
           "task": init.identity, "seed": rc.seed}
    transform = rc.data_identity().get("transform")
    if transform is not None:  # trained (or evaluated) through another protocol: another backbone run
        key["transform"] = transform
    return stable_hash(key)


def result_key(rc: RunConfig, fingerprint: str, task_identity: str) -> str:
    """What makes two trained tasks the same result, whichever stream or launch made it: the backbone's weights,
    the task's content, the method, the training config, the data options and the seed."""
    return stable_hash({"backbone": fingerprint, "task": task_identity, "method": rc.section("method"),
                        "train": rc.train_identity(), "data_opts": rc.data_identity(), "seed": rc.seed})


def sequence_key(rc: RunConfig, bb_key: str) -> str:
    """What makes two runs the same stream run (one parent run in MLflow): its name, backbone, model, method,
    training and seed; not its task list, which may grow."""
    return stable_hash({"name": rc.run_name, "backbone": bb_key, "model": rc.section("model"),
                        "method": rc.section("method"), "train": rc.train_identity(), "seed": rc.seed,
                        "data_opts": rc.data_identity()})
