"""mode=follow: a driver that stays up and trains a stream's new tasks as they appear.

    python run_pipeline.py mode=follow benchmark=catalogue benchmark.path=tasks.jsonl
    echo '{"name": "boots", "source": {"name": "fashion_mnist"}, "classes": ["Ankle boot", "Bag"]}' >> tasks.jsonl

One Ray session, one backbone in the object store and warm workers for the whole life of the driver: a new task
costs its own training, not a run's start-up (a fresh launch pays ~10 s of Ray start, worker imports, MLflow
set-up and backbone download before its first job). The catalogue is looked at every ``follow.poll_s`` seconds
(one ``stat``); when it changed, its new or edited lines are written to shards (as Ray jobs) and queued. At most
``cluster.max_in_flight`` jobs are handed to Ray at once.

SIGINT or SIGTERM ends it: no new job starts, in-flight jobs get ``cluster.stop_grace_s`` to finish, the rest
are killed and their runs closed KILLED (a second signal skips the wait). The report covers every task of the
stream that has its result; the process exits 128 + the signal's number, and the same command resumes.
"""
from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

from .config import RunConfig
from .data import Manifest, ensure_shards
from .errors import Log, PipelineError, Stopped
from .fanout import Job, JobPool
from .identity import backbone_key, result_key
from .ledger import LedgerBook
from .lineage import stream_book, supersede, trained_results
from .records import TaskResult
from .redact import redact_text
from .report import write_report
from .runtime import StopSignals, in_flight_limit
from .sequence import driving, shard_writers, stream_run

__all__ = ["run_follow", "catalogue_stamp"]


def catalogue_stamp(rc: RunConfig) -> tuple[Any, ...] | None:
    """What says the stream may have changed: the catalogue file's size and mtime (None for a stream fixed by
    its config, which never changes while the driver runs)."""
    path = rc.benchmark.get("path") if rc.benchmark.get("kind") == "catalogue" else None
    if not path:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ("missing",)
    return st.st_size, st.st_mtime_ns


