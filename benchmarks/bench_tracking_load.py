"""Issue #24, load: N concurrent task-like jobs log through one `mlflow server` (cluster/start_mlflow_server.sh), on a
sqlite store and on a real PostgreSQL 15, and 32 concurrent launches of one stream's claim path.

Each job is a process (forked from this one after MLflow is imported: no import cost per job) that makes, per task,
exactly the tracking calls `pipeline.jobs.task_job` makes, through the pipeline's own `Tracker` and
`pipeline.claims.acquire`: the claim (create_run + one search), the task's two dataset inputs, one metrics call per
epoch but the last, the artifact (through the server's artifact proxy), one final `log_batch` (the last epoch, the
params, the final metrics, the end tags: the keys a real task run logs, replayed from one) and the finish. No
training: a task's wall time here is its fixed tracking cost. Every MLflow client call is timed (p50/p95 by call);
a call that raises is an error (the job goes on with its next task); the server's log is searched for errors (a
request MLflow's client retried by itself still shows there); afterwards the store must hold exactly one FINISHED
run per task and nothing RUNNING.

  .venv/bin/python benchmarks/bench_tracking_load.py                       # sqlite and postgres, N = 8, 32, 64
  .venv/bin/python benchmarks/bench_tracking_load.py --stores postgres --n 64 --workers 4 --pool 5 --overflow 10
  .venv/bin/python benchmarks/bench_tracking_load.py --claims 32 --n 0     # only the 32 concurrent launches

PostgreSQL runs as tests/pg_helpers.py starts it (the postgres user, a temp folder, 127.0.0.1), with fsync on.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ... at" per finished run

from mlflow.entities import Dataset  # noqa: E402

from pipeline.claims import acquire  # noqa: E402
from pipeline.tracking import Tracker  # noqa: E402

# -------------------------------------------------------------------------------- a task run's payload, replayed
# The keys (and value shapes) of a real FINISHED task run of the tiny stream (KSM, VGG-16-BN at width 1/16), as
# pipeline.jobs.task_job logged them: params, final metrics (layer_ones per masked layer, MLflow's system metrics),
# the end tags. Values vary per task.
LAYERS = ["features.0", "features.3", "features.7", "features.10", "features.14", "features.17", "features.20",
          "features.24", "features.27", "features.30", "features.34", "features.37", "features.40", "classifier.0",
          "classifier.2"]
SYSTEM = ["cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
          "disk_usage_percentage", "disk_usage_megabytes", "disk_available_megabytes", "network_receive_megabytes",
          "network_transmit_megabytes"]
EPOCH_KEYS = ["train_loss", "train_acc", "epoch_seconds"]


def epoch_metrics(rng: random.Random) -> dict[str, float]:
    return {"train_loss": rng.uniform(0.1, 0.7), "train_acc": rng.uniform(0.5, 1.0), "epoch_seconds": rng.uniform(0.3, 2)}


def task_params(task: str, epochs: int, backbone_run: str = "0" * 32) -> dict[str, str]:
    return {"method": "ksm", "tau": "0.005", "init": "0.01", "k": "1200.0", "T": "100.0", "lr_mask": "0.001",
            "lr_head": "0.001", "epochs": str(epochs), "batch_size": "32", "model": "vgg16_bn_cifar",
            "model_width": "0.0625", "backbone_fingerprint": "8" * 64, "backbone_run_id": backbone_run, "task": task,
            "classes": "Ankle boot, Trouser", "num_classes": "2", "train_samples": "120", "test_samples": "40",
            "seed": "0", "device": "cpu", "compile": "False"}


def final_metrics(rng: random.Random) -> dict[str, float]:
    acc = rng.uniform(0.45, 1.0)
    m = {"test_acc": acc, "test_loss": 1 - acc, "train_seconds": rng.uniform(0.5, 5), "job_seconds": rng.uniform(1, 6),
         "artifact_bytes": 25168.0, "mask_ones": rng.random(), "mask_soft": 0.0, "mask_zeros": 0.0, "steps": 4.0,
         "skipped_samples": 0.0, "refit_seconds": rng.uniform(0.05, 0.3)}
    m.update({f"layer_ones.{i:02d}.{name}": rng.random() for i, name in enumerate(LAYERS)})
    m.update({f"system/{k}": rng.uniform(0, 100) for k in SYSTEM})
    return m


def datasets(task: str, task_id: str) -> list[tuple[Dataset, str]]:
    """Two dataset inputs shaped as pipeline.jobs.task_datasets makes them (schema and profile JSON included)."""
    schema = json.dumps({"mlflow_colspec": [{"name": "image", "type": "uint8 [28, 28, 1] (H, W, C)", "required": True},
                                            {"name": "label", "type": "long, 2 classes: 0=Ankle boot, 1=Trouser",
                                             "required": True}],
                         "ksm": {"image_shape": [28, 28, 1], "dtype": "uint8", "classes": ["Ankle boot", "Trouser"]}})
    return [(Dataset(name=task, digest=f"{task_id}{split[:2]}"[:36], source_type="local",
                     source=json.dumps({"uri": f"/shards/tasks/{task}-{task_id}"}), schema=schema,
                     profile=json.dumps({"num_rows": n, "shards": 1, "task_identity": task_id})), split)
            for split, n in (("train", 120), ("test", 40))]


class Timed:
    """The Tracker's client, each call timed under its MLflow name (log_batch split: the final one, with params)."""

    def __init__(self, client: Any, times: dict[str, list[float]]):
        self._c, self._times = client, times

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._c, name)
        if not callable(attr):
            return attr

        def call(*a: Any, **kw: Any) -> Any:
            label = f"{name}(final)" if name == "log_batch" and kw.get("params") else name
            t0 = time.perf_counter()
            try:
                return attr(*a, **kw)
            finally:
                self._times[label].append(time.perf_counter() - t0)

        return call


