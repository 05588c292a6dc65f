"""Faults injected for real into a running sequence: the tracking server killed mid-run and started again on the same
port and store. Real `mlflow server` (cluster/start_mlflow_server.sh), real driver process, real Fashion-MNIST."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from ksm_core.packnet import PackNet
from test_cluster import CLUSTER_DIR, VENV_BIN, Proc, serve_on_a_free_port

ROOT = Path(__file__).resolve().parents[1]
FM = {"name": "fashion_mnist"}
LINES = [
    {"name": "base", "source": FM, "classes": [0, 1, 2, 3], "caps": {"train": 400, "test": 100}},
    {"name": "shoes", "source": FM, "classes": ["Sandal", "Sneaker"], "caps": {"train": 120, "test": 40}},
    {"name": "tops", "source": FM, "classes": ["Shirt", "Bag"], "caps": {"train": 120, "test": 40}},
]


def mlflow_server(store: Path, log: Path, port: int) -> Proc:
    env = {**os.environ, "KSM_MLFLOW_DIR": str(store), "KSM_MLFLOW_PORT": str(port), "KSM_MLFLOW_WORKERS": "1",
           "MLFLOW": str(VENV_BIN / "mlflow")}
    env.pop("KSM_MLFLOW_HOST", None)
    return Proc(["bash", str(CLUSTER_DIR / "start_mlflow_server.sh")], log, env=env, cwd=store.parent)


def driver_process(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A `run_pipeline.py` driver in a session (and process group) of its own: its embedded Ray's processes
    (GCS, raylet, workers, agents) are in that group too, so :func:`end_group` ends them with it."""
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def end_group(driver: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the driver's process group (the driver on a timeout or a failed assertion,
    Ray's agents after a normal exit), by the group's own id, and reap the driver."""
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is empty: nothing left
        pass
    driver.wait()


def wait_until_a_task_trains(client: MlflowClient, driver: subprocess.Popen, log: Path, poll_s: float = 0.5) -> None:
    """Return once a task job is training (its run RUNNING): the moment to inject a fault. Fails with the driver's
    log if the driver exits first or nothing trains within 300 s."""
    deadline = time.monotonic() + 300
    while True:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        exp = client.get_experiment_by_name("ksm")
        if exp and client.search_runs([exp.experiment_id], "tags.ksm_kind = 'task' and attributes.status = 'RUNNING'"):
            return
        time.sleep(poll_s)


@pytest.mark.slow
@pytest.mark.own_processes
def test_a_tracking_server_restarted_mid_run_costs_a_pause_not_the_run(tmp_path):
    """The server is killed while a task trains and comes back 8 s later: the jobs and the driver wait it out
    (tracking.outage_s) and the sequence finishes with exactly one FINISHED run per task and nothing RUNNING."""
    store = tmp_path / "server-store"
    server, port = serve_on_a_free_port(lambda p: mlflow_server(store, tmp_path / "mlflow-1.log", p), "/health")
    uri = f"http://127.0.0.1:{port}"
    cat = tmp_path / "tasks.jsonl"
    cat.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    log = tmp_path / "driver.log"
    argv = [sys.executable, str(ROOT / "run_pipeline.py"), f"paths.root={tmp_path}", "benchmark=catalogue",
            f"benchmark.path={cat}", "tracking=server", f"tracking.uri={uri}", "tracking.outage_s=90",
            "model.width=0.0625", "progress=false", "cluster.num_cpus=1", "train.backbone.epochs=1",
            "registry.export=false", "train.epochs=15"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    driver = driver_process(argv, log, env)
    try:
        client = MlflowClient(uri)
        wait_until_a_task_trains(client, driver, log)  # the server goes while a task trains
        down = time.monotonic()
        server.stop()
        time.sleep(8)
        server = mlflow_server(store, tmp_path / "mlflow-2.log", port)  # same port, same store
        server.wait_http(f"{uri}/health")
        code = driver.wait(timeout=600)
        print(f"[fault] tracking server down 8 s mid-run: the run ended {time.monotonic() - down:.1f}s after the stop")
        out = log.read_text()
        assert code == 0, out[-3000:]
        assert f"[tracking] {uri} unreachable" in out  # somebody did wait it out
        exp = client.get_experiment_by_name("ksm")
        runs = client.search_runs([exp.experiment_id], "", max_results=1000)
        assert not [r for r in runs if r.info.status == "RUNNING"]
        finished = sorted((r.data.tags["ksm_kind"], r.data.tags.get("ksm_task")) for r in runs
                          if r.info.status == "FINISHED" and r.data.tags.get("ksm_kind") in ("task", "backbone"))
        assert finished == [("backbone", "base"), ("task", "shoes"), ("task", "tops")]
    finally:
        end_group(driver)
        server.stop()


@pytest.mark.slow
def test_a_worker_node_lost_mid_run_the_sequence_finishes_on_the_head(tmp_path, monkeypatch):
    """Two Ray nodes on loopback; the worker node is removed (its raylet and workers killed) while a task trains
    there. Ray retries the job on the head (cluster.max_retries), the dead attempt's run is closed KILLED by the
    claim, and every task ends with exactly one FINISHED run."""
    import threading

    import ray
    from hydra import compose, initialize_config_dir
    from ray.cluster_utils import Cluster

    import run_pipeline

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    small = {"object_store_memory": 80 * 1024**2, "include_dashboard": False, "dashboard_agent_listen_port": 0}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **small})
    worker = cluster.add_node(num_cpus=1, **small)
    cluster.wait_for_nodes()
    cat = tmp_path / "tasks.jsonl"
    cat.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    db = tmp_path / "mlflow.db"
    removed: list[str] = []

    def remove_the_worker_once_a_task_trains_there() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                c = MlflowClient(f"sqlite:///{db}")
                exp = c.get_experiment_by_name("ksm") if db.exists() else None
                running = c.search_runs([exp.experiment_id], "tags.ksm_kind = 'task' and attributes.status = 'RUNNING'"
                                        ) if exp else []
            except Exception:  # the store is being created
                running = []
            if any(r.data.tags.get("ksm_node_id") == worker.node_id for r in running):
                time.sleep(1)
                cluster.remove_node(worker)
                removed.append(worker.node_id)
                return
            time.sleep(0.3)

    watcher = threading.Thread(target=remove_the_worker_once_a_task_trains_there, daemon=True)
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("config", overrides=[
                "cluster=remote", f"cluster.address={cluster.address}", "cluster.cpus_per_task=1",
                "cluster.gpus_per_task=0", "tracking=local", f"paths.root={tmp_path}", "benchmark=catalogue",
                f"benchmark.path={cat}", "model.width=0.0625", "progress=false", "train.backbone.epochs=1",
                "train.epochs=25", "registry.export=false"])
        watcher.start()
        t0 = time.monotonic()
        out = run_pipeline.main_from_config(cfg)
        print(f"[fault] worker node removed mid-task: the sequence took {time.monotonic() - t0:.1f}s")
        watcher.join(timeout=5)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    assert removed == [worker.node_id], "no task ran on the worker node before the run ended"
    assert {r.task: r.status for r in out["results"]} == {"shoes": "trained", "tops": "trained"}
    c = MlflowClient(f"sqlite:///{db}")
    runs = c.search_runs([c.get_experiment_by_name("ksm").experiment_id], "tags.ksm_kind = 'task'")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = sorted(r.data.tags["ksm_task"] for r in runs if r.info.status == "FINISHED")
    assert finished == ["shoes", "tops"]
    lost = [r for r in runs if r.info.status == "KILLED"]
    assert lost and all(r.data.tags["ksm_node_id"] == worker.node_id for r in lost)  # the attempt on the lost node


def outage_setup(tmp_path: Path, *overrides: str) -> tuple[Proc, str, list[str], dict[str, str]]:
    """A real `mlflow server` on 127.0.0.1 and the driver's command for a one-new-task catalogue stream on it,
    waiting out an outage for 3 s only: (server, uri, argv, env)."""
    store = tmp_path / "server-store"
    server, port = serve_on_a_free_port(lambda p: mlflow_server(store, tmp_path / "mlflow-1.log", p), "/health")
    uri = f"http://127.0.0.1:{port}"
    cat = tmp_path / "tasks.jsonl"
    cat.write_text("".join(json.dumps(x) + "\n" for x in LINES[:2]))
    argv = [sys.executable, str(ROOT / "run_pipeline.py"), f"paths.root={tmp_path}", "benchmark=catalogue",
            f"benchmark.path={cat}", "tracking=server", f"tracking.uri={uri}", "tracking.outage_s=3",
            "model.width=0.0625", "progress=false", "cluster.num_cpus=1", "train.backbone.epochs=1",
            "registry.export=false", *overrides]
    # each request fails at once (no urllib3 retries inside it): the outage is then the 3 s the pipeline waits
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    return server, uri, argv, env


def first_epoch_logged(client: MlflowClient, driver: subprocess.Popen, log: Path, where: str = "") -> Any:
    """The first RUNNING task run (``where``: more of the filter) with an epoch's metrics: its job is training,
    past what it downloads first. Fails with the driver's log if the driver exits or nothing comes in 300 s."""
    deadline = time.monotonic() + 300
    while True:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        exp = client.get_experiment_by_name("ksm")
        running = client.search_runs([exp.experiment_id], f"tags.ksm_kind = 'task' {where} and attributes.status = "
                                     "'RUNNING'") if exp else []
        if running and running[0].data.metrics:
            return running[0]
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.own_processes
def test_a_tracking_server_down_past_outage_s_loses_no_training(tmp_path):
    """The server is killed while a task trains and stays down past tracking.outage_s (3 s). The job finishes
    training anyway, keeps the trained task (artifact + run.json) under paths.output/unlogged/ and fails naming
    the URI and that folder; the driver exits 2. With the server back, the same command logs the kept task
    without training it (tag ksm_recovered_from, the kept accuracy): one FINISHED run for the task, nothing
    RUNNING, the folder gone. (One new task: a second would only train again, as in the restart test above.)"""
    store = tmp_path / "server-store"
    server, uri, argv, env = outage_setup(tmp_path, "train.epochs=30")
    port = int(uri.rsplit(":", 1)[1])
    log = tmp_path / "driver-1.log"
    driver = driver_process(argv, log, env)
    try:
        client = MlflowClient(uri)
        victim = first_epoch_logged(client, driver, log)  # a task job past its first epoch when the server goes
        task = victim.data.tags["ksm_task"]
        down = time.monotonic()
        server.stop()
        assert driver.wait(timeout=600) == 2, log.read_text()[-3000:]
        print(f"[fault] tracking server down past outage_s=3: the driver exited 2 after {time.monotonic() - down:.1f}s")
        out1 = log.read_text()
        kept = tmp_path / "outputs" / "unlogged" / f"{task}-{victim.data.tags['ksm_result']}"
        assert f"[fan-out] {task} FAILED: TrackingUnreachable: task {task} finished training" in out1, out1[-3000:]
        assert uri in out1 and f"kept at {kept}" in out1
        assert sorted(p.name for p in kept.iterdir()) == ["run.json", f"{task}.safetensors"]
        record = json.loads((kept / "run.json").read_text())
        assert record["run_id"] == victim.info.run_id and len(record["epochs"]) > 1  # the epochs it missed, kept

        server = mlflow_server(store, tmp_path / "mlflow-2.log", port)  # back: same port, same store
        server.wait_http(f"{uri}/health")
        t0 = time.monotonic()
        log2 = tmp_path / "driver-2.log"
        end_group(driver)  # the first driver's group: gone before the second starts
        driver = driver_process(argv, log2, env)  # the finally below ends its group on a timeout too
        assert driver.wait(timeout=600) == 0, log2.read_text()[-3000:]
        again = log2.read_text()
        print(f"[fault] the same command with the server back: {time.monotonic() - t0:.1f}s ({task} logged from "
              "its kept record, not trained)")
        row = next(line for line in again.splitlines() if line.startswith(f"{task} "))
        assert row.split()[-1] == "recovered", again[-3000:]
        assert not kept.exists()
        exp = client.get_experiment_by_name("ksm")
        runs = client.search_runs([exp.experiment_id], "tags.ksm_kind = 'task'", max_results=1000)
        assert not [r for r in runs if r.info.status == "RUNNING"]
        finished = {r.data.tags["ksm_task"]: r for r in runs if r.info.status == "FINISHED"}
        assert sorted(finished) == ["shoes"] and len([r for r in runs if r.info.status == "FINISHED"]) == 1
        got = finished[task]
        assert got.data.tags["ksm_recovered_from"] == victim.info.run_id
        assert got.data.metrics["test_acc"] == record["metrics"]["test_acc"]
        assert got.data.metrics["train_seconds"] == record["metrics"]["train_seconds"]  # not trained again
        assert client.list_artifacts(got.info.run_id, "task")[0].path == f"task/{task}.safetensors"
        inputs = client.get_run(got.info.run_id).inputs.dataset_inputs
        assert {d.dataset.name for d in inputs} == {task}  # its datasets, as a trained run has them
        assert client.get_run(victim.info.run_id).info.status == "KILLED"  # closed by the rerun's claim
    finally:
        end_group(driver)
        server.stop()


@pytest.mark.slow
@pytest.mark.own_processes
def test_a_chain_link_trained_while_the_server_is_down_is_logged_by_the_rerun_not_trained_again(tmp_path):
    """method=packnet: the server is killed while the chain's second link (``shoes``) trains and stays down past
    tracking.outage_s. The link's job finishes training, keeps its chain file and whole record under
    paths.output/unlogged/ and fails naming that folder; the driver exits 2. With the server back, the same command
    reuses link 0 and logs the kept link without training it (tag ksm_recovered_from, the kept accuracy and seconds,
    the kept chain file bit for bit as the run's artifact, on the chain its tags name)."""
    store = tmp_path / "server-store"
    # link 0 retrains 1 epoch (it only has to exist); link 1 trains 40 + 1: long enough to lose the server in
    server, uri, argv, env = outage_setup(tmp_path, "method=packnet", "method.retrain_epochs=1", "train.epochs=40")
    port = int(uri.rsplit(":", 1)[1])
    log = tmp_path / "driver-1.log"
    driver = driver_process(argv, log, env)
    try:
        client = MlflowClient(uri)
        # link 1 training (its first epoch logged: the chain before it is downloaded) when the server goes
        victim = first_epoch_logged(client, driver, log, "and tags.ksm_chain_link = '1'")
        server.stop()
        assert driver.wait(timeout=600) == 2, log.read_text()[-3000:]
        out1 = log.read_text()
        kept = tmp_path / "outputs" / "unlogged" / (f"shoes-{victim.data.tags['ksm_result']}-"
                                                    f"{victim.data.tags['ksm_chain_parent'][:16]}")
        assert "[chain] shoes failed: task shoes (link 1 of the chain) finished training" in out1, out1[-3000:]
        assert f"kept at {kept}" in out1
        assert sorted(p.name for p in kept.iterdir()) == ["chain.safetensors", "run.json"]
        record = json.loads((kept / "run.json").read_text())
        assert record["run_id"] == victim.info.run_id and record["epochs"]  # the epochs the server missed, kept

        server = mlflow_server(store, tmp_path / "mlflow-2.log", port)  # back: same port, same store
        server.wait_http(f"{uri}/health")
        end_group(driver)
        log2 = tmp_path / "driver-2.log"
        driver = driver_process(argv, log2, env)
        assert driver.wait(timeout=600) == 0, log2.read_text()[-3000:]
        again = log2.read_text()
        rows = {line.split()[0]: line.split()[-1] for line in again.splitlines() if line.startswith(("base ", "shoes "))}
        assert rows == {"base": "reused", "shoes": "recovered"}, again[-3000:]
        assert not kept.exists()
        exp = client.get_experiment_by_name("ksm")
        runs = client.search_runs([exp.experiment_id], "tags.ksm_kind = 'task'", max_results=1000)
        assert not [r for r in runs if r.info.status == "RUNNING"]
        finished = [r for r in runs if r.info.status == "FINISHED"]
        assert sorted(r.data.tags["ksm_task"] for r in finished) == ["base", "shoes"]
        got = next(r for r in finished if r.data.tags["ksm_task"] == "shoes")
        assert got.data.tags["ksm_recovered_from"] == victim.info.run_id
        assert got.data.tags["ksm_chain_fingerprint"] == record["tags"]["ksm_chain_fingerprint"]
        assert got.data.metrics["train_seconds"] == record["metrics"]["train_seconds"]  # not trained again
        assert client.list_artifacts(got.info.run_id, "chain")[0].path == "chain/chain.safetensors"
        assert client.get_run(victim.info.run_id).info.status == "KILLED"  # closed by the rerun's claim
        # the logged file is the kept one, bit for bit, and rebuilds the chain the run is tagged with
        path = client.download_artifacts(got.info.run_id, "chain/chain.safetensors", str(tmp_path / "dl"))
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == record["sha256"]
        assert PackNet.read_chain_metadata(path)["fingerprint"] == got.data.tags["ksm_chain_fingerprint"]
    finally:
        end_group(driver)
        server.stop()
