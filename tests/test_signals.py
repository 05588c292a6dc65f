"""The README's "Stopping" promises, on real Ray, MLflow and processes: at most `cluster.max_in_flight` jobs in Ray
at once; on Ctrl-C (SIGINT) or SIGTERM the in-flight jobs get `cluster.stop_grace_s` to finish and the process
exits 128 + the signal; a second signal skips the wait; no run is left RUNNING.

The drivers are real `run_pipeline.py` processes, each leading a session of its own (its embedded Ray's processes
in its group, ended with it); the signal goes to the driver's pid, as Ctrl-C's SIGINT or `ray job stop`'s SIGTERM
would. Nothing here waits on a clock: a driver is signalled once the store shows a task mid-training (its run
RUNNING with an epoch's metrics), and the order of events is read back from the runs' own times."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_faults import end_group  # the driver's whole process group, by its id

ROOT = Path(__file__).resolve().parents[1]
FM = {"name": "fashion_mnist"}
LINES = [
    {"name": "base", "source": FM, "classes": [0, 1, 2, 3], "caps": {"train": 400, "test": 100}},
    {"name": "shoes", "source": FM, "classes": ["Sandal", "Sneaker"], "caps": {"train": 120, "test": 40}},
    {"name": "boots", "source": FM, "classes": ["Ankle boot", "Trouser"], "caps": {"train": 120, "test": 40}},
]
# one CPU and one job in Ray at a time: `shoes` is the one in flight when the signal comes, `boots` never starts
DRIVER = ["model.width=0.0625", "progress=false", "cluster.num_cpus=1", "cluster.max_in_flight=1",
          "train.backbone.epochs=1", "registry.export=false", "benchmark=catalogue"]
WAIT_S = 300  # bound on every wait for a driver (two CPUs shared with other work)


# --------------------------------------------------------------------------------------- max_in_flight, in-process
@pytest.mark.slow
@pytest.mark.mutates_tiny_sequence
def test_at_most_max_in_flight_jobs_are_handed_to_ray_at_once(tiny_sequence):
    """cluster.max_in_flight=1 on the session's runtime, which has 2 CPUs (two job slots, workers warm): had the
    driver handed Ray both task jobs, both would have run at once. The task runs, created by each job as it starts
    (its claim) and closed by it as it ends, do not overlap: the second job reached Ray after the first ended."""
    import ray
    from hydra import compose, initialize_config_dir

    import run_pipeline
    from conftest import TINY

    assert ray.cluster_resources().get("CPU") == 2  # two slots: only the limit can keep the jobs apart
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"paths.root={tiny_sequence.root}", "registry.export=false",
                                           "run_name=in-flight-test", "train.lr_head=1.2e-3",  # new results: trains
                                           "cluster.max_in_flight=1"])
    out = run_pipeline.main_from_config(cfg)
    assert sorted((r.task, r.status) for r in out["results"]) == [("t1", "trained"), ("t2", "trained")]
    c = tiny_sequence.client
    exp = c.get_experiment_by_name("ksm")
    runs = sorted(c.search_runs([exp.experiment_id], f"tags.ksm_kind = 'task' and tags.ksm_sequence = "
                                                     f"'{out['sequence_key']}'"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    first, second = runs
    assert second.info.start_time >= first.info.end_time, (
        f"two jobs ran at once under cluster.max_in_flight=1: {first.data.tags['ksm_task']} "
        f"[{first.info.start_time}, {first.info.end_time}], {second.data.tags['ksm_task']} from {second.info.start_time}")


# ------------------------------------------------------------------------------------------ signals, end to end
def launch(root: Path, cat: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = root / f"driver-{time.time_ns()}.log"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), f"paths.root={root}", *DRIVER,
                                 f"benchmark.path={cat}", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def runs(root: Path) -> list:
    if not (root / "mlflow.db").exists():
        return []
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")  # None while the driver is still creating it
    return c.search_runs([exp.experiment_id], "", max_results=1000) if exp else []


def task_runs(root: Path, task: str) -> list:
    return [r for r in runs(root) if r.data.tags.get("ksm_kind") == "task" and r.data.tags.get("ksm_task") == task]


def wait_until(proc: subprocess.Popen, log: Path, what: str, ready) -> object:
    deadline = time.monotonic() + WAIT_S
    while not (got := ready()):
        assert proc.poll() is None, f"driver exited {proc.returncode} before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    return got


def mid_training(root: Path, task: str):
    """The task's RUNNING run once it has logged an epoch (so its job is past start-up and training), else None."""
    return next((r for r in task_runs(root, task) if r.info.status == "RUNNING" and "train_loss" in r.data.metrics),
                None)


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> tuple[Path, Path]:
    """One root for the module's drivers: the second reuses the first's shards and backbone (its tasks' results
    differ, so they train)."""
    root = tmp_path_factory.mktemp("signals")
    cat = root / "tasks.jsonl"
    cat.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    return root, cat


