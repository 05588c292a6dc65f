"""Issue #24: the tracking server on a real PostgreSQL 15 store (cluster/start_mlflow_server.sh with a postgresql://
backend URI), as a cluster runs it. One PostgreSQL (tests/pg_helpers.py: the postgres user, a temp folder,
127.0.0.1 and a free port, stopped by its postmaster's pid) and one server for the module.

- a real driver process (`python run_pipeline.py ... tracking=server`) trains a tiny stream through the server while
  the server is killed and started again on the same port and store: one FINISHED run per task, nothing RUNNING,
  the rows in PostgreSQL, its password in no log and no command line;
- concurrent launches of one stream's claim path (forked processes, the pipeline's own `claims.acquire` and
  `Tracker`): exactly one FINISHED run per task;
- a claim whose holder was killed (kill -9, its pid gone on this host) or whose heartbeat went stale (another host)
  is taken over: the dead run ends KILLED, the new holder's run is attempt 2.
The sqlite versions of these live in tests/test_faults.py, tests/test_streams.py and tests/test_follow.py.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pg_helpers import postgres_fixture
from test_cluster import CLUSTER_DIR, VENV_BIN, Proc, serve_on_a_free_port
from test_faults import driver_process, end_group, wait_until_a_task_trains

ROOT = Path(__file__).resolve().parents[1]
FM = {"name": "fashion_mnist"}
LINES = [
    {"name": "base", "source": FM, "classes": [0, 1, 2, 3], "caps": {"train": 400, "test": 100}},
    {"name": "shoes", "source": FM, "classes": ["Sandal", "Sneaker"], "caps": {"train": 120, "test": 40}},
    {"name": "tops", "source": FM, "classes": ["Shirt", "Bag"], "caps": {"train": 120, "test": 40}},
]

pytestmark = [pytest.mark.slow, pytest.mark.own_processes]

postgres = postgres_fixture("module")


class Server:
    """The module's `mlflow server` on the PostgreSQL store, from the start script; restartable on its port."""

    def __init__(self, pg, folder: Path):
        self.pg, self.folder, self.starts = pg, folder, 0
        self.proc, self.port = serve_on_a_free_port(self._start, "/health")
        self.uri = f"http://127.0.0.1:{self.port}"

    def _start(self, port: int) -> Proc:
        self.starts += 1
        env = {**os.environ, "KSM_MLFLOW_DIR": str(self.folder / "store"), "KSM_MLFLOW_PORT": str(port),
               "KSM_MLFLOW_BACKEND_STORE_URI": self.pg.uri, "MLFLOW": str(VENV_BIN / "mlflow")}
        env.pop("KSM_MLFLOW_HOST", None)
        return Proc(["bash", str(CLUSTER_DIR / "start_mlflow_server.sh")], self.folder / f"mlflow-{self.starts}.log",
                    env=env, cwd=self.folder)

    def stop(self) -> None:
        self.proc.stop()

    def start_again(self) -> None:
        self.proc = self._start(self.port)
        self.proc.wait_http(f"{self.uri}/health")

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.folder.glob("mlflow-*.log")))


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    s = Server(postgres, tmp_path_factory.mktemp("pg-server"))
    try:
        yield s
    finally:
        s.stop()
    assert postgres.password not in s.logs()  # the store's password is in no line the server printed


def _tracker(uri: str, experiment: str):
    from pipeline.tracking import Tracker

    return Tracker.setup(uri, experiment)


def _rows(pg, sql: str, *args) -> list[tuple]:
    import psycopg

    with psycopg.connect(pg.uri) as con:
        return con.execute(sql, args).fetchall()