def log_task(tr: Tracker, run: Any, task: str, epochs: int, rng: random.Random, artifact: Path,
             end_tags: dict[str, str] | None = None) -> None:
    """What task_job does once it holds the claim, tracking only (train_s of sleep stands for the training)."""
    run_id = run.info.run_id
    tr.inputs(run_id, datasets(task, run.data.tags.get("ksm_task_id", "0" * 16)))
    for e in range(epochs - 1):
        tr.metrics(run_id, epoch_metrics(rng), step=e)
    tr.artifact(run_id, artifact, "task", artifact_uri=run.info.artifact_uri)
    tr.log(run_id, params=task_params(task, epochs), metrics=final_metrics(rng), tags={"ksm_device": "cpu",
                                                                                      **(end_tags or {})},
           step=epochs, history=[(epochs - 1, epoch_metrics(rng))])
    tr.finish(run_id, "FINISHED")


def job(uri: str, exp_id: str, parent: str, seq: str, tasks: list[tuple[str, str]], epochs: int, train_s: float,
        out: str, go: Any, seed: int) -> None:
    """One forked job: the tasks in order, each through the real claim and logging calls."""
    from mlflow.utils import request_utils

    request_utils._cached_get_request_session.cache_clear()  # no HTTP connection shared with the parent
    sys.stdout = sys.stderr = open(out + ".log", "w", buffering=1)
    rng = random.Random(seed)
    times: dict[str, list[float]] = defaultdict(list)
    tr = Tracker(uri, exp_id)
    tr.client = Timed(tr.client, times)
    artifact = Path(out + ".safetensors")
    artifact.write_bytes(os.urandom(25168))
    res: dict[str, Any] = {"task_s": [], "errors": [], "trained": 0, "reused": 0}
    go.wait()
    for task, result in tasks:
        t0 = time.perf_counter()
        try:
            claim = acquire(tr, {"ksm_kind": "task", "ksm_result": result}, task,
                            {"ksm_sequence": seq, "ksm_task": task, "ksm_task_id": result[:16], "ksm_host": "bench"},
                            parent=parent, stale_s=120, poll_s=0.2)
            if claim.done is not None:
                res["reused"] += 1
                continue
            if train_s:
                time.sleep(train_s)
            log_task(tr, claim.run, task, epochs, rng, artifact)
            res["trained"] += 1
            res["task_s"].append(time.perf_counter() - t0 - train_s)
        except Exception as e:  # noqa: BLE001  (counted: the job goes on, as a fan-out would)
            res["errors"].append(f"{type(e).__name__}: {str(e)[:300]}")
    res["times"] = times
    Path(out).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------------- servers
