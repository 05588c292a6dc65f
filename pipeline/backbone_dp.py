"""The backbone trained data-parallel with Ray Train (``train.backbone.workers > 1``).

The initial task is the one piece of work in a stream too big for one worker on a real backbone (ImageNet-scale
data, 60 epochs); the task jobs after it are small and many, and stay plain Ray tasks. ``TorchTrainer`` starts
``workers`` Ray Train workers (``cluster.cpus_per_task`` CPUs each, and a whole GPU each when
``cluster.gpus_per_task > 0``: NCCL wants one device per rank, even where task jobs share GPUs), joins them in a
``torch.distributed`` group (gloo on CPU, NCCL on GPU) and wraps the model in DDP (``prepare_model``): gradients
are averaged across workers every step, so the replicas stay identical. Each worker streams its own rows of the
initial task's train shards (``make_loader(rank=, world=)``: the same count on every rank, or DDP would wait
forever for the last step) in batches of ``train.backbone.batch_size / workers``: the batch stays the global one,
so a run takes as many optimizer steps as with one worker and follows the same recipe (measured: with the batch
per worker instead, two workers took half the steps and lost 4 points on a 2-epoch test). Rank 0 evaluates on the test split and hands the weights back as a Ray Train checkpoint (safetensors,
under ``paths.output/ray_train``: on a multi-node cluster that folder must be shared, like the shards).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ksm_core import evaluate
from ksm_core.train import train_backbone

from .config import RunConfig
from .data import make_loader
from .worker import BACKBONE_EVAL_BATCH, build_backbone, cached_manifest, node_info, prepare_worker, state_to_numpy
from .records import BackboneResult

__all__ = ["train_backbone_dp"]

STATE_FILE = "backbone.safetensors"
RECORD_FILE = "backbone.json"  # the BackboneResult but its weights (BackboneResult.to_json)


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: its share of the initial task, DDP steps, then (rank 0) test accuracy + weights."""
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.numpy import save_file

    rc: RunConfig = config["rc"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    prepare_worker(rc.cluster.cpus_per_task, rc.cluster.gpus_per_task)
    m = cached_manifest(config["manifest"])
    init = m.task(m.initial_task)
    bb = rc.train.backbone
    torch.manual_seed(rc.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = ray.train.torch.prepare_model(build_backbone(rc.model, init.num_classes))
    # the batch is the global one, split over the ranks: the same steps per epoch, the same recipe as one worker
    train = make_loader(m, init.name, "train", batch_size=max(1, bb.batch_size // world), seed=rc.seed, rank=rank,
                        world=world,
                        on_corrupt=rc.data.on_corrupt, shuffle_buffer=rc.data.shuffle_buffer,
                        transform=rc.data.transform, decode_workers=max(1, int(rc.cluster.cpus_per_task)),
                        device=rc.device())
    cfg = rc.backbone_train_config()
    res = train_backbone(model, train, None, cfg)  # no test pass inside: a lone rank's forward in DDP could block
    net = model.module if hasattr(model, "module") else model
    with tempfile.TemporaryDirectory(prefix="ksm-bb-dp-") as tmp:
        checkpoint = None
        if rank == 0:
            test = make_loader(m, init.name, "test", batch_size=BACKBONE_EVAL_BATCH, seed=rc.seed,
                               transform=rc.data.transform, decode_workers=max(1, int(rc.cluster.cpus_per_task)),
                               device=rc.device())
            res.test_acc, res.test_loss = evaluate(net, test, cfg)
            net.cpu()
            out = BackboneResult(state_to_numpy(net), res, init.name, tuple(init.class_names), node_info())
            save_file(out.state, str(Path(tmp) / STATE_FILE))
            (Path(tmp) / RECORD_FILE).write_text(out.to_json())
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"test_acc": float(res.test_acc or 0.0)}, checkpoint=checkpoint)


def train_backbone_dp(rc: RunConfig, manifest_path: str) -> BackboneResult:
    """Train the backbone on the initial task with ``train.backbone.workers`` Ray Train workers; returns what
    ``jobs.backbone_job`` returns (rank 0's numpy state and fit, the task, where rank 0 ran)."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from safetensors.numpy import load_file

    cl = rc.cluster
    m = cached_manifest(manifest_path)
    init = m.task(m.initial_task)
    # a whole GPU per worker even when task jobs share GPUs (gpus_per_task < 1): NCCL wants one device per rank
    gpus = 1 if cl.gpus_per_task > 0 else 0
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"rc": rc, "manifest": manifest_path},
        scaling_config=ray.train.ScalingConfig(
            num_workers=rc.train.backbone.workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": cl.cpus_per_task, **({"GPU": gpus} if gpus else {})}),
        run_config=ray.train.RunConfig(
            name=f"backbone-{init.name}-{init.identity}", storage_path=str(Path(rc.paths.output) / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=max(cl.max_retries, 0))),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        return BackboneResult.from_json(load_file(str(Path(folder) / STATE_FILE)),
                                        (Path(folder) / RECORD_FILE).read_text())
