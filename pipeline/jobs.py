"""What runs inside a Ray worker: train the backbone, or adapt it to one task and track that in MLflow.

``task_epochs`` is the one training path (the sequence's jobs through ``train_task``, and Tune's trials, which
step several tasks one epoch at a time). ``task_job`` wraps it with MLflow bookkeeping and is idempotent: a task
that already has a FINISHED run in its sequence is not trained again, and a RUNNING run left by a worker that
died is marked KILLED before the retry starts its own.

A job receives the RunConfig and a small :class:`JobContext` made by the driver: where the shards' manifest is,
which experiment and parent run to log into, and which backbone it adapts.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ksm_core import (ArtifactWriteError, KSMNet, at_chance, drain_epochs, evaluate, fit_task_epochs, save_task,
                      train_backbone)
from ksm_core.train import FitResult, TrainConfig, resolve_device

from .claims import Heartbeat, acquire
from .config import MethodCfg, RunConfig, TrainCfg
from .data import Manifest, make_loader
from .errors import PipelineError, TrackingUnreachable
from .params import method_params
from .records import BackboneResult, TaskResult
from .redact import redact_text
from .report import CHANCE_LEVEL
from .tracking import Tracker
from .unlogged import RECORD_FILE, EpochRecords, Unlogged, log_outcome, unlogged_dir
from .worker import BACKBONE_EVAL_BATCH, build_backbone, cached_manifest, node_info, prepare_worker, state_to_numpy

__all__ = ["JobContext", "TaskOutcome", "task_epochs", "train_task", "task_job", "backbone_job", "warm_worker",
           "task_datasets", "split_digest"]


@dataclass(frozen=True)
class JobContext:
    """What the driver tells a task job beyond the RunConfig: where to read, where to log, what it adapts."""

    manifest: str                      # the shards' manifest.json (a path or URL)
    experiment_id: str = ""
    parent_run_id: str = ""            # the sequence's run: task runs are its children
    sequence_key: str = ""
    backbone_fingerprint: str = ""
    backbone_run_id: str = ""


@dataclass
class TaskOutcome:
    """A trained (deployed) task: the network holding it, its index, the fit result and the task's data info."""

    net: KSMNet
    task: int
    fit: FitResult
    classes: list[str]
    train_samples: int
    test_samples: int
    eval_name: str
    skipped_samples: int = 0  # lost to corrupt shards (data.on_corrupt=skip), over every pass of both loaders
    skipped_shards: tuple[str, ...] = ()


def task_epochs(rc: RunConfig, manifest_path: str, task_name: str, backbone_state: dict[str, np.ndarray], *,
                method: MethodCfg | None = None, train: TrainCfg | None = None, holdout: float | None = None,
                evaluate_on: str = "test") -> Generator[dict[str, float], None, TaskOutcome]:
    """Adapt the backbone to one task, one epoch per ``next()``: stream its shards, fit masks + BN + head; the
    last ``next()`` deploys, evaluates and returns the TaskOutcome (as StopIteration's value).

    ``evaluate_on``: "test" (the sequence) or "holdout" (Tune: a held-out part of the TRAIN split; the task
    trains on the rest). ``method`` / ``train`` override the run's sections (Tune's sampled values).
    """
    method = method or rc.method
    train = train or rc.train
    m = cached_manifest(manifest_path)
    info = m.task(task_name)
    init = m.task(m.initial_task)
    bb = build_backbone(rc.model, init.num_classes, backbone_state)
    net = KSMNet.from_backbone(bb, copy_backbone=False)
    torch.manual_seed(rc.seed)
    t = net.add_task(info.num_classes, method=method.name, name=task_name, **method.hparams())

    h = rc.data.holdout if holdout is None else holdout
    common = dict(batch_size=train.batch_size, seed=rc.seed, on_corrupt=rc.data.on_corrupt,
                  shuffle_buffer=rc.data.shuffle_buffer, transform=rc.data.transform,
                  decode_workers=max(1, int(rc.cluster.cpus_per_task)), device=rc.device())
    if evaluate_on == "holdout":
        train_loader = make_loader(m, task_name, "train", holdout=h, part="fit", **common)
        eval_loader = make_loader(m, task_name, "train", train=False, holdout=h, part="holdout", **common)
    else:
        train_loader = make_loader(m, task_name, "train", holdout=h, part="fit" if h > 0 else "all", **common)
        eval_loader = make_loader(m, task_name, "test", **common)
    cfg: TrainConfig = train.to_core(device=rc.device(), seed=rc.seed)
    fit = yield from fit_task_epochs(net, t, train_loader, eval_loader, cfg)
    return TaskOutcome(net, t, fit, list(info.class_names), train_loader.num_samples, eval_loader.num_samples,
                       evaluate_on, skipped_samples=train_loader.skipped + eval_loader.skipped,
                       skipped_shards=tuple(sorted(set(train_loader.skipped_shards + eval_loader.skipped_shards))))


