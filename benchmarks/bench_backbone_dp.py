"""The backbone on the initial task: one Ray job (train.backbone.workers=1) vs Ray Train with 2 workers (DDP, gloo),
side by side in one Ray session, on real Fashion-MNIST (split_fashion_mnist's t0: 4000 train images).

    python benchmarks/bench_backbone_dp.py                 # 4 epochs, width 0.125, ~3 min on 2 cores
    python benchmarks/bench_backbone_dp.py --epochs 2 --width 0.0625

Each worker gets `cluster.cpus_per_task` CPUs and half of the global batch `train.backbone.batch_size` (64): both
runs take the same optimizer steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--width", type=float, default=0.125)
    args = ap.parse_args()
    import ray
    from hydra import compose, initialize_config_dir

    import run_pipeline  # noqa: F401  (the ${ksm_root:} resolver)
    from pipeline.backbone_dp import train_backbone_dp
    from pipeline.config import resolve
    from pipeline.data import ensure_shards
    from pipeline.jobs import backbone_job

    root = Path(tempfile.mkdtemp(prefix="ksm-bench-dp-"))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={root}", f"train.backbone.epochs={args.epochs}",
                                           f"model.width={args.width}"])
    rc = resolve(cfg)
    m = ensure_shards(rc.benchmark, rc.paths.shards, log=lambda _: None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.get(ray.remote(lambda: 0).remote())  # the runtime is up before either clock starts
        t0 = time.perf_counter()
        one = ray.get(ray.remote(num_cpus=1)(backbone_job).remote(rc, str(m.path)))
        t1 = time.perf_counter()
        two_rc = dataclasses.replace(rc, train=dataclasses.replace(
            rc.train, backbone=dataclasses.replace(rc.train.backbone, workers=2)))
        two = train_backbone_dp(two_rc, str(m.path))
        t2 = time.perf_counter()
    finally:
        ray.shutdown()
    print(f"\nbackbone on t0 (4000 train images), {args.epochs} epochs, width {args.width}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")
    print("| workers | wall | train s (in the job) | test acc |")
    print("|---:|---:|---:|---:|")
    print(f"| 1 (Ray job) | {t1 - t0:.1f} s | {one.fit.train_seconds:.1f} s | {one.fit.test_acc:.3f} |")
    print(f"| 2 (Ray Train, DDP gloo) | {t2 - t1:.1f} s | {two.fit.train_seconds:.1f} s | {two.fit.test_acc:.3f} |")
    print(f"speed-up {(t1 - t0) / (t2 - t1):.2f}x (wall), {one.fit.train_seconds / two.fit.train_seconds:.2f}x "
          "(training loop)")


if __name__ == "__main__":
    main()
