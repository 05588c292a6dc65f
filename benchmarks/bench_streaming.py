"""Streaming throughput of the shard loader vs. the rate a KSM training step consumes images.

Loader rate: images/s through the whole single-process WebDataset pipeline of one task's train split (read +
sha256 check, tar parsing, shuffle buffer, decode, batching, resize 28->32, RandomCrop + flip, grey->3
channels, normalisation), median over epochs. Training rate: images/s of one KSM step (forward + backward +
Adam on masks + BN + head) of the default model, ``create_model("vgg16_bn_cifar", num_classes=<the task's>,
width=0.125)`` wrapped with ``KSMNet.from_backbone``, on the loader's own batches, median over rounds. The
ratio says how far ahead of training the loader runs (target >= 10x: loading is then <10% of a step).

    python benchmarks/bench_streaming.py                                  # default benchmark, CPU
    python benchmarks/bench_streaming.py --benchmark fashion_to_digits --task digits

Shards are written on first use under --shard-root (default data/shards, as the pipeline does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data import ensure_shards, load_benchmark_config, make_loader  # noqa: E402


def loader_epoch_rate(loader) -> tuple[float, int]:
    """Images/s of one full pass over the loader, and the number of images."""
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return n / (time.perf_counter() - t0), n


def make_ksm_step(width: float, num_classes: int):
    """One KSM training step (forward + backward + Adam on masks, BN, head) of the default model, or None."""
    try:
        from ksm_core.backbones import create_model
        from ksm_core.network import KSMNet
    except ImportError as exc:
        print(f"ksm_core not available ({exc}): loader rate only")
        return None
    torch.manual_seed(0)
    net = KSMNet.from_backbone(create_model("vgg16_bn_cifar", num_classes=num_classes, width=width))
    t = net.add_task(num_classes, method="ksm")
    net.set_task(t).train()
    opt = torch.optim.Adam([p for group in net.task_parameters(t).values() for p in group], lr=2e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def step_rate(step, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> float:
    """Images/s over ``steps`` training steps cycling through real batches."""
    t0 = time.perf_counter()
    n = 0
    for i in range(steps):
        x, y = batches[i % len(batches)]
        step(x, y)
        n += len(y)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="split_fashion_mnist")
    ap.add_argument("--task", default=None, help="default: the first new task")
    ap.add_argument("--shard-root", default=str(ROOT / "data" / "shards"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds, each = 1 loader epoch + --steps train steps")
    ap.add_argument("--steps", type=int, default=10, help="training steps per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--format", choices=("npy", "png"), default=None, help="override the benchmark's shard format")
    ap.add_argument("--no-train-step", action="store_true", help="time the loader only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bench = load_benchmark_config(args.benchmark)
    if args.format and args.format != (bench.get("shard") or {}).get("format"):
        bench["shard"] = {**(bench.get("shard") or {}), "format": args.format}
        bench["name"] = f"{bench['name']}_{args.format}"  # its own shard folder
    manifest = ensure_shards(bench, args.shard_root, log=lambda m: None)
    task = args.task or manifest.new_tasks[0]
    info = manifest.task(task)
    loader = make_loader(manifest, task, "train", batch_size=args.batch_size, flip=True)
    batches = [b for _, b in zip(range(8), loader, strict=False)]  # also the loader's warm-up
    step = None if args.no_train_step else make_ksm_step(args.width, info.num_classes)
    if step is not None:
        step_rate(step, batches, 3)  # warm-up
    # interleaved rounds, so drift in machine load hits both rates alike
    load_rates, step_rates = [], []
    for _ in range(args.rounds):
        rate, n = loader_epoch_rate(loader)
        load_rates.append(rate)
        if step is not None:
            step_rates.append(step_rate(step, batches, args.steps))
    load_rate = statistics.median(load_rates)

    print(
        f"benchmark {args.benchmark}, task {task}: {n} train images {info.image_shape} {info.image_format} -> "
        f"[{args.batch_size}, 3, 32, 32]; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}; medians of {args.rounds} interleaved rounds"
    )
    print(f"  loader (read + sha256 + decode + augment + batch, 1 process): {load_rate:8.0f} images/s")
    if step is None:
        print("  (no KSM step timed)")
        return
    train_rate = statistics.median(step_rates)
    print(
        f"  KSM train step, vgg16_bn_cifar width {args.width}:            {train_rate:8.0f} images/s "
        f"({args.batch_size / train_rate * 1e3:.1f} ms/step)"
    )
    print(
        f"  ratio loader / train step = {load_rate / train_rate:.1f}x (target >= 10x); loading adds "
        f"{100 * train_rate / load_rate:.0f}% to a training epoch run in the same process"
    )


if __name__ == "__main__":
    main()
