"""Claims: who does a piece of work (train a backbone, train a task) when several launches want it at once.

Why the tracking store, not a lock file: the store is the one thing every launch and every Ray worker of every
node already shares (a shard root may be a read-only URL, an output folder may be node-local), and the claim is
then visible where users look, as the RUNNING run of the work itself.

The protocol ("announce, then look"), for the runs that share a set of tags (``ksm_result=...`` for a task):
1. the caller creates its own RUNNING run (its announcement) with a heartbeat tag;
2. then it lists the runs with the tags, in every state, in one search. A FINISHED one is the result: it withdraws
   (deletes its run) and takes it. Another live RUNNING one: it withdraws and waits, then looks (one search per
   poll) until the result appears or the rival is gone, and announces again. Alone: it holds the claim and does
   the work.
Two callers can never both be alone: the one that announced second sees the first (the store orders the
writes). Both may see each other and withdraw; each waits a random time before trying again, so one wins soon.
For a task the driver has already skipped the work it found FINISHED (one paged scan), so announcing without a
first look costs a created-and-deleted run only when two launches race, and saves a search on every task. A
backbone, usually found done, is looked for first.

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
from dataclasses import dataclass
from typing import Any

from .errors import Log
from .tracking import Tracker

__all__ = ["acquire", "look_keys", "Claim", "Heartbeat", "HEARTBEAT_TAG"]

HEARTBEAT_TAG = "ksm_heartbeat"


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


@dataclass(frozen=True)
class Claim:
    """What :func:`acquire` got: ``run`` when this caller holds the work (its RUNNING run, to be finished by the
    caller; keep a :class:`Heartbeat` on it), else ``done``, the FINISHED run another holder made."""

    run: Any | None = None
    done: Any | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else None


def look_keys(keys: dict[str, str]) -> dict[str, str]:
    """The tags a claim's search filters on: its keys, less ``ksm_kind`` when a result key names the work (only task
    runs carry ``ksm_result``). Every task run matches ``ksm_kind = 'task'``, and that clause was most of a
    look-up's time in a 10,000-run experiment (benchmarks/RESULTS.md, issue #24: 31 -> 12 ms in-process)."""
    return {k: v for k, v in keys.items() if not (k == "ksm_kind" and "ksm_result" in keys)}


def acquire(tr: Tracker, keys: dict[str, str], name: str, tags: dict[str, str], parent: str | None = None, *,
            stale_s: float = 60.0, poll_s: float = 1.0, look_first: bool = False, log: Log = lambda _: None) -> Claim:
    """Claim the work named by ``keys``. Waits while another live holder works on it; returns the dead holders'
    runs to KILLED on the way. The holder's run is tagged ``ksm_attempt``: 1 + the earlier KILLED attempts.

    Two store round-trips in the common case (nobody else wants the work): the announcement, then one search of
    the work's runs in every state. A caller that has had to wait looks before it announces again, so a long wait
    costs one search per poll, not a run created and deleted per poll. ``look_first``: look before the first
    announcement too, for work usually found done (a launch's backbone), so reusing it creates no run."""
    look, said = look_first, False

    def wait() -> None:
        nonlocal said
        if not said:
            log(f"[claim] {name}: another launch is working on it; waiting for its result")
            said = True
        time.sleep(poll_s * (1 + random.random()))

    while True:
        if look:
            runs = tr.find(None, **look_keys(keys))
            done = _first(runs, "FINISHED")
            if done is not None:
                return Claim(done=done)
            now = time.time()
            if any(r.info.status == "RUNNING" and _alive(r, stale_s, now) for r in runs):
                wait()
                continue
        run = tr.create(name, {**tags, **keys, HEARTBEAT_TAG: f"{time.time():.3f}", "ksm_attempt": "1",
                               "ksm_claim_host": socket.gethostname(), "ksm_claim_pid": str(os.getpid())},
                        parent=parent)
        me = run.info.run_id
        # FINISHED is looked for after the announcement: a holder that finishes at any moment before it is seen
        # here, and one that announced before us is seen RUNNING (the store orders the writes)
        runs = tr.find(None, **look_keys(keys))
        done = _first(runs, "FINISHED")
        now = time.time()
        others = [r for r in runs if r.info.status == "RUNNING" and r.info.run_id != me]
        # this very announcement made twice: MLflow's client sends a create_run again when the first answer timed
        # out (a slow server), and the server may have made both. The same request (host, pid, heartbeat to the
        # millisecond) is not a rival: withdrawn
        doubled = {r.info.run_id for r in others if _same_announcement(r, run)}
        for r_id in doubled:
            tr.client.delete_run(r_id)
        others = [r for r in others if r.info.run_id not in doubled]
        dead = [r for r in others if not _alive(r, stale_s, now)]
        for r in dead:
            tr.tags(r.info.run_id, {"ksm_claim": "expired"})
            tr.finish(r.info.run_id, "KILLED")
        if done is None and len(dead) == len(others):
            earlier = sum(r.info.status == "KILLED" for r in runs) + len(dead)
            if earlier:  # a retry: rare, so the common case pays no extra write for it
                tr.tags(me, {"ksm_attempt": str(earlier + 1)})
            return Claim(run=run)
        tr.client.delete_run(me)  # withdrawn: another announced too; not a run anyone should browse
        if done is not None:
            return Claim(done=done)
        look = True  # from now on: look (one search a poll) before announcing again
        wait()


def _same_announcement(run: Any, mine: Any) -> bool:
    """Whether ``run`` was made by the same create_run request as ``mine`` (sent twice by the client)."""
    a, b = run.data.tags, mine.data.tags
    return all(a.get(k) == b.get(k) for k in (HEARTBEAT_TAG, "ksm_claim_host", "ksm_claim_pid"))


def _first(runs: list[Any], status: str) -> Any | None:
    """The newest run in ``status`` (``runs`` come newest first)."""
    return next((r for r in runs if r.info.status == status), None)


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