def start_server(store: str, folder: Path, workers: int, pool: int | None, overflow: int | None, pg: Any = None):
    from test_cluster import CLUSTER_DIR, VENV_BIN, Proc, serve_on_a_free_port

    env = {**os.environ, "KSM_MLFLOW_DIR": str(folder / "store"), "KSM_MLFLOW_WORKERS": str(workers),
           "MLFLOW": str(VENV_BIN / "mlflow")}
    env.pop("KSM_MLFLOW_HOST", None)
    if pg is not None:
        env["KSM_MLFLOW_BACKEND_STORE_URI"] = pg.uri
    if pool is not None:
        env["KSM_MLFLOW_POOL_SIZE"] = str(pool)
    if overflow is not None:
        env["KSM_MLFLOW_MAX_OVERFLOW"] = str(overflow)
    log = folder / f"server-{store}-{workers}w.log"

    def start(port: int):
        return Proc(["bash", str(CLUSTER_DIR / "start_mlflow_server.sh")], log,
                    env={**env, "KSM_MLFLOW_PORT": str(port)}, cwd=folder)

    proc, port = serve_on_a_free_port(start, "/health")
    return proc, f"http://127.0.0.1:{port}", log


SERVER_ERRORS = re.compile(r"Traceback|QueuePool limit|database is locked|OperationalError|IntegrityError|"
                           r"\" 5\d\d|status(?:_code)?[ =:]+5\d\d", re.I)


def server_errors(log: Path, since: int) -> list[str]:
    lines = log.read_text(errors="replace")[since:].splitlines()
    return [ln[:200] for ln in lines if SERVER_ERRORS.search(ln)]


# ---------------------------------------------------------------------------------------------------------- runs
def run_load(uri: str, log: Path, n: int, tasks_per_job: int, epochs: int, work: Path, label: str,
             train_s: float = 0.0, shared: int = 0) -> dict[str, Any]:
    """n jobs at once. ``shared``: every job runs the same ``shared`` tasks (one stream launched n times: the
    claim path); else each job its own ``tasks_per_job`` tasks."""
    from mlflow import MlflowClient

    since = log.stat().st_size
    exp = f"load-{label}-{time.time_ns()}"
    tr = Tracker.setup(uri, exp)
    parent = tr.start("stream", {"ksm_kind": "sequence", "ksm_sequence": exp[-16:]})
    ctx = mp.get_context("fork")
    go = ctx.Event()
    procs = []
    for i in range(n):
        if shared:
            tasks = [(f"t{j:03d}", f"{exp}-r{j:03d}") for j in range(shared)]
            random.Random(i).shuffle(tasks)
        else:
            tasks = [(f"j{i:02d}t{j}", f"{exp}-{i}-{j}") for j in range(tasks_per_job)]
        p = ctx.Process(target=job, args=(uri, tr.experiment_id, parent, exp[-16:], tasks, epochs, train_s,
                                          str(work / f"{label}-{i}.json"), go, i))
        p.start()
        procs.append(p)
    time.sleep(1.0)  # every job forked and waiting
    t0 = time.perf_counter()
    go.set()
    for p in procs:
        p.join(600)
    wall = time.perf_counter() - t0
    tr.finish(parent)
    res = [json.loads((work / f"{label}-{i}.json").read_text()) if (work / f"{label}-{i}.json").exists()
           else {"task_s": [], "errors": ["job died"], "trained": 0, "reused": 0, "times": {}} for i in range(n)]
    retries = sum((work / f"{label}-{i}.json.log").read_text().count("unreachable") for i in range(n)
                  if (work / f"{label}-{i}.json.log").exists())
    times: dict[str, list[float]] = defaultdict(list)
    for r in res:
        for k, v in r["times"].items():
            times[k] += v
    task_s = [t for r in res for t in r["task_s"]]
    errors = [e for r in res for e in r["errors"]]
    # the store afterwards: one FINISHED run per task, nothing RUNNING
    runs = MlflowClient(uri).search_runs([tr.experiment_id], "tags.ksm_kind = 'task'", max_results=5000)
    per_key: dict[str, int] = defaultdict(int)
    for r in runs:
        if r.info.status == "FINISHED":
            per_key[r.data.tags["ksm_result"]] += 1
    expected = shared or n * tasks_per_job
    out = {
        "label": label, "n": n, "wall_s": wall, "tasks_trained": sum(r["trained"] for r in res),
        "tasks_reused": sum(r["reused"] for r in res), "errors": len(errors), "error_examples": errors[:3],
        "client_retries": retries, "server_errors": server_errors(log, since)[:5],
        "finished_runs": sum(per_key.values()), "expected_tasks": expected,
        "duplicate_finished": sum(c - 1 for c in per_key.values() if c > 1),
        "running_left": sum(r.info.status == "RUNNING" for r in runs),
        "task_p50_s": _q(task_s, 0.5), "task_p95_s": _q(task_s, 0.95),
        "calls": {k: {"count": len(v), "p50_ms": 1000 * _q(v, 0.5), "p95_ms": 1000 * _q(v, 0.95)}
                  for k, v in sorted(times.items())},
    }
    out["ok"] = (out["errors"] == 0 and out["finished_runs"] == expected and out["duplicate_finished"] == 0
                 and out["running_left"] == 0)
    return out


