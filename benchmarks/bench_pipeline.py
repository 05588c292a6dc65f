"""What the pipeline costs on top of the method: the same tasks through `run_pipeline` vs a bare ksm_core loop.

Three measurements, side by side in one process, on real Fashion-MNIST (split_fashion_mnist, default caps):

1. overhead   — the sequence's new tasks through the whole pipeline with ONE Ray worker (1 CPU, 1 torch thread),
                vs. the bare loop: the same tasks, same epochs, one after another in this process (1 thread) with
                `fit_task` over uint8 batches held in memory (read and decoded from the shards before timing),
                augmented per step by the same transform. The pipeline's extra is everything else: reading and
                decoding shards, Ray scheduling, MLflow logging, packing and logging artifacts, the report.
2. scaling    — the same pipeline with TWO workers (Ray num_cpus=2) vs one; beside it the machine's own ceiling:
                the bare loop in two processes at once (half the tasks each) vs one process.
3. fixed cost — many tiny tasks (default 50 pairs of classes, 32 train / 32 test images, 1 epoch) through the
                pipeline with one worker; (pipeline wall - bare loop) / tasks = what a task costs beyond training.

Shards and the backbone are made by an untimed warm-up run (a real run reuses both); Ray is started before the
clock starts (on a cluster it already runs). Each timed pipeline run has its own run name, so nothing is reused.

    python benchmarks/bench_pipeline.py                                  # default task size, ~2 min on 2 cores
    python benchmarks/bench_pipeline.py --train-cap 4000 --tiny-tasks 0  # 4x longer tasks, ~4 min
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

import ray  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run_pipeline  # noqa: E402  (registers the ksm_root resolver)
from ksm_core import KSMNet, fit_task  # noqa: E402
from ksm_core.cpu import tune_malloc  # noqa: E402
from pipeline.data import Manifest, make_loader  # noqa: E402
from pipeline.worker import build_backbone  # noqa: E402
from pipeline.config import resolve  # noqa: E402


class InMemory:
    """A bare loop's data: uint8 batches held in RAM, augmented per step with the same transform the shard
    loader applies (crop/flip/resize/normalise), so both sides do the same per-step work."""

    def __init__(self, epochs: list[list[tuple[torch.Tensor, torch.Tensor]]], transform, seed: int):
        self.epochs, self.transform, self.seed, self.epoch = epochs, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.epochs[self.epoch])

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return (self.transform(b, g) for b in self.epochs[self.epoch])


def config(root: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", "progress=false", *overrides])


def pipeline_seconds(root: Path, overrides: list[str], num_cpus: int, run_name: str) -> tuple[float, dict]:
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        t0, t0_epoch = time.perf_counter(), time.time()
        out = run_pipeline.main_from_config(config(root, [*overrides, f"run_name={run_name}"]))
        return time.perf_counter() - t0, {**out, "t0_epoch": t0_epoch}
    finally:
        ray.shutdown()


def bare_seconds(root: Path, overrides: list[str], state: dict, tasks: list[str] | None = None,
                 start: Any = None) -> float:
    """The same tasks with ksm_core alone: in-memory batches, one thread, one task after another.
    ``start`` (a multiprocessing barrier) lines up the clocks of processes run side by side."""
    rc = resolve(config(root, overrides))
    m = Manifest.load(next((Path(rc.paths.shards) / rc.benchmark["name"]).rglob("manifest.json")))
    tasks = tasks or m.new_tasks
    tr = rc.train
    data = {}
    for t in tasks:  # read + decode up front, outside the clock
        loader = make_loader(m, t, "train", batch_size=tr.batch_size, seed=rc.seed)
        epochs = [list(loader.pipeline(e)) for e in range(tr.epochs)]
        data[t] = (InMemory(epochs, loader.transform, rc.seed),
                   list(make_loader(m, t, "test", batch_size=tr.batch_size)))
    init = m.task(m.initial_task)
    torch.set_num_threads(1)
    tune_malloc()
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    for t in tasks:
        bb = build_backbone(rc.model, init.num_classes, state)
        net = KSMNet.from_backbone(bb, copy_backbone=False)
        torch.manual_seed(rc.seed)
        idx = net.add_task(m.task(t).num_classes, method=rc.method.name, name=t, **rc.method.hparams())
        fit_task(net, idx, data[t][0], data[t][1], tr.to_core(device="cpu", seed=rc.seed))
    return time.perf_counter() - t0


def _half(args: tuple) -> float:
    return bare_seconds(*args)


def bare_two_processes(root: Path, overrides: list[str], state: dict, tasks: list[str]) -> float:
    """The machine's own ceiling for two workers: two bare loops in two processes at once, half the tasks
    each; the wall time of the slower one."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as mgr:
        start = mgr.Barrier(2)
        with ctx.Pool(2) as pool:
            halves = [tasks[0::2], tasks[1::2]]
            return max(pool.map(_half, [(root, overrides, state, h, start) for h in halves]))


