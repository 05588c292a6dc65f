"""Claims: who does a piece of work (train a backbone, train a task) when several launches want it at once.

Why the tracking store, not a lock file: the store is the one thing every launch and every Ray worker of every
node already shares (a shard root may be a read-only URL, an output folder may be node-local), and the claim is
then visible where users look, as the RUNNING run of the work itself.

The protocol ("announce, then look"), for the runs that share a set of tags (``ksm_result=...`` for a task):
1. a FINISHED run with the tags is the result: nothing to do;
2. else the caller creates its own RUNNING run (its announcement) with a heartbeat tag, then lists the RUNNING
   runs with the tags, then looks for a FINISHED one again. Alone and still no result: it holds the claim and
   does the work. Else it withdraws (deletes its run) and takes the result, or waits and starts over.
Two callers can never both be alone: the one that announced second sees the first (the store orders the
writes). Both may see each other and withdraw; each waits a random time before trying again, so one wins soon.

A claim is given up when its heartbeat is older than ``stale_s`` (its holder died with its node), or at once when
its holder's process is gone on this very host (a Ray worker killed and retried here). Such a run is marked
KILLED, so no run is left RUNNING by a dead holder.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .tracking import Tracker

__all__ = ["acquire", "Heartbeat", "HEARTBEAT_TAG"]

HEARTBEAT_TAG = "ksm_heartbeat"
Log = Callable[[str], Any]


def _alive(run: Any, stale_s: float, now: float) -> bool:
    """Whether a RUNNING run's holder still works on it: a recent heartbeat, and on this host a live process."""
    tags = run.data.tags
    beat = float(tags.get(HEARTBEAT_TAG, run.info.start_time / 1000))
    if now - beat > stale_s:
        return False
    if tags.get("ksm_claim_host") == socket.gethostname() and tags.get("ksm_claim_pid", "").isdigit():
        try:
            os.kill(int(tags["ksm_claim_pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
    return True


def acquire(tr: Tracker, keys: dict[str, str], name: str, tags: dict[str, str], parent: str | None = None, *,
            stale_s: float = 60.0, poll_s: float = 1.0, log: Log = lambda _: None) -> tuple[str | None, Any | None]:
    """Claim the work named by ``keys``: ``(run_id, None)`` when this caller holds it (its RUNNING run, to be
    finished by the caller; keep a :class:`Heartbeat` on it), or ``(None, run)`` with the FINISHED run that
    another holder made meanwhile. Waits while another live holder works on it; returns the dead holders' runs
    to KILLED on the way."""
    waiting = False
    while True:
        done = tr.find_one("FINISHED", **keys)
        if done is not None:
            return None, done
        now = time.time()
        rivals = tr.find("RUNNING", **keys)
        for r in rivals:
            if not _alive(r, stale_s, now):
                tr.tags(r.info.run_id, {"ksm_claim": "expired"})
                tr.finish(r.info.run_id, "KILLED")
        if not any(_alive(r, stale_s, now) for r in rivals):
            run_id = tr.start(name, {**tags, **keys, HEARTBEAT_TAG: f"{time.time():.3f}",
                                     "ksm_claim_host": socket.gethostname(), "ksm_claim_pid": str(os.getpid())},
                              parent=parent)
            others = [r for r in tr.find("RUNNING", **keys) if r.info.run_id != run_id]
            # FINISHED is looked at again after the announcement: a holder that finished between the first look
            # and the announcement is neither RUNNING nor seen as FINISHED by that first look
            done = None if others else tr.find_one("FINISHED", **keys)
            if not others and done is None:
                return run_id, None
            tr.client.delete_run(run_id)  # withdrawn: another announced too; not a run anyone should browse
            if done is not None:
                return None, done
        if not waiting:
            log(f"[claim] {name}: another launch is working on it; waiting for its result")
            waiting = True
        time.sleep(poll_s * (1 + random.random()))


class Heartbeat:
    """Keeps a claim alive: a daemon thread refreshes the run's heartbeat tag every ``period_s`` until stopped.
    Use as a context manager around the work."""

    def __init__(self, tr: Tracker, run_id: str, period_s: float = 10.0):
        self.tr, self.run_id, self.period_s = tr, run_id, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"ksm-heartbeat-{run_id[:8]}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.tr.tags(self.run_id, {HEARTBEAT_TAG: f"{time.time():.3f}"})
            except Exception:  # a tracking hiccup: the next beat tries again; the work goes on
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=self.period_s + 5)
