"""The Ray runtime the driver uses: connect or start it, check that a job's resources fit it, and turn a job
function into a remote task with the cluster's resources and retries."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .config import ClusterCfg, RunConfig
from .errors import Log, PipelineError
from .probes import check_ray_address

__all__ = ["ray_session", "embedded", "check_fits", "check_fits_before_ray", "remote", "ray_map", "warm_workers",
           "StopSignals", "job_slots", "in_flight_limit", "job_resources", "check_cluster", "job_remote"]

T = TypeVar("T")


def _address(cl: ClusterCfg) -> str:
    return os.environ.get("RAY_ADDRESS") or cl.address or "local"


def embedded(cl: ClusterCfg) -> bool:
    """Whether the run starts its own private Ray runtime on this machine."""
    return _address(cl) == "local"


@contextlib.contextmanager
def ray_session(cl: ClusterCfg, log: Log = print) -> Iterator[None]:
    """Use the Ray runtime already initialised in this process, else connect/start one as configured; shut down
    only what this call started."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = _address(cl)
    check_ray_address(address, cl.connect_timeout_s)
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address == "local":
        # always a private, fresh cluster: a stale /tmp/ray/ray_current_cluster must not be joined
        kw.update(num_cpus=cl.num_cpus, num_gpus=cl.num_gpus)
        log(f"[ray] starting an embedded Ray runtime (num_cpus={cl.num_cpus or 'all'})")
    else:
        log(f"[ray] connecting to {address}")
    try:
        ray.init(address=address, **{k: v for k, v in kw.items() if v is not None})
    except (ConnectionError, RuntimeError) as e:
        raise PipelineError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    try:
        yield
    finally:
        ray.shutdown()


def check_fits(cpus: tuple[str, float], gpus: tuple[str, float], have_cpus: float, have_gpus: float,
               where: str) -> None:
    """One job's (key, amount) of CPUs and GPUs against what ``where`` has; a job that cannot fit would wait
    forever in Ray's queue, so say which key to lower instead."""
    (ckey, c), (gkey, g) = cpus, gpus
    if g > 0 and have_gpus <= 0:
        raise PipelineError(f"{gkey}={g:g} but {where} has no GPU; set {gkey}=0 (CPU jobs) or run on a cluster "
                            "with GPU nodes (cluster=remote)")
    if g > have_gpus:
        raise PipelineError(f"{gkey}={g:g} exceeds the {have_gpus:g} GPU(s) of {where}: no job could start; lower it")
    if c > have_cpus:
        raise PipelineError(f"{ckey}={c:g} exceeds the {have_cpus:g} CPU(s) of {where}: no job could start; lower it")


def check_fits_before_ray(cl: ClusterCfg, cpus: tuple[str, float], gpus: tuple[str, float]) -> None:
    """:func:`check_fits` against the cluster the run will get, before any Ray or data work where that can be
    known: a running Ray runtime's resources, or an embedded one's (this machine, capped by cluster.num_*).
    A remote cluster is checked once connected."""
    import ray

    if ray.is_initialized():
        res = ray.cluster_resources()
        check_fits(cpus, gpus, res.get("CPU", 0), res.get("GPU", 0), f"the Ray cluster (resources: {res})")
        return
    if not embedded(cl):
        return
    have_gpus = cl.num_gpus
    if have_gpus is None:
        import torch

        have_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    where = "the embedded Ray runtime (this machine"
    where += f", cluster.num_cpus={cl.num_cpus}" if cl.num_cpus else ""
    where += f", cluster.num_gpus={cl.num_gpus}" if cl.num_gpus is not None else ""
    check_fits(cpus, gpus, cl.num_cpus or os.cpu_count() or 1, have_gpus, where + ")")


def job_resources(rc: RunConfig) -> tuple[tuple[str, float], tuple[str, float]]:
    """A task job's (key, amount) of CPUs and GPUs, as :func:`check_fits` takes them."""
    return ("cluster.cpus_per_task", rc.cluster.cpus_per_task), ("cluster.gpus_per_task", rc.cluster.gpus_per_task)