def backbone_state(out: dict, root: Path) -> dict:
    from mlflow import MlflowClient
    from safetensors.numpy import load_file

    c = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    with tempfile.TemporaryDirectory() as tmp:
        return load_file(c.download_artifacts(out["backbone_run_id"], "backbone/backbone.safetensors", tmp))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per task (overhead and scaling runs)")
    ap.add_argument("--train-cap", type=int, default=None,
                    help="train images per new task (default: the benchmark's cap, 1000); larger = longer tasks")
    ap.add_argument("--tiny-tasks", type=int, default=50, help="0 skips the fixed-cost measurement")
    ap.add_argument("--root", default=None, help="project folder for shards/MLflow (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="ksm-bench-pipeline-")).absolute()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

    seq = [f"train.epochs={args.epochs}"] + ([f"benchmark.caps.train={args.train_cap}"] if args.train_cap else [])
    pairs = list(itertools.islice(itertools.cycle(itertools.combinations(range(10), 2)), args.tiny_tasks + 1))
    tiny = ["benchmark.name=tiny_tasks", "train.epochs=1", "benchmark.caps.train=32", "benchmark.caps.test=32",
            "benchmark.initial_caps.train=200", "benchmark.initial_caps.test=100", "train.backbone.epochs=1",
            "benchmark.class_lists=[" + ",".join(f"[{a},{b}]" for a, b in pairs) + "]"]

    print(f"[bench] warm-up runs (shards + backbones) in {root}", flush=True)
    _, warm = pipeline_seconds(root, seq, 2, "warm")
    n_tasks = len(warm["results"])
    one, out_one = pipeline_seconds(root, seq, 1, "one-worker")
    state = backbone_state(warm, root)
    bare = bare_seconds(root, seq, state)
    two, out_two = pipeline_seconds(root, seq, 2, "two-workers")
    bare2 = bare_two_processes(root, seq, state, [r.task for r in warm["results"]])
    # the one-off part of a run: from the start to the first job's MLflow run (worker start-up + imports)
    first = min(r.start_time for r in out_one["results"]) / 1e3 - out_one["t0_epoch"]
    first_two = min(r.start_time for r in out_two["results"]) / 1e3 - out_two["t0_epoch"]

    load = os.getloadavg()[0]
    train = f"{args.train_cap or 1000} train images"
    print(f"\nsplit_fashion_mnist: {n_tasks} new tasks ({train}) x {args.epochs} epochs, vgg16_bn_cifar width "
          f"0.125, torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.2f}")
    print(f"  bare ksm_core loop (in-memory batches, 1 thread): {bare:7.1f} s")
    print(f"  pipeline, 1 worker:                               {one:7.1f} s   overhead {one / bare:.3f}x (target <= 1.10)")
    print(f"    of which before the first job started:         {first:7.1f} s   (worker start-up: torch, MLflow, "
          f"torch._dynamo imports; backbone reuse); without it {(one - first) / bare:.3f}x")
    print(f"  pipeline, 2 workers:                              {two:7.1f} s   speed-up {one / two:.2f}x (target >= 1.8)")
    print(f"    after the first job started (both runs):        {two - first_two:7.1f} s   speed-up "
          f"{(one - first) / (two - first_two):.2f}x   (the one-off start-up, {first_two:.1f} s here, is not divided)")
    print(f"  bare loop, 2 processes at once (the machine's ceiling): {bare2:5.1f} s   speed-up {bare / bare2:.2f}x")
    if args.tiny_tasks:
        _, warm_tiny = pipeline_seconds(root, tiny, 2, "warm")
        tiny_pipe, _ = pipeline_seconds(root, tiny, 1, "tiny-one-worker")
        tiny_bare = bare_seconds(root, tiny, backbone_state(warm_tiny, root))
        print(f"{args.tiny_tasks} tiny tasks (32 train / 32 test images, 1 epoch), 1 worker:")
        print(f"  bare loop {tiny_bare:.1f} s, pipeline {tiny_pipe:.1f} s -> fixed cost "
              f"{(tiny_pipe - tiny_bare) / args.tiny_tasks:.3f} s/task (target <= 0.5)")


if __name__ == "__main__":
    main()
