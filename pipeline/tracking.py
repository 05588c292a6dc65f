"""MLflow access for the pipeline: explicit run ids through MlflowClient (no global active run, so the same code
is safe in Ray workers and Tune trials), tags to find a sequence's runs again, and idempotent run creation.

Tags (underscored so filters need no quoting): ksm_kind = sequence | backbone | task | tune_sweep | tune_trial |
evaluation | export, ksm_sequence = the stream run's key, ksm_task = task name, ksm_task_id = its content identity,
ksm_result = a task result's key (backbone, task, method, training, seed), ksm_backbone = backbone key,
ksm_superseded = true on a task run whose task has changed since (ARCHITECTURE.md, "Identity and resume").

MLflow's own: every run gets ``mlflow.source.*`` (the entry point, the git commit) and the experiments the pipeline
creates ``mlflow.experimentKind`` (so the UI opens them as model training, not GenAI).
"""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag, ViewType

from .config import ROOT
from .errors import Stopped, TrackingUnreachable
from .redact import redact_url, split_userinfo
from .store import ensure_store

__all__ = ["Tracker", "PARENT_TAG", "EXPERIMENT_KIND", "source_tags", "git_commit", "filter_value"]

_PROGRESS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow's switch for its download progress bars

PARENT_TAG = "mlflow.parentRunId"
#: the experiment tag MLflow 3's UI reads to choose its layout; "custom_model_development" is its model-training
#: kind (the others: genai_development, the *_inferred guesses it makes itself, no_inferred_type)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
_GUESSED_KINDS = ("", "genai_development_inferred", "custom_model_development_inferred", "no_inferred_type")
_MAX_PARAM = 6000  # MLflow's param value limit is 6000 chars (8000 on newer stores); stay under both


def filter_value(value: Any) -> str:
    """``value`` as a string literal of an MLflow search filter: single-quoted, or double-quoted when it holds a
    single quote (MLflow's filters have no escape). A value holding both cannot be searched for: refused, so it
    never becomes part of the filter's syntax."""
    v = str(value)
    if "'" not in v:
        return f"'{v}'"
    if '"' not in v:
        return f'"{v}"'
    raise ValueError(f"{v!r} holds both quote characters: MLflow's search filters cannot match it")


def _http_limits(uri: str = "") -> None:
    # MLflow's REST client retries for minutes by default; a pipeline should fail within seconds instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    # Not shorter: MLflow's client sends a request again after a read timeout, a POST included, so a create_run
    # the server completed after the client gave up leaves a second RUNNING run. With 30 s, 64 concurrent jobs on
    # a loaded 2-core server did that 13 times in 192 tasks (benchmarks/RESULTS.md, "Tracking at cluster
    # scale"). A server that cannot be reached still fails at once (refused) and is waited out by PatientClient.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    if split_userinfo(uri)[1] is not None:
        # MLflow prints "View run ... at <tracking URI>/#/..." to stdout each time it ends a run on a server: with a
        # login in the URI, that is the password in every job's log
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


#: seconds a run waits out an unreachable tracking server (a restart, a network blip) before it gives up
DEFAULT_OUTAGE_S = 120.0
#: what a request that never reached the server says (safe to send again: nothing was written)
_UNREACHABLE = ("Connection refused", "Failed to establish a new connection", "NewConnectionError",
                "Name or service not known", "Temporary failure in name resolution")


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the server could not be reached at all. A timeout or a reset
    mid-request is not: the request may have been applied, and sending a create_run again would duplicate it."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:
        if isinstance(e, ConnectionRefusedError) or any(s in str(e) for s in _UNREACHABLE):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class PatientClient:
    """An MlflowClient whose calls wait out an HTTP tracking server that cannot be reached, for up to
    ``outage_s`` seconds, retrying with backoff (0.5 s doubling to 10 s): a server restarting mid-run costs the
    jobs a pause, not their work. Past the limit: :class:`TrackingUnreachable` naming the URI. Only requests
    that never reached the server are retried (see :func:`_unreachable`); a local store (sqlite, files) is used
    as is."""

    def __init__(self, uri: str, outage_s: float = DEFAULT_OUTAGE_S):
        self._client = MlflowClient(tracking_uri=uri)
        self._uri, self._outage_s = uri, outage_s
        self._patient = outage_s > 0 and uri.startswith(("http://", "https://"))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not self._patient or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            deadline, delay = time.monotonic() + self._outage_s, 0.5
            while True:
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:
                    if not _unreachable(exc):
                        raise
                    if time.monotonic() + delay > deadline:
                        raise TrackingUnreachable(
                            f"the tracking server {redact_url(self._uri)} has been unreachable for "
                            f"{self._outage_s:g}s (tracking.outage_s) while calling {name}: start it again "
                            "(cluster/start_mlflow_server.sh) and re-run the same command (what has FINISHED is "
                            "kept)") from None
                    print(f"[tracking] {redact_url(self._uri)} unreachable ({name}); retrying in {delay:g}s",
                          flush=True)
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)

        return call