def run_follow(rc: RunConfig, log: Log = print) -> dict[str, Any]:
    """Train the stream's tasks, then every task added to it, until a signal; raises :class:`Stopped` at the
    end (nothing left RUNNING), after the report of what the stream holds."""
    import ray

    # the stream's parent run: closed FAILED (KILLED when interrupted) on an error; the end below closes it itself:
    # KILLED when a job was killed or failed, since the stream's record is then not whole
    with driving(rc, log, warm=lambda n: 1 << 30) as p, StopSignals() as stop, \
            stream_run(p, log, tags={"ksm_mode": "follow"}, finish=False) as s:
        m, tr, key, parent_id, fp = s.manifest, s.tracker, s.key, s.parent_id, s.fingerprint
        bb_key = backbone_key(rc, m)
        pool = JobPool(s.job_context(), ray.put(s.state), tr, in_flight_limit(rc.cluster))
        results: dict[str, TaskResult] = {}       # result key -> its result (small records only)
        failures: dict[str, str] = {}             # result key -> what went wrong
        queued: deque[Job] = deque()
        handled: set[str] = set()                 # result keys queued, running or done
        stamp: Any = object()                     # never equal: the first look always plans
        book: LedgerBook | None = None            # a long stream's ledger, kept current while following

        def collected(job: Job, res: TaskResult | None, err: str | None) -> None:
            _record(job, res, err, results, failures, log)
            if res is not None and book is not None:
                book.add(res, job.result)

        log(f"[follow] following {rc.benchmark.get('path') or rc.benchmark['name']}; Ctrl-C (or SIGTERM) stops")
        try:
            while stop.signum is None:
                now = catalogue_stamp(rc)
                if now != stamp:
                    stamp = now
                    m = _replan(rc, m, bb_key, log)
                    wanted = s.wanted(m)
                    book = stream_book(tr, key, parent_id, len(wanted), log, book)  # confirmed again
                    supersede(tr, key, wanted, book)
                    new = {t: k for t, k in wanted.items() if k not in handled}
                    for t, res in trained_results(tr, new, book=book, stream=key, backbone_fingerprint=fp).items():
                        results[new[t]] = res
                    todo = [Job(t, t, rc, k) for t, k in new.items() if k not in results]
                    queued.extend(todo)
                    handled.update(new.values())
                    if new:
                        log(f"[follow] {len(new)} new task(s): {len(todo)} to train, {len(new) - len(todo)} "
                            f"reused; {len(queued) + len(pool)} queued or running")
                while queued and pool.has_room():
                    pool.submit(queued.popleft())
                for outcome in pool.collect(timeout=rc.follow.poll_s if pool else 0.0):
                    collected(*outcome)
                if book is not None:
                    book.write()  # when due: at most every ledger.WRITE_EVERY_S seconds
                if not pool:
                    _sleep_until(stop, rc.follow.poll_s)
            grace = rc.cluster.stop_grace_s
        except KeyboardInterrupt:  # the second signal: no grace
            grace = 0.0
        finished, killed = pool.stop(grace, log)
        for outcome in finished:
            collected(*outcome)
        if book is not None:
            book.write(force=True)  # never raises: a ledger is a cache
        order = {t: i for i, t in enumerate(m.new_tasks)}
        tasks_of = {result_key(rc, fp, m.task(t).identity): t for t in m.new_tasks}  # the stream as it is now
        ordered = sorted((r for k, r in results.items() if k in tasks_of), key=lambda r: order.get(r.task, 0))
        write_report(tr, parent_id, ordered, rc, log=log,
                     failures={tasks_of[k]: msg for k, msg in failures.items() if k in tasks_of})
        tr.finish(parent_id, "KILLED" if killed or failures else "FINISHED")
        signum = stop.signum or 2
    trained = sum(1 for r in results.values() if r.status == "trained")
    raise Stopped(signum, f"follow stopped: {len(ordered)} of {len(m.new_tasks)} task(s) of the stream have their "
                          f"result ({trained} trained by this run), {len(failures)} failed, {len(killed)} in-flight "
                          f"killed (runs KILLED), {len(queued)} not started. Run the same command to go on.")


def _replan(rc: RunConfig, m: Manifest, bb_key: str, log: Log) -> Manifest:
    """The stream as the catalogue says now, with its new tasks' shards written (as Ray jobs). A catalogue whose
    first line changed would need another backbone: refused, naming the fix."""
    try:
        new = ensure_shards(rc.benchmark, rc.paths.shards, log=log, map_tasks=shard_writers(rc))
    except Exception as exc:  # a file caught while being rewritten, a bad first line: keep following
        log(f"[follow] the stream cannot be read right now ({redact_text(str(exc))}); trying again in "
            f"{rc.follow.poll_s:g}s")
        return m
    if backbone_key(rc, new) != bb_key:
        raise PipelineError(f"the initial task (first line) of {rc.benchmark.get('path')} changed while following: "
                            "that needs another backbone. Restore the line, or start a new stream with "
                            "run_name=<a new name>")
    return new


def _record(job: Job, res: TaskResult | None, err: str | None, results: dict[str, TaskResult],
            failures: dict[str, str], log: Log) -> None:
    if res is not None:
        results[job.result] = res
        log(f"[follow] {job.task}: {res.status}, test acc {res.test_acc:.3f}")
    else:
        failures[job.result] = err or "?"
        log(f"[follow] {job.task}: FAILED: {(err or '?').splitlines()[0][:300]}")


def _sleep_until(stop: StopSignals, seconds: float) -> None:
    """Sleep ``seconds``, waking early for a stop signal (time.sleep is cut short by a handled signal)."""
    deadline = time.monotonic() + seconds
    while stop.signum is None and time.monotonic() < deadline:
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
