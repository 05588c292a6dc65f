"""Counts the tracking-store calls a task job makes, for real (ARCHITECTURE.md, step 7: "six store calls plus one
per epoch but the last").

A tiny split Fashion-MNIST stream is trained once through the pipeline (shards, backbone, the stream's run; Ray
embedded), then `pipeline.jobs.task_job` runs in this process for each new task, with a training config of its
own (so it trains, at `--epochs` epochs), while every call into MLflow is counted: each public `MlflowClient`
method (one store round-trip each; a client method that calls another counts once) and each write through an
artifact repository (a file copy on a local store, an upload on a server). Nothing is mocked; the store is a real
sqlite file.

    .venv/bin/python benchmarks/count_store_calls.py                 # 1 and 3 epochs: 6 and 8 calls per task
    .venv/bin/python benchmarks/count_store_calls.py --epochs 1 5

A task longer than `cluster.claim_timeout_s / 6` (10 s) also sends a heartbeat per period, and one longer than
`tracking.system_metrics_s` (10 s) lets MLflow's system-metrics monitor log a point per period: the tiny tasks here
take neither. Exits 1 when a count differs from 6 + (epochs - 1).
"""
from __future__ import annotations

import argparse
import collections
import functools
import inspect
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

TINY = ["benchmark.num_tasks=3", "benchmark.caps.train=200", "benchmark.caps.test=100",
        "benchmark.initial_caps.train=400", "benchmark.initial_caps.test=200", "train.epochs=2",
        "train.backbone.epochs=1", "model.width=0.0625", "progress=false", "registry.export=false"]


class StoreCalls:
    """Counts the outermost MLflow calls made while it is on, by name (any thread)."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.ms: collections.Counter[str] = collections.Counter()  # wall milliseconds in those calls, by name
        self.on = False
        self._depth = threading.local()

    def wrap(self, owner: type, name: str, label: str) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            outer = self.on and depth == 0
            self._depth.n = depth + 1
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self._depth.n = depth
                if outer:
                    self.calls[label] += 1
                    self.ms[label] += (time.perf_counter() - t0) * 1000

        setattr(owner, name, counted)

    def install(self) -> None:
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
        from mlflow.tracking.client import MlflowClient

        for name, fn in inspect.getmembers(MlflowClient, inspect.isfunction):
            if not name.startswith("_"):
                self.wrap(MlflowClient, name, name)
        for name in ("log_artifact", "log_artifacts"):
            self.wrap(LocalArtifactRepository, name, f"artifact repository {name}")


def compose(overrides: list[str]):
    import run_pipeline  # noqa: F401 (registers the ksm_root resolver)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 3], help="epochs per task, one count each")
    args = ap.parse_args()

    import run_pipeline
    from pipeline.config import resolve
    from pipeline.data import Manifest
    from pipeline.identity import result_key
    from pipeline.jobs import JobContext, task_job
    from pipeline.lineage import open_inputs
    from pipeline.sequence import backbone_stage

    root = Path(tempfile.mkdtemp(prefix="ksm-store-calls-"))
    print(f"[calls] {root}: training the tiny stream once (shards, backbone, the stream's run)", flush=True)
    out = run_pipeline.main_from_config(compose([*TINY, f"paths.root={root}"]))
    manifest = Manifest.load(next((root / "data" / "shards").rglob("manifest.json")))

    counter = StoreCalls()
    counter.install()
    rows, wrong = [], 0
    for epochs in args.epochs:
        rc = resolve(compose([*TINY, f"paths.root={root}", f"train.epochs={epochs}"]))
        p = open_inputs(rc, lambda _: None, manifest=manifest)
        state, fp, bb_run = backbone_stage(p, lambda _: None)  # found: the weights the stream trained
        ctx = JobContext(manifest=str(manifest.path), experiment_id=p.tracker.experiment_id,
                         parent_run_id=out["parent_run_id"], sequence_key=out["sequence_key"],
                         backbone_fingerprint=fp, backbone_run_id=bb_run)
        for task in manifest.new_tasks:
            counter.calls.clear()
            counter.ms.clear()
            counter.on = True
            try:
                res = task_job(rc, ctx, task, result_key(rc, fp, manifest.task(task).identity), state)
            finally:
                counter.on = False
            assert res.status == "trained", res
            n, want = sum(counter.calls.values()), 6 + (epochs - 1)
            wrong += n != want
            rows.append((task, epochs, n, want, sum(counter.ms.values()),
                         {k: (v, counter.ms[k] / v) for k, v in sorted(counter.calls.items())}))

    print("\n| task | epochs | store calls | 6 + (epochs - 1) | ms in them | calls by name (ms each) |")
    print("|---|---:|---:|---:|---:|---|")
    for task, epochs, n, want, ms, by_name in rows:
        print(f"| {task} | {epochs} | {n} | {want} | {ms:.0f} | "
              + ", ".join(f"{k} {v}x ({each:.1f})" for k, (v, each) in by_name.items()) + " |")
    print(f"\nsqlite store {root / 'mlflow.db'}, WAL; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; Ray "
          "embedded for the set-up only (the counted jobs ran in this process)")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