def train_task(rc: RunConfig, manifest_path: str, task_name: str, backbone_state: dict[str, np.ndarray],
               on_epoch: Callable[[int, dict[str, float]], None] | None = None, **kw: Any) -> TaskOutcome:
    """:func:`task_epochs` run to its end, each epoch's record shown to ``on_epoch``."""
    return drain_epochs(task_epochs(rc, manifest_path, task_name, backbone_state, **kw), on_epoch)


# ------------------------------------------------------------------------------------------------ task job
def split_digest(m: Manifest, task_name: str, split: str) -> str:
    """The hash of one split's shards (their sha256s, in order): the digest of the task's dataset input."""
    info = m.task(task_name)
    return hashlib.sha256("\n".join(info.sha256[rel] for rel in info.split_shards(split)).encode()).hexdigest()[:16]


def task_datasets(m: Manifest, task_name: str) -> list[tuple[Any, str]]:
    """The task's train and test shards as MLflow datasets (the UI's Dataset column), each with its context:
    name = the task, digest = :func:`split_digest`, source = the task's shard folder (or URL), schema = the stored
    image shape and dtype and the classes (as a column table the UI shows), profile = rows and shards."""
    from mlflow.entities import Dataset

    info = m.task(task_name)
    out = []
    for split in ("train", "test"):
        rels = info.split_shards(split)
        folder = redact_text(m.url(rels[0]).rsplit("/", 1)[0])  # in the store for all to read: no login
        if folder.startswith(("http://", "https://")):
            source_type, source = "http", {"url": folder}
        else:
            source_type, source = ("local" if "://" not in folder or folder.startswith("file:") else "external",
                                   {"uri": folder})
        h, w, c = info.image_shape
        classes = ", ".join(f"{i}={n}" for i, n in enumerate(info.class_names))
        schema = {"mlflow_colspec": [{"name": "image", "type": f"uint8 [{h}, {w}, {c}] (H, W, C)", "required": True},
                                     {"name": "label", "type": f"long, {info.num_classes} classes: {classes}",
                                      "required": True}],
                  "ksm": {"image_shape": [h, w, c], "dtype": "uint8", "classes": list(info.class_names)}}
        profile = {"num_rows": info.counts.get(split, 0), "shards": len(rels), "task_identity": info.identity}
        out.append((Dataset(name=task_name, digest=split_digest(m, task_name, split), source_type=source_type,
                            source=json.dumps(source), schema=json.dumps(schema), profile=json.dumps(profile)), split))
    return out


