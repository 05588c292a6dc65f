"""A stream of 100 and 1000 tiny tasks through `run_pipeline.py`: driver memory, fixed cost per task, append cost.

Each run is its own `python run_pipeline.py` process (what a user types), on real Fashion-MNIST (the generated
stream `fashion_stream`: 2 classes per task, 32 train / 32 test images, 1 epoch), MLflow on a sqlite file:

1. memory     — the driver's peak RSS (its own `ru_maxrss`, logged on the stream's run as `driver_peak_rss_mb`)
                at 100 and at 1000 tasks; target ratio <= 1.2 (the driver holds small per-task records only).
2. fixed cost — the 1000-task run with one worker vs the bare ksm_core loop over the same 1000 tasks in this
                process (in-memory batches, one thread): (pipeline fan-out wall - bare) / 1000, target <= 0.1 s.
3. append     — one more task on the finished 100-task stream: the whole command's wall time (Python start,
                Ray start, planning 101 tasks, lookups, the one job, the report) vs that task's own job time;
                target <= job time + 10 s.
4. follow     — the same append with a `mode=follow` driver already up on a catalogue of the small stream: the
                time from appending the line to its "trained" line in the driver's log, vs the job's own time.
5. (--wide)   — the 1000-task stream again with `cluster.num_cpus` above the core count.

    python benchmarks/bench_stream_scale.py                 # ~15 min on 2 cores
    python benchmarks/bench_stream_scale.py --small 20 --large 100    # a quick check of the script itself
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

TINY = ["benchmark=fashion_stream", "benchmark.caps.train=32", "benchmark.caps.test=32",
        "benchmark.initial_caps.train=200", "benchmark.initial_caps.test=100", "train.epochs=1",
        "train.backbone.epochs=1", "progress=false"]


def run(root: Path, tasks: int, cpus: int, name: str) -> dict:
    """One `run_pipeline.py` process; its wall time and what the stream's run logged."""
    from mlflow import MlflowClient

    argv = [sys.executable, str(ROOT / "run_pipeline.py"), f"paths.root={root}", *TINY,
            f"benchmark.num_tasks={tasks}", f"cluster.num_cpus={cpus}", f"run_name={name}"]
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")
    parent = c.search_runs([exp.experiment_id], f"tags.ksm_kind = 'sequence' and tags.ksm_run_name = '{name}'",
                           order_by=["attributes.start_time DESC"])[0]
    newest = c.search_runs([exp.experiment_id], "tags.ksm_kind = 'task'", max_results=1,
                           order_by=["attributes.start_time DESC"])[0]
    return {"wall": wall, "rss_mb": parent.data.metrics["driver_peak_rss_mb"],
            "fanout": parent.data.metrics["fanout_wall_seconds"], "trained": parent.data.metrics["tasks_trained"],
            "newest_job_s": newest.data.metrics.get("job_seconds"), "newest_task": newest.data.tags["ksm_task"]}