def _q(v: list[float], q: float) -> float:
    if not v:
        return float("nan")
    if len(v) == 1:
        return v[0]
    return statistics.quantiles(v, n=100, method="inclusive")[int(q * 100) - 1]


def load_line() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} on {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--n", default="8,32,64", help="concurrent jobs (comma-separated; 0: none)")
    ap.add_argument("--tasks", type=int, default=3, help="tasks per job")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pool", type=int, default=None, help="KSM_MLFLOW_POOL_SIZE (default: the script's)")
    ap.add_argument("--overflow", type=int, default=None, help="KSM_MLFLOW_MAX_OVERFLOW (default: the script's)")
    ap.add_argument("--claims", type=int, default=32, help="concurrent launches of one stream (0: skip)")
    ap.add_argument("--claim-tasks", type=int, default=12)
    ap.add_argument("--json", default=None, help="write every result here too")
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",") if int(x) > 0]
    results = []
    for store in args.stores.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"ksm-load-{store}-"))
        pg = None
        if store == "postgres":
            from pg_helpers import Postgres

            pg = Postgres.start(fast=False)
        server = None
        try:
            server, uri, log = start_server(store, work, args.workers, args.pool, args.overflow, pg)
            print(f"[load] {store}: server up ({args.workers} workers, pool {args.pool or 'script default'}"
                  f"+{args.overflow or 'script default'}); {load_line()}", flush=True)
            for n in ns:
                r = run_load(uri, log, n, args.tasks, args.epochs, work, f"{store}-{n}")
                r.update(store=store, workers=args.workers, load=load_line())
                results.append(r)
                print(json.dumps(r), flush=True)
            if args.claims:
                r = run_load(uri, log, args.claims, 0, args.epochs, work, f"{store}-claims{args.claims}",
                             train_s=0.3, shared=args.claim_tasks)
                r.update(store=store, workers=args.workers, load=load_line(), claims=True)
                results.append(r)
                print(json.dumps(r), flush=True)
        finally:
            if server is not None:
                server.stop()
            if pg is not None:
                pg.stop()
    print("\n| store | N | wall s | tasks | errors | dup FINISHED | RUNNING left | task p50 / p95 ms | "
          "create_run p95 | search_runs p95 | log_batch(final) p95 | log_artifact p95 | server errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["calls"]

        def p95(k: str) -> str:
            return f"{c[k]['p95_ms']:.0f}" if k in c else "-"

        kind = f"{r['n']} launches x {r['expected_tasks']} tasks" if r.get("claims") else str(r["n"])
        print(f"| {r['store']} | {kind} | {r['wall_s']:.1f} | {r['finished_runs']}/{r['expected_tasks']} | "
              f"{r['errors']} | {r['duplicate_finished']} | {r['running_left']} | "
              f"{1000 * r['task_p50_s']:.0f} / {1000 * r['task_p95_s']:.0f} | {p95('create_run')} | "
              f"{p95('search_runs')} | {p95('log_batch(final)')} | {p95('log_artifact')} | {len(r['server_errors'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