def save_task_artifact(rc: RunConfig, out: TaskOutcome, task_name: str, folder: Path) -> tuple[Path, int]:
    """Write the task's artifact into ``folder`` (under ``paths.output``), atomically (``ksm_core.write_atomic``);
    returns its path and size. A write that fails (disk full, read-only or forbidden folder) raises a
    PipelineError naming the path, the errno and the fix; the caller marks the run FAILED, so no rerun trusts
    anything it left."""
    fix = (f"free space there, or point paths.output at another folder (python run_pipeline.py "
           f"paths.output=/a/roomier/disk); the task's run is marked FAILED and a rerun trains it again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{task_name}.safetensors"
        size = save_task(out.net, out.task, path, extra={"classes": out.classes, "task": task_name,
                                                           "test_acc": out.fit.test_acc})
    except ArtifactWriteError as e:  # the sentence names the path and the errno
        shutil.rmtree(folder, ignore_errors=True)
        raise PipelineError(f"task {task_name}: {e}; {fix}") from e
    except OSError as e:  # the folder itself could not be made
        raise PipelineError(f"task {task_name}: cannot write its artifact under paths.output={rc.paths.output}: "
                            f"[{errno.errorcode.get(e.errno or 0, e.errno)}] {e.strerror or e}"
                            f"{f' ({e.filename})' if e.filename else ''}; {fix}") from e
    return path, size


def retrain_seed(seed: int) -> int:
    """The seed a task ending at chance is trained again with (train.retrain_at_chance): another seed, fixed, so
    the same command reproduces it."""
    return seed + 7919


def task_job(rc: RunConfig, ctx: JobContext, task_name: str, result: str,
             backbone_state: dict[str, np.ndarray]) -> TaskResult:
    """One new task, end to end, tracked as a child run of the sequence. ``result`` is its result key (backbone,
    task content, method, training, seed): a FINISHED run with it, from any stream, is the task's result. Safe to
    run more than once.

    Store round-trips are what a tiny task of a large stream pays most for (~10 ms each on sqlite), so a task
    makes six plus one per epoch but the last: the claim (create, one search), its datasets, the artifact, one
    final batch (the last epoch's record, params, metrics, tags, system metrics) and the finish; its result is
    built here, not read back.

    A tracking server down for longer than ``tracking.outage_s`` costs no training: the epochs go on (their
    records wait), and a task that finished training is kept under ``paths.output/unlogged/`` with its whole
    record; the next run of the same command logs it there instead of training it again."""
    prepare_worker(rc.cluster.cpus_per_task, rc.cluster.gpus_per_task)
    tr = Tracker(rc.tracking.uri, ctx.experiment_id, rc.tracking.outage_s)
    keys = {"ksm_kind": "task", "ksm_result": result}
    tags = {"ksm_sequence": ctx.sequence_key, "ksm_task": task_name,
            "ksm_task_id": cached_manifest(ctx.manifest).task(task_name).identity, **node_info()}
    # a FINISHED run with this result (a retry after the run finished, another stream, another launch) is the
    # result; another live launch training it is waited for; a dead attempt's run is closed KILLED
    claim = acquire(tr, keys, task_name, tags, parent=ctx.parent_run_id, stale_s=rc.cluster.claim_timeout_s)
    if claim.done is not None:
        return TaskResult.from_run(claim.done, status="reused")
    run_id = claim.run_id
    assert run_id is not None
    tr.inputs(run_id, task_datasets(cached_manifest(ctx.manifest), task_name))
    folder = unlogged_dir(rc, task_name, result)
    # lexists: a record that is there but not a readable file is kept and reported (the run FAILED), not trained over
    with tr.running(run_id, finish=False):
        kept = Unlogged.load(folder) if os.path.lexists(folder / RECORD_FILE) else None
    if kept is not None:  # trained before, while the server was down: log that, do not train again
        log_outcome(tr, claim.run, kept, rc, tags={"ksm_recovered_from": kept.run_id})
        shutil.rmtree(folder, ignore_errors=True)
        return TaskResult.from_logged(claim.run.info, "recovered", kept.params, kept.metrics,
                                      {**claim.run.data.tags, **kept.tags})
    t0 = time.perf_counter()
    # epoch records logged with the final batch: the last one (one store call fewer per task; a one-epoch task
    # of a large stream makes no call of its own for it), and any the server did not take
    records = EpochRecords(tr, run_id)

    def on_epoch(epoch: int, rec: dict[str, float]) -> None:
        records.add(epoch, {k: v for k, v in rec.items() if k != "epoch"}, defer=epoch >= rc.train.epochs - 1)

    # the claim stays alive while it works. log_outcome closes the run FINISHED (or keeps its record when the server
    # is down: a TrackingUnreachable leaves the run to the rerun's claim, which closes it KILLED); an error closes it
    # FAILED
    with Heartbeat(tr, run_id, rc.cluster.claim_timeout_s / 6), tr.running(run_id, finish=False):
        with tr.system_metrics(run_id, rc.tracking.system_metrics_s) as system:  # CPU, memory, GPU
            out = train_task(rc, ctx.manifest, task_name, backbone_state, on_epoch=on_epoch)
            first_acc = None
            if rc.train.retrain_at_chance and at_chance(out.fit.test_acc, len(out.classes), rc.train.chance_margin):
                # once, with another (fixed) seed; its epochs are logged after the first attempt's
                first_acc = out.fit.test_acc
                retry = dataclasses.replace(rc, seed=retrain_seed(rc.seed))
                out = train_task(retry, ctx.manifest, task_name, backbone_state,
                                 on_epoch=lambda e, r: on_epoch(e + rc.train.epochs, r))
        stats = out.net.mask_stats(out.task)
        path, size = save_task_artifact(rc, out, task_name, folder)
        params = {
            **method_params(rc.method, rc.train),
            "epochs": rc.train.epochs, "batch_size": rc.train.batch_size,
            "model": rc.model.name, "model_width": rc.model.width,
            "backbone_fingerprint": ctx.backbone_fingerprint, "backbone_run_id": ctx.backbone_run_id,
            "task": task_name, "classes": ", ".join(out.classes), "num_classes": len(out.classes),
            "train_samples": out.train_samples, "test_samples": out.test_samples, "seed": rc.seed,
            "device": out.fit.device, "compile": rc.train.compile, "transform": rc.data.transform,
            **({"retrain_seed": retrain_seed(rc.seed)} if first_acc is not None else {}),
        }
        final = {"test_acc": out.fit.test_acc, "test_loss": out.fit.test_loss,
                 "train_seconds": out.fit.train_seconds, "job_seconds": time.perf_counter() - t0,
                 "compile_seconds": out.fit.compile_seconds if rc.train.compile else None,
                 # 1 when the step ran compiled (compile=auto decides per task: ksm_core.compiled.should_compile)
                 "compiled": float(out.fit.compiled) if rc.train.compile else None,
                 "artifact_bytes": size, "mask_ones": stats["ones"], "mask_soft": stats["soft"],
                 "mask_zeros": stats["zeros"], "steps": out.fit.steps, "skipped_samples": out.skipped_samples,
                 "refit_seconds": out.fit.refit_seconds if rc.train.head_refit else None,
                 "first_test_acc": first_acc}
        final.update({f"layer_ones.{i:02d}.{name}": v for i, (name, v) in enumerate(stats["layers"].items())})
        end_tags = {"ksm_device": out.fit.device,
                    **({"ksm_warning": CHANCE_LEVEL}
                       if at_chance(out.fit.test_acc, len(out.classes), rc.train.chance_margin) else {}),
                    **({"ksm_retrained": CHANCE_LEVEL} if first_acc is not None else {}),
                    **({"ksm_skipped_shards": ", ".join(map(redact_text, out.skipped_shards))}
                       if out.skipped_shards else {})}
        rec = Unlogged(artifact=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                       params={k: str(v) for k, v in params.items()}, metrics={**final, **system},
                       tags=end_tags, step=rc.train.epochs * (1 if first_acc is None else 2), run_id=run_id,
                       epochs=records.waiting)
        try:
            log_outcome(tr, claim.run, rec, rc)
        except TrackingUnreachable as e:
            where = rec.keep()
            raise TrackingUnreachable(f"task {task_name} finished training, but {e}. Nothing is lost: the "
                                      f"trained task is kept at {where} and the next run of the same command "
                                      "logs it from there without training it again") from None
        shutil.rmtree(folder, ignore_errors=True)
    return TaskResult.from_logged(claim.run.info, "trained", params=rec.params, metrics=final,
                                  tags={**claim.run.data.tags, **end_tags})


def warm_worker(cpus: float, gpus: float = 0.0) -> int:
    """A no-op job: the first job a Ray worker runs pays for importing torch, MLflow and WebDataset (~2 s), and
    its first optimizer for torch._dynamo (~1 s: ``Optimizer.add_param_group`` is wrapped by
    ``torch._disable_dynamo``, which imports it on first call). The driver sends one per worker slot before
    its own set-up, so task jobs start warm."""
    prepare_worker(cpus, gpus)
    import torch._dynamo  # noqa: F401

    return os.getpid()


# -------------------------------------------------------------------------------------------- backbone job
def backbone_job(rc: RunConfig, manifest_path: str) -> BackboneResult:
    """Train the backbone on the initial task (or load model.weights_path); returns its numpy state and fit."""
    prepare_worker(rc.cluster.cpus_per_task, rc.cluster.gpus_per_task)
    m = cached_manifest(manifest_path)
    init = m.task(m.initial_task)
    bb = rc.train.backbone
    cfg = rc.backbone_train_config()
    test = make_loader(m, init.name, "test", batch_size=BACKBONE_EVAL_BATCH, seed=rc.seed,
                       transform=rc.data.transform, decode_workers=max(1, int(rc.cluster.cpus_per_task)),
                       device=rc.device())
    torch.manual_seed(rc.seed)
    if rc.model.weights_path:
        model = build_backbone(rc.model, init.num_classes, weights_path=rc.model.weights_path)
        dev = resolve_device(cfg.device)
        model.to(dev)
        acc, loss = evaluate(model, test, cfg)  # the loaded weights' accuracy on the initial task, for the record
        res = FitResult(test_acc=acc, test_loss=loss, device=str(dev))
    else:
        model = build_backbone(rc.model, init.num_classes)
        train = make_loader(m, init.name, "train", batch_size=bb.batch_size, seed=rc.seed,
                            on_corrupt=rc.data.on_corrupt, shuffle_buffer=rc.data.shuffle_buffer,
                            transform=rc.data.transform, decode_workers=max(1, int(rc.cluster.cpus_per_task)),
                            device=rc.device())
        res = train_backbone(model, train, test, cfg)
    model.cpu()
    return BackboneResult(state_to_numpy(model), res, init.name, tuple(init.class_names), node_info())