@pytest.mark.slow
@pytest.mark.own_processes
def test_ctrl_c_lets_the_in_flight_job_finish_within_the_grace_period_and_exits_130(stream):
    """SIGINT while `shoes` trains (40 epochs, its first logged), with a grace period far longer than the job:
    `shoes` goes on and ends FINISHED after the signal, `boots` never starts, the parent run ends KILLED and the
    process exits 130 (128 + SIGINT), saying how to resume."""
    root, cat = stream
    proc, log = launch(root, cat, "train.epochs=40", "cluster.stop_grace_s=600")
    try:
        wait_until(proc, log, "shoes mid-training", lambda: mid_training(root, "shoes"))
        signalled_ms = time.time() * 1000
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=WAIT_S)
    finally:
        end_group(proc)
    out = log.read_text()
    assert code == 128 + signal.SIGINT == 130, out[-3000:]
    assert "[stop] waiting up to 600s for 1 in-flight job(s)" in out, out[-3000:]
    assert ("stopped by SIGINT: 1 of 2 task(s) have their result (1 trained by this run), 0 failed, 0 in-flight "
            "killed (their runs are KILLED), 1 not started. Run the same command again to resume") in out, out[-3000:]
    [shoes] = task_runs(root, "shoes")
    assert shoes.info.status == "FINISHED" and "ksm_stopped" not in shoes.data.tags
    assert shoes.info.end_time > signalled_ms  # it was still training when the signal came, and finished after
    assert task_runs(root, "boots") == []  # no new job after the signal
    all_runs = runs(root)
    assert not [r for r in all_runs if r.info.status == "RUNNING"]
    assert [r.info.status for r in all_runs if r.data.tags.get("ksm_kind") == "sequence"] == ["KILLED"]


@pytest.mark.slow
@pytest.mark.own_processes
def test_a_second_signal_during_the_grace_period_stops_at_once_and_leaves_no_run_running(stream):
    """SIGTERM while `shoes` trains a long schedule (1000 epochs: it cannot finish within this test), with a grace
    period of 600 s; once the driver says it is waiting for the in-flight job, a second signal (Ctrl-C): the
    wait is skipped, the job killed and its run closed KILLED (tag ksm_stopped=signal), and the process exits 143
    (128 + the first signal, SIGTERM)."""
    root, cat = stream
    proc, log = launch(root, cat, "train.epochs=1000", "cluster.stop_grace_s=600")
    try:
        running = wait_until(proc, log, "shoes mid-training", lambda: mid_training(root, "shoes"))
        proc.send_signal(signal.SIGTERM)
        wait_until(proc, log, "the grace period's wait", lambda: "[stop] waiting up to 600s" in log.read_text())
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)  # far less than the 600 s grace period
    finally:
        end_group(proc)
    out = log.read_text()
    assert code == 128 + signal.SIGTERM == 143, out[-3000:]
    assert "stopped by SIGTERM:" in out and "1 in-flight killed (their runs are KILLED)" in out, out[-3000:]
    cut = [r for r in task_runs(root, "shoes") if r.info.run_id == running.info.run_id]
    assert [(r.info.status, r.data.tags.get("ksm_stopped")) for r in cut] == [("KILLED", "signal")]
    all_runs = runs(root)
    assert not [r for r in all_runs if r.info.status == "RUNNING"], [
        (r.data.tags.get("ksm_kind"), r.data.tags.get("ksm_task"), r.info.status) for r in all_runs]
    parents = [r for r in all_runs if r.data.tags.get("ksm_kind") == "sequence" and r.info.status == "KILLED"]
    assert parents  # the stream's parent run, closed KILLED by this driver too
