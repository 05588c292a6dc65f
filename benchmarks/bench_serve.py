"""The served multi-task model (issue 14): prediction throughput, one task vs mixed tasks per batch, and the cost
of MLflow's system metrics on a task job.

One real sequence first (embedded Ray, MLflow on a sqlite file, real Fashion-MNIST, the default 1/8-width VGG16-BN,
``--tasks`` tasks of 2 classes, 1 epoch): it registers the model. Then, in this process, side by side so a busy
machine slows every variant alike (variants interleaved rep by rep; medians and ratios within this run):

1. throughput — ``mlflow.pyfunc.load_model("models:/<name>/1").predict(...)`` on real test images, a batch of
   ``--batch`` rows all of one task (a different task each rep) vs the same number of rows mixed over every task;
   images/s, with 1 and 2 torch threads. Also the same requests through MLflow's scoring server app in this
   process (JSON in and out, as ``mlflow models serve`` answers them), fewer reps (JSON costs seconds a batch).
2. system metrics — (a) the cost of one sample, as the monitor's thread pays it (collect CPU/memory/disk/network,
   read the run's status, log the metrics to the sqlite store), wall and CPU time, so the overhead at an interval
   I is cost / I, plus what a job pays once (start, stop, its last partial interval); (b) a task job's training (``jobs.train_task``, the job's own path) with the monitor off, at the
   default 10 s, and at 0.5 s (to make the cost visible above the noise), interleaved.

    python benchmarks/bench_serve.py                      # ~4 min on 2 busy cores
    python benchmarks/bench_serve.py --reps 3 --train-reps 1   # a quick check of the script itself
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def sequence(root: Path, tasks: int) -> dict:
    import ray
    from hydra import compose, initialize_config_dir

    import run_pipeline

    over = [f"paths.root={root}", f"benchmark.num_tasks={tasks}", "benchmark.caps.train=500",
            "benchmark.caps.test=300", "benchmark.initial_caps.train=2000", "benchmark.initial_caps.test=300",
            "train.epochs=1", "train.backbone.epochs=1", "progress=false"]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("config", overrides=over)
        return {"out": run_pipeline.main_from_config(cfg), "cfg": cfg}
    finally:
        ray.shutdown()


def asgi_post(app, body: bytes) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/invocations", "raw_path": b"/invocations", "query_string": b"", "root_path": "",
             "scheme": "http", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def throughput(uri: str, model_uri: str, manifest, batch: int, reps: int, rest_reps: int) -> dict:
    import mlflow
    import numpy as np
    import torch
    from mlflow.pyfunc import scoring_server

    from pipeline.data import iter_samples

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    app = scoring_server.init(model)
    tasks = manifest.task_names
    images = {t: np.stack([im for _, im, _ in iter_samples(manifest, t, "test")]) for t in tasks}
    rng = np.random.default_rng(0)

    def one_task(rep: int) -> dict:
        t = tasks[rep % len(tasks)]
        rows = rng.integers(0, len(images[t]), batch)
        return {"task": np.array([t] * batch), "image": images[t][rows]}

    def mixed(rep: int) -> dict:
        names = rng.choice(tasks, batch)
        return {"task": names, "image": np.stack([images[t][rng.integers(0, len(images[t]))] for t in names])}

    before = torch.get_num_threads()
    for warm in (one_task(0), mixed(0)):
        model.predict(warm)
    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for label, make in (("one task", one_task), ("mixed", mixed)):
                req = make(rep)
                t0 = time.perf_counter()
                model.predict(req)
                times.setdefault(f"{label}, {threads} thread(s)", []).append(time.perf_counter() - t0)
                if threads == 1 and rep < rest_reps:
                    body = json.dumps({"inputs": {"task": req["task"].tolist(), "image": req["image"].tolist()}})
                    t0 = time.perf_counter()
                    status, _ = asgi_post(app, body.encode())
                    times.setdefault(f"{label}, 1 thread(s), REST app", []).append(time.perf_counter() - t0)
                    assert status == 200, status
    torch.set_num_threads(before)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def sample_cost(uri: str, run_id: str, n: int) -> dict:
    """One monitor sample as its thread pays it: collect, read the run's status, log (flushed)."""
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    mon = SystemMetricsMonitor(run_id, sampling_interval=1, tracking_uri=uri)
    walls, cpus = [], []
    for _ in range(n):
        w0, c0 = time.perf_counter(), time.thread_time()
        mon.collect_metrics()
        MlflowClient(uri).get_run(run_id)
        mon.publish_metrics(mon.aggregate_metrics())
        mon.mlflow_logger.flush()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.thread_time() - c0)
    return {"wall_ms": 1000 * statistics.median(walls), "cpu_ms": 1000 * statistics.median(cpus)}


