"""Claims taken over (pipeline/claims.py), directly against a real sqlite MLflow store: a RUNNING run whose holder
stopped sending heartbeats for longer than `cluster.claim_timeout_s`, or whose process is gone on this host, is
closed KILLED (tag ksm_claim=expired) and the work goes to the caller as attempt 2. A live holder is waited for,
never taken over: each take-over below has its control case (same run, one fact changed), so the test fails if
the claim took every rival over, or none.

The rival's run is made by hand with the tags a holder writes (heartbeat, host, pid), its heartbeat dated in the
past: no clock is waited on. A pid that is gone is a real child process of this test, started and reaped."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.claims import HEARTBEAT_TAG, acquire
from pipeline.tracking import Tracker

# the store and the child process are this test's own; Ray is never started here
pytestmark = [pytest.mark.slow, pytest.mark.own_processes]

TIMEOUT_S = 60.0  # cluster.claim_timeout_s's default, as the task job passes it (stale_s=rc.cluster.claim_timeout_s)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Tracker:
    """One store for the module (creating one runs MLflow's migrations: seconds); each test its own result key."""
    return Tracker.setup(f"sqlite:///{tmp_path_factory.mktemp('claims') / 'mlflow.db'}", "ksm")


@pytest.fixture
def work(store, request) -> tuple[Tracker, dict[str, str]]:
    """The store, and the keys of this test's own piece of work."""
    return store, {"ksm_kind": "task", "ksm_result": f"r-{request.node.name}"}


def rival(work: tuple[Tracker, dict[str, str]], *, beat_age_s: float, pid: int, host: str | None = None) -> str:
    """A RUNNING claim as a holder leaves it: its heartbeat ``beat_age_s`` old, its process ``pid`` on ``host``."""
    tr, keys = work
    run = tr.create("t1", {**keys, HEARTBEAT_TAG: f"{time.time() - beat_age_s:.3f}", "ksm_attempt": "1",
                           "ksm_claim_host": host or socket.gethostname(), "ksm_claim_pid": str(pid)})
    return run.info.run_id


def gone_pid() -> int:
    """The pid of a process that has exited and been reaped (nothing answers to it now)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=120)
    return p.pid


def assert_taken_over(work: tuple[Tracker, dict[str, str]], old: str) -> None:
    tr, keys = work
    claim = acquire(tr, keys, "t1", {"ksm_task": "t1"}, stale_s=TIMEOUT_S, poll_s=0.05)
    assert claim.done is None and claim.run_id not in (None, old)  # the caller holds the work now ...
    dead = tr.client.get_run(old)
    assert dead.info.status == "KILLED" and dead.data.tags["ksm_claim"] == "expired"  # ... the dead claim closed
    mine = tr.client.get_run(claim.run_id)
    assert mine.info.status == "RUNNING" and mine.data.tags["ksm_attempt"] == "2"
    assert [r.info.run_id for r in tr.find("RUNNING", **keys)] == [claim.run_id]


def assert_waited_for(work: tuple[Tracker, dict[str, str]], old: str) -> None:
    """acquire() must wait while ``old`` is alive: it says so, and returns ``old`` once its holder finishes it."""
    tr, keys = work
    said = threading.Event()
    got: list = []

    def log(msg: str) -> None:
        if "waiting for its result" in msg:
            said.set()

    t = threading.Thread(target=lambda: got.append(acquire(tr, keys, "t1", {"ksm_task": "t1"}, stale_s=TIMEOUT_S,
                                                           poll_s=0.05, log=log)), daemon=True)
    t.start()
    try:
        assert said.wait(120), "acquire() did not wait for a live holder"
        assert tr.client.get_run(old).info.status == "RUNNING"  # not taken over
    finally:
        tr.finish(old, "FINISHED")  # the holder finishes: the waiter takes its result
        t.join(120)
    assert got and got[0].done is not None and got[0].done.info.run_id == old and got[0].run is None
    assert [r.info.status for r in tr.find(None, **keys)] == ["FINISHED"]  # the waiter's announcement withdrawn


def test_a_claim_whose_heartbeat_is_older_than_claim_timeout_s_is_taken_over(work):
    # its process is alive (this one) and on this host: only the heartbeat's age says it is dead
    assert_taken_over(work, rival(work, beat_age_s=TIMEOUT_S + 30, pid=os.getpid()))


def test_a_claim_with_a_heartbeat_younger_than_claim_timeout_s_is_waited_for(work):
    assert_waited_for(work, rival(work, beat_age_s=TIMEOUT_S - 30, pid=os.getpid()))


def test_a_claim_whose_process_is_gone_on_this_host_is_taken_over_at_once(work):
    # a fresh heartbeat: only the pid, gone on this very host, says it is dead
    assert_taken_over(work, rival(work, beat_age_s=0, pid=gone_pid()))


def test_a_gone_pid_on_another_host_says_nothing_the_fresh_heartbeat_keeps_the_claim(work):
    assert_waited_for(work, rival(work, beat_age_s=0, pid=gone_pid(), host=f"not-{socket.gethostname()}"))