def check_cluster(rc: RunConfig) -> None:
    """A task job fits the connected Ray cluster."""
    import ray

    res = ray.cluster_resources()
    check_fits(*job_resources(rc), res.get("CPU", 0), res.get("GPU", 0), f"the Ray cluster (resources: {res})")


@functools.lru_cache(maxsize=64)
def remote(fn: Callable, cpus: float, gpus: float, max_retries: int) -> Any:
    """``fn`` as a Ray task with these resources; a worker that dies mid-job is retried ``max_retries`` times
    (the jobs are idempotent), an exception raised by the job is not (it would fail the same way again).
    Cached: a 1000-task fan-out pickles and exports the function once, not once per job (a RemoteFunction
    re-exports itself when a new Ray session starts)."""
    import ray

    # max_calls=0: Ray's default for GPU tasks is a fresh worker per task (CUDA and imports paid every time);
    # jobs free their GPU memory on return, so workers can be reused
    return ray.remote(max_calls=0)(fn).options(num_cpus=cpus, num_gpus=gpus or 0, max_retries=max_retries,
                                               retry_exceptions=False)


def job_remote(fn: Callable, cl: ClusterCfg) -> Any:
    """``fn`` as a Ray task with a task job's resources and retries (``cluster.*_per_task``, ``max_retries``)."""
    return remote(fn, cl.cpus_per_task, cl.gpus_per_task, cl.max_retries)


def ray_map(fn: Callable[..., T], items: list[tuple[Any, ...]], *, cpus: float = 1.0,
            max_retries: int = 0) -> Iterator[T]:
    """``fn(*args)`` for every ``args`` as Ray tasks, all submitted at once (Ray runs as many as fit, on any
    node); the results in order, each as soon as it and those before it are done. A job's own exception is
    raised as itself, not inside Ray's wrapper, so the user reads e.g. the data error's message and fix."""
    import ray

    job = remote(fn, cpus, 0, max_retries)
    refs = [job.remote(*args) for args in items]
    for ref in refs:
        try:
            yield ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, BaseException) else exc) from None


class StopSignals:
    """SIGINT and SIGTERM while the driver runs jobs: the first sets ``signum`` (the driver's loop stops
    submitting, lets in-flight jobs finish for a grace period, closes the rest KILLED), a second raises
    KeyboardInterrupt at once (the loop then kills in-flight jobs without waiting).

    Installed after ``ray.init``: an embedded Ray head puts its own SIGTERM handler on the driver, which kills
    the local raylet and leaves the driver to abort (signal 6) with runs still RUNNING. Only the main thread
    can take signals; elsewhere (a notebook's worker thread) this does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): stopping at once")
        self.signum = signum
        print(f"\n[stop] {signal.Signals(signum).name}: no new jobs; in-flight jobs finish, then the run stops "
              "(signal again to stop at once)", file=sys.stderr, flush=True)


def job_slots(cl: ClusterCfg) -> int:
    """How many task jobs the connected cluster runs at once (CPUs, and GPUs when a job takes some)."""
    import ray

    res = ray.cluster_resources()
    slots = int(res.get("CPU", 0) // cl.cpus_per_task)
    if cl.gpus_per_task:
        slots = min(slots, int(res.get("GPU", 0) / cl.gpus_per_task + 1e-9))
    return max(slots, 1)


def in_flight_limit(cl: ClusterCfg) -> int:
    """Task jobs handed to Ray at once: ``cluster.max_in_flight``, else twice the job slots (a slot that frees
    finds the next job already queued, while a 1000-task stream is not submitted all at once)."""
    return cl.max_in_flight or 2 * job_slots(cl)


def warm_workers(warm: Callable[[float, float], int], cl: ClusterCfg, jobs: int) -> None:
    """One ``warm`` job per worker slot the task jobs will use (not awaited): each worker imports the job code
    while the driver does its own set-up."""
    for _ in range(min(jobs, job_slots(cl))):
        remote(warm, cl.cpus_per_task, cl.gpus_per_task, cl.max_retries).remote(cl.cpus_per_task, cl.gpus_per_task)