class Tracker:
    """One experiment on one tracking URI."""

    def __init__(self, uri: str, experiment_id: str, outage_s: float = DEFAULT_OUTAGE_S):
        _http_limits(uri)
        self.uri = uri
        self.experiment_id = experiment_id
        self.outage_s = outage_s
        self.client: Any = PatientClient(uri, outage_s)

    # -- setup (driver only: concurrent experiment creation races) -----------------------------------------
    @classmethod
    def setup(cls, uri: str, experiment: str, artifact_root: str | None = None,
              outage_s: float = DEFAULT_OUTAGE_S) -> "Tracker":
        _http_limits(uri)
        # A fresh sqlite store must exist complete before MlflowClient opens it: MlflowClient would migrate it in
        # place, and another process opening the file meanwhile (mlflow ui, a notebook) collides with that.
        ensure_store(uri)
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            location = Path(artifact_root).absolute().as_uri() if artifact_root and _is_local_store(uri) else None
            try:
                eid = client.create_experiment(experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
            except Exception:  # created meanwhile by another driver
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                eid = exp.experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            eid = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND[0], "") in _GUESSED_KINDS:  # a kind a user chose is left as it is
                client.set_experiment_tag(eid, *EXPERIMENT_KIND)
        return cls(uri, eid, outage_s)

    # -- finding runs -------------------------------------------------------------------------------------
    def find(self, status: str | None = "FINISHED", **tags: str) -> list[Any]:
        """Runs of this experiment with all the given tags (and status), newest first (every page of them)."""
        return list(self.scan(status, order_by=["attributes.start_time DESC"], **tags))

    def scan(self, status: str | None = "FINISHED", page: int = 1000, *, params: Mapping[str, str] | None = None,
             order_by: list[str] | None = None, **tags: str) -> Iterator[Any]:
        """Every run of this experiment with the given tags, params (and status), a page at a time: one query per
        ``page`` runs instead of one per lookup, without holding them all. Filter on what narrows the runs to the
        ones wanted (a stream's key, a result key): a search's cost grows with the runs it returns (each comes
        with all its tags, params and metrics), not with the experiment."""
        clauses = [f"tags.{k} = {filter_value(v)}" for k, v in tags.items()] + [
            f"params.{k} = {filter_value(v)}" for k, v in (params or {}).items()] + (
            [f"attributes.status = '{status}'"] if status else [])
        return self.scan_where(" and ".join(clauses), page=page, order_by=order_by)

    def scan_where(self, where: str, *, deleted: bool = False, page: int = 1000,
                   order_by: list[str] | None = None) -> Iterator[Any]:
        """Every run of this experiment that matches an MLflow search filter, a page at a time: the active runs, or
        with ``deleted`` only the deleted ones (still in the store until ``mlflow gc``)."""
        view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
        token = None
        while True:
            runs = self.client.search_runs([self.experiment_id], where, run_view_type=view, max_results=page,
                                           order_by=order_by, page_token=token)
            yield from runs
            token = runs.token
            if not token:
                return

    def find_one(self, status: str | None = "FINISHED", **tags: str) -> Any | None:
        runs = self.find(status, **tags)
        return runs[0] if runs else None

    # -- writing ------------------------------------------------------------------------------------------
    def create(self, name: str, tags: Mapping[str, str], parent: str | None = None) -> Any:
        """A new RUNNING run (the MLflow Run: its id and start time) with the tags, under ``parent``."""
        t = dict(tags)
        if parent:
            t[PARENT_TAG] = parent
        t.setdefault("ksm_host", socket.gethostname())
        for k, v in source_tags().items():
            t.setdefault(k, v)
        return self.client.create_run(self.experiment_id, tags=t, run_name=name)

    def start(self, name: str, tags: Mapping[str, str], parent: str | None = None) -> str:
        return self.create(name, tags, parent).info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    @contextlib.contextmanager
    def running(self, run_id: str, *, finish: bool = True) -> Iterator[None]:
        """Close ``run_id`` as the block ends, as MLflow's ``start_run`` closes its run: FINISHED when the block
        returns, KILLED on :class:`Stopped`, KeyboardInterrupt or SystemExit (the process was told to stop: a Ray
        worker turns the SIGTERM its dying raylet sends into SystemExit; the task itself did not fail, and a rerun's
        claim counts the run as an earlier attempt), FAILED on any other exception, which is raised again.
        ``finish=False``: the block closes the run itself when it succeeds (a task job, whose last log and finish
        are kept locally when the server is down); only an exception closes it here.

        A :class:`TrackingUnreachable` from the block leaves the run as it is (the server cannot take a status
        either; a rerun's claim closes a dead task run KILLED, a stream's parent run is reopened), and one raised
        while closing after another exception does not hide that exception."""
        try:
            yield
        except TrackingUnreachable:
            raise
        except BaseException as e:
            with contextlib.suppress(TrackingUnreachable):
                self.finish(run_id, "KILLED" if isinstance(e, (Stopped, KeyboardInterrupt, SystemExit)) else "FAILED")
            raise
        if finish:
            self.finish(run_id)

    def params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self.log(run_id, params=params)

    def metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log(run_id, metrics=metrics, step=step)

    def tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.log(run_id, tags=tags)

    def log(self, run_id: str, *, params: Mapping[str, Any] | None = None,
            metrics: Mapping[str, float | None] | None = None, tags: Mapping[str, Any] | None = None,
            step: int = 0, history: Iterable[tuple[int, Mapping[str, float]]] = ()) -> None:
        """Params, metrics (at ``step``; None values skipped), tags and ``history`` (earlier steps' metrics, as
        (step, metrics)) in as few ``log_batch`` calls as MLflow's limits allow (100 params, 100 tags, 1000
        entries a call): one, for what a task run logs at its end. Each call is a store round-trip (~10 ms on
        sqlite), which is what a task of a large stream pays most for."""
        ts = int(time.time() * 1000)
        ps = [Param(k, str(v)[:_MAX_PARAM]) for k, v in (params or {}).items()]
        ms = [Metric(k, float(v), ts, s) for s, m in history for k, v in m.items() if v is not None]
        ms += [Metric(k, float(v), ts, step) for k, v in (metrics or {}).items() if v is not None]
        tgs = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        while ps or ms or tgs:
            p, ps = ps[:100], ps[100:]
            t, tgs = tgs[:100], tgs[100:]
            m, ms = ms[:1000 - len(p) - len(t)], ms[1000 - len(p) - len(t):]
            self.client.log_batch(run_id, metrics=m, params=p, tags=t)

    def artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None,
                 artifact_uri: str | None = None) -> None:
        """Log one file. ``artifact_uri`` (the run's, from its Run) saves MlflowClient's own lookup of the run
        when the artifacts are local files: one store round-trip fewer per task."""
        if artifact_uri and urlparse(artifact_uri).scheme in ("", "file"):  # not mlflow-artifacts:/, s3://, ...
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            get_artifact_repository(artifact_uri).log_artifact(str(path), artifact_path)
            return
        self.client.log_artifact(run_id, str(path), artifact_path)

    def artifacts(self, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
        for p in paths:
            self.artifact(run_id, p, artifact_path)

    def download(self, run_id: str, artifact_path: str, dst: str | os.PathLike) -> str:
        """One artifact into ``dst``, without MLflow's progress bar (three lines of log per file: a chain's
        links and ``mode=evaluate`` download one each; the variable is put back as it was)."""
        Path(dst).mkdir(parents=True, exist_ok=True)
        before = os.environ.get(_PROGRESS)
        os.environ[_PROGRESS] = "false"
        try:
            return self.client.download_artifacts(run_id, artifact_path, str(dst))
        finally:
            if before is None:
                os.environ.pop(_PROGRESS, None)
            else:
                os.environ[_PROGRESS] = before

    def inputs(self, run_id: str, datasets: Iterable[tuple[Dataset, str]]) -> None:
        """Log datasets as the run's inputs, each with its context (``train``, ``test``): the UI's Dataset column.

        Jobs training one task at once (compare: methods x seeds) race to create the same dataset row (the store
        keys it by experiment, name and digest); the loser's insert fails on that key. The row then exists, and
        logging again links the run to it."""
        inputs = [DatasetInput(d, tags=[InputTag("mlflow.data.context", ctx)]) for d, ctx in datasets]
        for attempt in range(3):
            try:
                self.client.log_inputs(run_id, inputs)
                return
            except Exception as exc:
                if "UNIQUE constraint failed: datasets" not in str(exc) and "Duplicate entry" not in str(exc) \
                        or attempt == 2:
                    raise
                time.sleep(0.1 * (attempt + 1))

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, interval_s: float) -> Iterator[dict[str, float]]:
        """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py on an NVIDIA machine) on the
        run while the block runs, sampled every ``interval_s`` seconds (0: off).

        MLflow's monitor (a thread that logs a point per interval) starts only once the block has run for one
        interval. A shorter block (most tasks of a large stream) is sampled at its start and end instead, and the
        dict this yields is filled on exit with that one point ("system/..." keys): the caller logs it with its
        final metrics, so a short job still has its point and pays no store call of its own for it. The same
        holds for a longer block that ended before the monitor logged anything."""
        pending: dict[str, float] = {}
        if interval_s <= 0:
            yield pending
            return
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        quiet = logging.getLogger("mlflow.system_metrics")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # its INFO lines (started, no GPU) would print in every job's log
        try:
            mon = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=self.uri)
            mon.collect_metrics()
        finally:
            quiet.setLevel(level)

        def start() -> None:  # in the timer's thread, as quietly
            quiet.setLevel(logging.WARNING)
            try:
                mon.start()
            finally:
                quiet.setLevel(level)

        later = threading.Timer(interval_s, start)
        later.daemon = True
        later.start()
        try:
            yield pending
        finally:
            later.cancel()
            later.join()  # a monitor being started right now has started when this returns
            quiet.setLevel(logging.WARNING)
            try:
                mon.finish()  # a started monitor: stops and joins its thread, flushes what it published
                if mon._logging_step == 0:  # nothing logged yet: this block's one point, for the caller
                    mon.collect_metrics()
                    pending.update({f"system/{k}": v for k, v in mon.aggregate_metrics().items()})
            except Exception:  # noqa: BLE001  (system metrics are a diagnostic: never fail the job over them)
                pass
            finally:
                quiet.setLevel(level)


@functools.cache
def source_tags() -> dict[str, str]:
    """The ``mlflow.source.*`` tags of every run this code creates (the UI's Source column): the pipeline's entry
    point and, when the project is a git checkout, its commit. The same in the driver and in a Ray worker on the
    same checkout; a worker on a copy without ``.git`` (a cluster's working dir) leaves the commit out."""
    tags = {"mlflow.source.name": str(ROOT / "run_pipeline.py"), "mlflow.source.type": "JOB"}
    commit = git_commit(ROOT)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit(root: Path) -> str | None:
    """The commit checked out at ``root``, read from ``.git`` (no git process: a Ray worker may lack the binary):
    HEAD, the ref it names (loose or packed), a worktree's ``gitdir:`` file. None when there is no checkout."""
    try:
        git = root / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        common = git / "commondir"
        bases = [git] + ([(git / common.read_text().strip()).resolve()] if common.is_file() else [])
        for base in bases:
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref) and not line.startswith(("#", "^")):
                        return line.split()[0]
    except (OSError, IndexError):
        return None
    return None


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