# ------------------------------------------------------------------------------------------ a real driver process
def test_a_stream_on_postgres_survives_a_server_restart_mid_run(server, postgres, tmp_path):
    """The tiny stream through `mlflow server` on PostgreSQL, the server killed while a task trains and started
    again 5 s later on the same port and store: the driver and its jobs wait it out (tracking.outage_s) and the
    stream ends with exactly one FINISHED run per task and nothing RUNNING, in PostgreSQL's own tables."""
    from mlflow import MlflowClient

    uri = server.uri
    cat = tmp_path / "tasks.jsonl"
    cat.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    log = tmp_path / "driver.log"
    argv = [sys.executable, str(ROOT / "run_pipeline.py"), f"paths.root={tmp_path}", "benchmark=catalogue",
            f"benchmark.path={cat}", "tracking=server", f"tracking.uri={uri}", "tracking.outage_s=90",
            "model.width=0.0625", "progress=false", "cluster.num_cpus=1", "train.backbone.epochs=1",
            "train.epochs=4", "run_name=pg-stream"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    driver = driver_process(argv, log, env)
    try:
        client = MlflowClient(uri)
        wait_until_a_task_trains(client, driver, log, poll_s=0.3)  # the server goes while a task trains
        for p in _server_pids(server):  # the password travels in the environment, never on a command line
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            assert postgres.password.encode() not in cmd and b"postgresql://" not in cmd
        server.stop()
        time.sleep(5)
        server.start_again()
        code = driver.wait(timeout=600)
        out = log.read_text()
        assert code == 0, out[-3000:]
        assert f"[tracking] {uri} unreachable" in out  # somebody did wait it out
        assert postgres.password not in out
    finally:
        end_group(driver)  # the driver's group, Ray's agents included, by its own id
    exp = client.get_experiment_by_name("ksm")
    runs = client.search_runs([exp.experiment_id], "", max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = sorted((r.data.tags["ksm_kind"], r.data.tags.get("ksm_task")) for r in runs
                      if r.info.status == "FINISHED" and r.data.tags.get("ksm_kind") in ("task", "backbone"))
    assert finished == [("backbone", "base"), ("task", "shoes"), ("task", "tops")]
    # the runs are PostgreSQL's rows, artifacts behind the server's proxy
    rows = _rows(postgres, "SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                           "WHERE t.key = 'ksm_task' AND r.status = 'FINISHED' ORDER BY t.value")
    assert [v for v, _ in rows] == ["base", "shoes", "tops"]
    task = next(r for r in runs if r.data.tags.get("ksm_task") == "shoes" and r.info.status == "FINISHED")
    assert task.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert task.data.metrics["test_acc"] > 0 and len(task.inputs.dataset_inputs) == 2


def _server_pids(server: Server) -> list[int]:
    """The server's processes (its process group: mlflow and its uvicorn workers), by /proc."""
    pgid = server.proc.p.pid
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    out.append(int(d))
            except ProcessLookupError:
                pass
    return out


# ------------------------------------------------------------------------------------------ the claim path at once
def _launch(uri: str, exp_id: str, parent: str, tasks: list[tuple[str, str]], out: str, go, seed: int) -> None:
    """One launch of the stream, forked: each task through the pipeline's claim, then its run closed as a task job
    closes it (the final log, FINISHED); a task found FINISHED is reused."""
    from mlflow.utils import request_utils

    from pipeline.claims import acquire
    from pipeline.tracking import Tracker

    request_utils._cached_get_request_session.cache_clear()  # no HTTP connection shared with pytest
    tr = Tracker(uri, exp_id)
    done = {"trained": [], "reused": [], "errors": []}
    go.wait()
    for task, result in tasks:
        try:
            claim = acquire(tr, {"ksm_kind": "task", "ksm_result": result}, task, {"ksm_task": task},
                            parent=parent, stale_s=60, poll_s=0.2)
            if claim.done is not None:
                done["reused"].append(task)
                continue
            time.sleep(random.Random(seed).uniform(0.1, 0.4))  # "training"
            tr.log(claim.run_id, params={"task": task}, metrics={"test_acc": 0.9}, tags={"ksm_device": "cpu"})
            tr.finish(claim.run_id)
            done["trained"].append(task)
        except Exception as e:  # noqa: BLE001
            done["errors"].append(f"{type(e).__name__}: {e}")
    Path(out).write_text(json.dumps(done))


def test_concurrent_launches_of_one_stream_train_each_task_once(server, tmp_path):
    """6 launches of one 5-task stream at the same moment, each task in its own order: every task ends with exactly
    one FINISHED run, nothing is left RUNNING, every launch got every result, and no call failed."""
    tr = _tracker(server.uri, "pg-claims")
    parent = tr.start("stream", {"ksm_kind": "sequence"})
    tasks = [(f"t{i}", f"claims-r{i}") for i in range(5)]
    ctx, launches = mp.get_context("fork"), 6
    go = ctx.Event()
    procs = []
    for i in range(launches):
        order = tasks[:]
        random.Random(i).shuffle(order)
        procs.append(ctx.Process(target=_launch, args=(server.uri, tr.experiment_id, parent, order,
                                                       str(tmp_path / f"{i}.json"), go, i)))
    try:
        for p in procs:
            p.start()
        go.set()
        for p in procs:
            p.join(240)
    finally:
        for p in procs:  # never one left behind, whatever happened
            if p.is_alive():
                p.kill()
                p.join()
    outs = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(launches)]
    assert not [e for o in outs for e in o["errors"]]
    assert all(sorted(o["trained"] + o["reused"]) == sorted(t for t, _ in tasks) for o in outs)
    assert sum(len(o["trained"]) for o in outs) == len(tasks)
    runs = tr.client.search_runs([tr.experiment_id], "tags.ksm_kind = 'task'", max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert Counter(r.data.tags["ksm_result"] for r in runs if r.info.status == "FINISHED") == {
        r: 1 for _, r in tasks}


def _hold_then_hang(uri: str, exp_id: str, ready) -> None:
    from mlflow.utils import request_utils

    from pipeline.claims import acquire
    from pipeline.tracking import Tracker

    request_utils._cached_get_request_session.cache_clear()
    claim = acquire(Tracker(uri, exp_id), {"ksm_kind": "task", "ksm_result": "takeover-r"}, "t", {"ksm_task": "t"})
    ready.put(claim.run_id)
    time.sleep(600)  # killed before this ends


def test_a_dead_holders_claim_is_taken_over(server):
    """A holder killed with -9 mid-task (its pid gone on this host) and one on another host whose heartbeat went
    stale: the next claimant closes each dead run KILLED (tag ksm_claim=expired) and holds the work as attempt 2."""
    from pipeline.claims import HEARTBEAT_TAG, acquire

    tr = _tracker(server.uri, "pg-takeover")
    ctx = mp.get_context("fork")
    ready = ctx.Queue()
    holder = ctx.Process(target=_hold_then_hang, args=(server.uri, tr.experiment_id, ready))
    holder.start()
    try:
        dead_id = ready.get(timeout=120)
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.join(30)
        if holder.is_alive():
            holder.kill()
            holder.join()
    claim = acquire(tr, {"ksm_kind": "task", "ksm_result": "takeover-r"}, "t", {"ksm_task": "t"}, stale_s=60)
    assert claim.run_id and claim.run_id != dead_id
    dead = tr.client.get_run(dead_id)
    assert dead.info.status == "KILLED" and dead.data.tags["ksm_claim"] == "expired"
    assert tr.client.get_run(claim.run_id).data.tags["ksm_attempt"] == "2"
    tr.finish(claim.run_id)

    # another host's holder whose heartbeat stopped 2 minutes ago (its node lost): taken over once stale
    keys = {"ksm_kind": "task", "ksm_result": "takeover-stale"}
    lost = tr.create("t2", {**keys, HEARTBEAT_TAG: f"{time.time() - 120:.3f}", "ksm_claim_host": "lost-node",
                            "ksm_claim_pid": "1"}).info.run_id
    claim = acquire(tr, keys, "t2", {"ksm_task": "t2"}, stale_s=60)
    assert claim.run_id != lost and tr.client.get_run(lost).info.status == "KILLED"
    assert tr.client.get_run(claim.run_id).data.tags["ksm_attempt"] == "2"
    tr.finish(claim.run_id)


def test_a_streams_resume_scan_reads_its_own_runs_and_finds_other_streams_results(server):
    """trained_runs with the stream's key (what the driver, follow, evaluate and export pass): the stream's own
    FINISHED task runs, then the results another stream trained on the same backbone (one by one when few, else by
    the backbone's fingerprint). Same answer as the scan of every FINISHED task run, which it no longer makes."""
    from pipeline.lineage import trained_runs

    tr = _tracker(server.uri, "pg-resume")

    def task_run(stream: str, i: int, fp: str, status: str = "FINISHED") -> None:
        run_id = tr.start(f"t{i}", {"ksm_kind": "task", "ksm_result": f"{fp}-r{i}", "ksm_task": f"t{i}",
                                    "ksm_sequence": stream})
        tr.log(run_id, params={"backbone_fingerprint": fp})
        tr.finish(run_id, status)

    for i in range(10):
        task_run("mine", i, "fp1", "FINISHED" if i % 5 else "KILLED")
    for i in range(10, 35):
        task_run("other", i, "fp1")  # another stream, same backbone: its results are ours to reuse
    for i in range(35, 38):
        task_run("third", i, "fp2")  # another backbone
    for wanted in ({f"t{i}": f"fp1-r{i}" for i in range(22)},   # 12 from the other stream: one by one
                   {f"t{i}": f"fp1-r{i}" for i in range(38)}):  # 25 of them: by fingerprint (t35-37: none)
        scoped = trained_runs(tr, wanted, stream="mine", backbone_fingerprint="fp1")
        everything = trained_runs(tr, wanted)
        assert {t: r.info.run_id for t, r in scoped.items()} == {t: r.info.run_id for t, r in everything.items()}
        assert sorted(scoped) == sorted(t for t in wanted if 10 <= int(t[1:]) < 35 or int(t[1:]) < 10 and int(t[1:]) % 5)