def follow_append(root: Path, tasks: int) -> dict:
    """A follow driver on a catalogue holding the stream's first ``tasks`` tasks: once they are trained, one line
    is appended; seconds from the append to the driver's "trained" line, and that job's own seconds."""
    import json
    import signal

    from mlflow import MlflowClient

    from pipeline.data.benchmarks import expand, load_benchmark_config

    lists = expand({**load_benchmark_config("fashion_stream"), "num_tasks": tasks})[0]["class_lists"]  # t0..t<tasks>
    lines = [{"name": f"t{i}", "source": {"name": "fashion_mnist"}, "classes": c,
              "caps": {"train": 200, "test": 100} if i == 0 else {"train": 32, "test": 32}}
             for i, c in enumerate(lists)]
    root.mkdir(parents=True, exist_ok=True)
    cat = root / "tasks.jsonl"
    cat.write_text("".join(json.dumps(x) + "\n" for x in lines[:-1]))
    log = root / "follow.log"
    argv = [sys.executable, str(ROOT / "run_pipeline.py"), f"paths.root={root}", "mode=follow", "benchmark=catalogue",
            f"benchmark.path={cat}", "follow.poll_s=0.5", "train.epochs=1", "train.backbone.epochs=1",
            "progress=false", "cluster.num_cpus=1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        last = f"[follow] t{tasks - 1}: trained"
        while last not in log.read_text():
            if proc.poll() is not None:
                raise SystemExit(log.read_text()[-3000:])
            time.sleep(0.2)
        time.sleep(2)  # settled: nothing in flight
        t0 = time.perf_counter()
        with open(cat, "a") as f:
            f.write(json.dumps(lines[-1]) + "\n")
        while f"[follow] t{tasks}: trained" not in log.read_text():
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")
    new = c.search_runs([exp.experiment_id], f"tags.ksm_task = 't{tasks}'")[0]
    return {"seconds": seconds, "job_s": new.data.metrics["job_seconds"]}


def bare(root: Path, tasks: int) -> float:
    """The bare ksm_core loop over the stream's tasks (bench_pipeline's), one thread, in this process."""
    from bench_pipeline import backbone_state, bare_seconds
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")
    bb = c.search_runs([exp.experiment_id], "tags.ksm_kind = 'backbone'")[0]
    state = backbone_state({"backbone_run_id": bb.info.run_id}, root)
    return bare_seconds(root, [*TINY, f"benchmark.num_tasks={tasks}"], state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--large", type=int, default=1000)
    ap.add_argument("--wide", type=int, default=0, help="also run the large stream with this cluster.num_cpus")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ksm-bench-scale-"))
    print(f"[bench] {base}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)

    small = run(base / "small", args.small, 1, "small")
    print(f"[bench] {args.small} tasks: {small}", flush=True)
    append = run(base / "small", args.small + 1, 1, "small")
    print(f"[bench] append 1: {append}", flush=True)
    large = run(base / "large", args.large, 1, "large")
    print(f"[bench] {args.large} tasks: {large}", flush=True)
    bare_s = bare(base / "large", args.large)
    print(f"[bench] bare loop over {args.large} tasks: {bare_s:.1f} s", flush=True)
    followed = follow_append(base / "follow", args.small)
    print(f"[bench] follow append: {followed}", flush=True)
    wide = run(base / "wide", args.large, args.wide, "wide") if args.wide else None

    print(f"\nfashion_stream, 32 train / 32 test images per task, 1 epoch, 1 worker; load {os.getloadavg()[0]:.2f}")
    print(f"| measure | {args.small} tasks | {args.large} tasks | ratio / result | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| driver peak RSS | {small['rss_mb']:.0f} MB | {large['rss_mb']:.0f} MB | "
          f"{large['rss_mb'] / small['rss_mb']:.2f}x | <= 1.2x |")
    print(f"| whole command wall | {small['wall']:.1f} s | {large['wall']:.1f} s | | |")
    print(f"| fan-out wall (1 worker) | {small['fanout']:.1f} s | {large['fanout']:.1f} s | | |")
    print(f"| fixed cost per task (fan-out - bare loop {bare_s:.1f} s) / {args.large} | | | "
          f"{(large['fanout'] - bare_s) / args.large:.3f} s | <= 0.1 s |")
    print(f"| append 1 task to the finished {args.small}-task stream: command wall | {append['wall']:.1f} s | | "
          f"job {append['newest_job_s']:.1f} s + {append['wall'] - append['newest_job_s']:.1f} s | <= job + 10 s |")
    print(f"| append 1 task with `mode=follow` already up: append -> trained | {followed['seconds']:.1f} s | | "
          f"job {followed['job_s']:.1f} s + {followed['seconds'] - followed['job_s']:.1f} s | <= job + 10 s |")
    if wide:
        print(f"| {args.large} tasks, cluster.num_cpus={args.wide}: wall, fan-out, driver RSS | | "
              f"{wide['wall']:.1f} s, {wide['fanout']:.1f} s, {wide['rss_mb']:.0f} MB | | runs |")


if __name__ == "__main__":
    main()
