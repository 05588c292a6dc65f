"""The bounded fan-out: one Ray task job per task without a FINISHED run, at most ``cluster.max_in_flight`` handed to
Ray at once (:class:`JobPool`; the rest wait in the driver as small :class:`Job` records), collected as they finish,
and stopped on a signal without leaving a run RUNNING. The sequence, ``mode=follow`` and ``mode=compare`` run their
task jobs through it.
"""
from __future__ import annotations

import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import RunConfig
from .errors import Log, Stopped
from .jobs import JobContext, task_job
from .ledger import LedgerBook
from .lineage import stream_book, trained_results
from .records import TaskResult
from .redact import redact_text
from .runtime import StopSignals, in_flight_limit, job_remote
from .tracking import Tracker

__all__ = ["Job", "JobPool", "fan_out"]


@dataclass(frozen=True)
class Job:
    """One task job of a fan-out: its label for the driver (the task, or method/seed/task), the task, the config
    it trains with, and its result key."""

    label: str
    task: str
    rc: RunConfig
    result: str


class JobPool:
    """The task jobs a driver has handed to Ray: at most ``limit`` at once (the rest wait in the driver as small
    Job records, so a 1000-task stream is not submitted in one go), collected as they finish, and stopped on a
    signal without leaving a run RUNNING."""

    def __init__(self, ctx: JobContext, state_ref: Any, tr: Tracker, limit: int):
        self.ctx, self.state_ref, self.tr, self.limit = ctx, state_ref, tr, limit
        self.running: dict[Any, Job] = {}

    def __len__(self) -> int:
        return len(self.running)

    def has_room(self) -> bool:
        return len(self.running) < self.limit

    def submit(self, job: Job) -> None:
        ref = job_remote(task_job, job.rc.cluster).remote(job.rc, self.ctx, job.task, job.result, self.state_ref)
        self.running[ref] = job

    def collect(self, timeout: float) -> list[tuple[Job, TaskResult | None, str | None]]:
        """The jobs that finished within ``timeout`` seconds: (job, result, None) or (job, None, what failed)."""
        import ray

        if not self.running:
            return []
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
        if ready:  # and whatever else is done by now
            ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
        out: list[tuple[Job, TaskResult | None, str | None]] = []
        for ref in ready:
            job = self.running.pop(ref)
            try:
                out.append((job, ray.get(ref), None))
            except Exception as e:  # keep going: the other tasks' work is not lost
                out.append((job, None, _cause(e)))
        return out

    def stop(self, grace_s: float, log: Log) -> tuple[list[tuple[Job, TaskResult | None, str | None]], list[Job]]:
        """Let in-flight jobs finish for ``grace_s`` seconds, then kill the rest and close their runs KILLED.
        Returns what finished meanwhile and the jobs killed."""
        import ray

        finished = []
        deadline = time.monotonic() + grace_s
        if self.running and grace_s > 0:
            log(f"[stop] waiting up to {grace_s:.0f}s for {len(self.running)} in-flight job(s); a second signal "
                "stops them now")
        try:
            while self.running and time.monotonic() < deadline:
                finished += self.collect(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
        except KeyboardInterrupt:  # the second signal, during the wait: no more grace, the same clean-up below
            log(f"[stop] second signal: killing {len(self.running)} in-flight job(s) now")
        killed = list(self.running.values())
        refs = list(self.running)
        self.running.clear()
        for ref in refs:
            ray.cancel(ref, force=True)
        if refs:  # the workers are gone once their refs resolve (as cancelled)
            ray.wait(refs, num_returns=len(refs), timeout=30)
            self._close_killed({j.result for j in killed}, log)
        return finished, killed

    def _close_killed(self, results: set[str], log: Log) -> None:
        """A killed worker cannot close its own run: close this stream's RUNNING runs of those results KILLED."""
        for r in self.tr.find("RUNNING", ksm_kind="task", ksm_sequence=self.ctx.sequence_key):
            if r.data.tags.get("ksm_result") in results:
                self.tr.tags(r.info.run_id, {"ksm_stopped": "signal"})
                self.tr.finish(r.info.run_id, "KILLED")
                log(f"[stop] {r.data.tags.get('ksm_task')}: run {r.info.run_id} KILLED (trains again on resume)")


def fan_out(jobs: list[Job], ctx: JobContext, state: dict[str, np.ndarray], tr: Tracker, progress: bool,
            log: Log = print, book: LedgerBook | None = None) -> tuple[dict[str, TaskResult], dict[str, str], float]:
    """Every job whose result has no FINISHED run yet, as Ray tasks (at most ``cluster.max_in_flight`` handed
    to Ray at once), in the given order, with a progress bar; a failed job does not stop the others. Returns
    the results and the failures by label, and the wall seconds of the fan-out.

    A long fan-out (more than ``lineage.ONE_BY_ONE`` jobs) finds what is trained from the stream's ledger
    (``book``, else :func:`.lineage.stream_book` reads it) and keeps the ledger current: rewritten at most every
    ``ledger.WRITE_EVERY_S`` seconds while results come in, and once as the fan-out ends, however it ends (a
    driver killed outright leaves the last one; the next launch's checks find what it lacks).

    SIGINT/SIGTERM stop it: no new job starts, in-flight ones get ``cluster.stop_grace_s`` to finish, the rest
    are killed and their runs closed KILLED; then :class:`Stopped` says what finished (a second signal skips
    the grace period)."""
    wanted = {j.label: j.result for j in jobs}
    if book is None:
        book = stream_book(tr, ctx.sequence_key, ctx.parent_run_id, len(wanted), log)
    results = trained_results(tr, wanted, book=book, stream=ctx.sequence_key,
                              backbone_fingerprint=ctx.backbone_fingerprint)
    todo = deque(j for j in jobs if j.label not in results)
    if results:
        log(f"[fan-out] {len(results)} job(s) already trained: {', '.join(sorted(results))[:300]}; "
            f"training {len(todo)}: {', '.join(j.label for j in todo)[:300] or '-'}")
    failures: dict[str, str] = {}
    try:
        if not todo:
            return results, failures, 0.0
        return _run(jobs, todo, ctx, state, tr, progress, log, book, results, failures)
    finally:
        if book is not None:
            book.write(force=True)  # never raises: a ledger is a cache


def _run(jobs: list[Job], todo: deque[Job], ctx: JobContext, state: dict[str, np.ndarray], tr: Tracker,
         progress: bool, log: Log, book: LedgerBook | None, results: dict[str, TaskResult],
         failures: dict[str, str]) -> tuple[dict[str, TaskResult], dict[str, str], float]:
    """fan_out's jobs that are not trained yet (``todo``), through a :class:`JobPool`."""
    import ray
    from tqdm import tqdm

    done = len(results)
    cl = todo[0].rc.cluster
    pool = JobPool(ctx, ray.put(state), tr, in_flight_limit(cl))  # the backbone once: every job maps it zero-copy
    t0 = time.perf_counter()
    with StopSignals() as stop, tqdm(total=len(jobs), initial=done, desc="tasks", unit="task",
                                     disable=not progress) as bar:
        def record(job: Job, res: TaskResult | None, err: str | None) -> None:
            if res is not None:
                results[job.label] = res
                if book is not None:
                    book.add(res, job.result)
                bar.set_postfix_str(f"{job.label}: acc {res.test_acc:.3f}")
            else:
                failures[job.label] = err or "?"
                bar.set_postfix_str(f"{job.label}: FAILED")
                # now, not only in the end's summary: a driver that dies later (its tracking server gone) has
                # still said why each job failed, and where a job kept its work
                log(f"[fan-out] {job.label} FAILED: {failures[job.label]}")
            bar.update(1)

        grace = cl.stop_grace_s
        try:
            while (todo or pool) and stop.signum is None:
                while todo and pool.has_room():
                    pool.submit(todo.popleft())
                for outcome in pool.collect(timeout=1.0):
                    record(*outcome)
                if book is not None:
                    book.write()  # when due: at most every ledger.WRITE_EVERY_S seconds
        except KeyboardInterrupt:  # the second signal: no grace
            grace = 0.0
        if stop.signum is not None:
            finished, killed = pool.stop(grace, log)
            for outcome in finished:
                record(*outcome)
            raise Stopped(stop.signum, _stopped_message(stop.signum, len(jobs), results, failures, killed, todo))
    return results, failures, time.perf_counter() - t0


def _stopped_message(signum: int, total: int, results: dict[str, TaskResult], failures: dict[str, str],
                     killed: list[Job], todo: Any) -> str:
    trained = sum(1 for r in results.values() if r.status == "trained")
    return (f"stopped by {signal.Signals(signum).name}: {len(results)} of {total} task(s) have their result "
            f"({trained} trained by this run), {len(failures)} failed, {len(killed)} in-flight killed (their runs "
            f"are KILLED), {len(todo)} not started. Run the same command again to resume: only the tasks without a "
            f"FINISHED run train.")


def _cause(e: BaseException) -> str:
    """What went wrong in a job, for the user: the job's own exception (Ray wraps it in a RayTaskError whose
    first line is only the worker's pid and colour codes)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    return redact_text(f"{type(e).__name__}: {e}")  # logged and raised: a shard URL's login stays out