def fixed_cost(tr, n: int) -> dict:
    """What a job pays for the monitor whatever its length: start (monitors, GPU probe, thread), stop, and the
    last partial interval's sample logged at the end."""
    walls = []
    for _ in range(n):
        run_id = tr.start("bench-sysmetrics-fixed", {"ksm_kind": "bench"})
        t0 = time.perf_counter()
        with tr.system_metrics(run_id, 10.0):
            pass
        walls.append(time.perf_counter() - t0)
        tr.finish(run_id)
    return {"wall_ms": 1000 * statistics.median(walls)}


def train_ab(rc, manifest_path: str, task: str, state, tr, reps: int) -> dict:
    """jobs.train_task with the monitor off / at 10 s / at 0.5 s, interleaved; each on its own RUNNING run."""
    from pipeline.jobs import train_task
    from pipeline.worker import prepare_worker

    prepare_worker(1.0)
    secs: dict[str, list[float]] = {"off": [], "10 s": [], "0.5 s": []}
    samples = {"10 s": [], "0.5 s": []}
    train_task(rc, manifest_path, task, state)  # warm-up
    for _ in range(reps):
        for label, interval in (("off", 0.0), ("10 s", 10.0), ("0.5 s", 0.5)):
            run_id = tr.start(f"bench-sysmetrics-{label}", {"ksm_kind": "bench"})
            t0 = time.perf_counter()
            with tr.system_metrics(run_id, interval):
                train_task(rc, manifest_path, task, state)
            secs[label].append(time.perf_counter() - t0)
            if interval:
                hist = tr.client.get_metric_history(run_id, "system/cpu_utilization_percentage")
                samples[label].append(len(hist))
            tr.finish(run_id)
    return {"seconds": {k: statistics.median(v) for k, v in secs.items()}, "all": secs,
            "points": {k: statistics.median(v) for k, v in samples.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=5, help="tasks in the stream (the first trains the backbone)")
    ap.add_argument("--batch", type=int, default=256, help="rows per predict call")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rest-reps", type=int, default=5, help="reps that also time the scoring app (JSON)")
    ap.add_argument("--train-reps", type=int, default=4)
    ap.add_argument("--samples", type=int, default=50, help="monitor samples timed for the per-sample cost")
    args = ap.parse_args()

    from pipeline.config import resolve
    from pipeline.data import Manifest
    from pipeline.tracking import Tracker

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        seq = sequence(root, args.tasks)
        out = seq["out"]
        print(f"sequence: {time.perf_counter() - t0:.1f} s, tasks {[r.task for r in out['results']]}, "
              f"accuracy {[round(r.test_acc, 3) for r in out['results']]}")
        uri = f"sqlite:///{root}/mlflow.db"
        rc = resolve(seq["cfg"])
        model_uri = f"models:/{rc.registry.model_name or rc.run_name}/1"
        manifest = Manifest.load(next((root / "data" / "shards").rglob("manifest.json")))
        import torch

        print(f"load: cpu threads {torch.get_num_threads()}, batch {args.batch}, reps {args.reps}, "
              f"load average {os.getloadavg()[0]:.1f}")
        tp = throughput(uri, model_uri, manifest, args.batch, args.reps, args.rest_reps)
        for k, v in tp.items():
            print(f"  {k:22s} {v:8.0f} images/s")
        for suffix in ("1 thread(s)", "2 thread(s)", "1 thread(s), REST app"):
            print(f"  mixed / one task, {suffix}: {tp[f'mixed, {suffix}'] / tp[f'one task, {suffix}']:.2f}")

        tr = Tracker.setup(uri, "ksm-bench")
        cost = sample_cost(uri, tr.start("bench-sample-cost", {"ksm_kind": "bench"}), args.samples)
        print(f"one system-metrics sample: {cost['wall_ms']:.1f} ms wall, {cost['cpu_ms']:.1f} ms CPU -> overhead "
              f"at 10 s: {cost['cpu_ms'] / 100:.2f}% CPU ({cost['wall_ms'] / 100:.2f}% wall); at 1 s: "
              f"{cost['cpu_ms'] / 10:.2f}%")
        fixed = fixed_cost(tr, args.samples // 5 or 1)
        print(f"per job, whatever its length (start, stop, last partial interval): {fixed['wall_ms']:.1f} ms")

        from safetensors.numpy import load_file

        bb = tr.client.get_run(out["backbone_run_id"])
        state = load_file(tr.client.download_artifacts(bb.info.run_id, "backbone/backbone.safetensors", tmp))
        ab = train_ab(rc, str(manifest.path), manifest.new_tasks[0], state, tr, args.train_reps)
        off = ab["seconds"]["off"]
        for k, v in ab["seconds"].items():
            pts = ab["points"].get(k)
            print(f"  train_task, monitor {k:5s}: {v:6.2f} s median ({(v / off - 1) * 100:+.1f}% vs off)"
                  + (f", {pts:.0f} point(s) logged" if pts is not None else "") + f"  all: "
                  + ", ".join(f"{x:.2f}" for x in ab["all"][k]))
        print(json.dumps({"throughput": tp, "sample_cost": cost, "fixed_cost": fixed, "train_ab": ab["seconds"],
                          "points": ab["points"]}, indent=1))


if __name__ == "__main__":
    main()
