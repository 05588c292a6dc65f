"""What a job hands back to the driver, as typed records: :class:`TaskResult` (one task's result, as every report,
comparison and follow-up reads it) and :class:`BackboneResult` (the backbone a job trained or loaded).

A task result is built from what its run logged (its params, metrics and tags), never from the job's own objects:
a result reused from a FINISHED run of another stream and one this job just trained read the same. Floor 0:
imports nothing of the pipeline (ksm_core's ``FitResult`` only), so any floor may hold these records.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ksm_core.train import FitResult

__all__ = ["TaskResult", "BackboneResult"]


@dataclass(frozen=True)
class TaskResult:
    """One task's result as the driver reports it: which run holds it, how it was got, and what its run logged
    that a report shows. A metric the run did not log is None (``compile_seconds`` without ``train.compile``)."""

    task: str
    run_id: str
    status: str                               # "trained" by this run, "reused" (a FINISHED run with its result
                                              # key) or "recovered" (trained while the server was down, logged now)
    classes: str = ""                         # the class names, comma-separated, as the run's param
    test_acc: float | None = None
    train_seconds: float | None = None
    compile_seconds: float | None = None
    artifact_bytes: float | None = None
    mask_ones: float | None = None            # fractions of the task's kernels whose mask is 1, soft (0 < m < 1)
    mask_soft: float | None = None
    # masked layer -> fraction of its kernels kept, in the network's order (read-only by convention: a dict
    # so that Ray and pickle carry it; nothing writes it after from_logged)
    layers: dict[str, float] = field(default_factory=dict)
    node: str | None = None                   # where it trained: the Ray node's IP, else the host name
    device: str = ""
    skipped_samples: int = 0                  # lost to corrupt shards (data.on_corrupt=skip)
    skipped_shards: str = ""
    # "chance_level" when the task ended within train.chance_margin of chance (tag ksm_warning); retrained: it
    # was trained once more for that reason (train.retrain_at_chance, tag ksm_retrained)
    warning: str = ""
    retrained: bool = False
    start_time: int | None = None             # the run's start, ms since the epoch (MLflow's)
    sequence: str = ""                        # the key of the stream whose run it is (tag ksm_sequence): the
                                              # stream's own run, or a result another stream trained

    @property
    def artifact_kb(self) -> float:
        """The task artifact's size in KB (0 when the run logged none): the report's column."""
        return (self.artifact_bytes or 0) / 1024

    @classmethod
    def from_run(cls, run: Any, status: str) -> TaskResult:
        """The result a FINISHED task run holds (an ``mlflow.entities.Run``)."""
        return cls.from_logged(run.info, status, run.data.params, run.data.metrics, run.data.tags)

    @classmethod
    def from_logged(cls, info: Any, status: str, params: Mapping[str, str], metrics: Mapping[str, float | None],
                    tags: Mapping[str, str]) -> TaskResult:
        """The result from a run's info (its id and start time) and what it logged, or was about to log: a job
        that has just logged its run builds its result from the same values instead of reading them back (one
        store call fewer per task)."""
        m = metrics
        # metric layer_ones.NN.<layer>: NN orders the layers as the network does
        layers = {k.split(".", 2)[2]: v for k, v in sorted(m.items()) if k.startswith("layer_ones.")}
        return cls(
            task=tags.get("ksm_task", ""), run_id=info.run_id, status=status, classes=params.get("classes", ""),
            test_acc=m.get("test_acc"), train_seconds=m.get("train_seconds"), compile_seconds=m.get("compile_seconds"),
            artifact_bytes=m.get("artifact_bytes"), mask_ones=m.get("mask_ones"), mask_soft=m.get("mask_soft"),
            layers=layers, node=tags.get("ksm_node_ip") or tags.get("ksm_host"), device=tags.get("ksm_device", ""),
            skipped_samples=int(m.get("skipped_samples") or 0), skipped_shards=tags.get("ksm_skipped_shards", ""),
            warning=tags.get("ksm_warning", ""), retrained=bool(tags.get("ksm_retrained")),
            start_time=info.start_time, sequence=tags.get("ksm_sequence", ""))


@dataclass(frozen=True)
class BackboneResult:
    """The backbone a job trained on the initial task (or loaded from ``model.weights_path``), for the driver to
    log: its weights as numpy (Ray maps them into every job zero-copy), its fit, the task and where it ran."""

    state: dict[str, np.ndarray]
    fit: FitResult
    task: str
    classes: tuple[str, ...]
    node: dict[str, str] = field(default_factory=dict)  # ksm_host, and inside Ray ksm_node_id, ksm_node_ip: tags

    def to_json(self) -> str:
        """Everything but the weights, as JSON: what a Ray Train checkpoint holds beside them (the weights travel
        as safetensors). :meth:`from_json` reads it back."""
        return json.dumps({"fit": self.fit.to_dict(), "task": self.task, "classes": list(self.classes),
                           "node": self.node})

    @classmethod
    def from_json(cls, state: dict[str, np.ndarray], text: str) -> BackboneResult:
        d = json.loads(text)
        return cls(state=state, fit=FitResult(**d["fit"]), task=d["task"], classes=tuple(d["classes"]),
                   node=dict(d["node"]))
