"""MLflow access for the pipeline: explicit run ids through MlflowClient (no global active run, so the same code
is safe in Ray workers and Tune trials), tags to find a sequence's runs again, and idempotent run creation.

Tags (underscored so filters need no quoting): ksm_kind = sequence | backbone | task | tune_sweep | tune_trial |
evaluation, ksm_sequence = the stream run's key, ksm_task = task name, ksm_task_id = its content identity,
ksm_result = a task result's key (backbone, task, method, training, seed), ksm_backbone = backbone key,
ksm_superseded = true on a task run whose task has changed since (ARCHITECTURE.md, "Identity and resume").
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from .store import ensure_store

__all__ = ["Tracker", "PARENT_TAG"]

PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM = 6000  # MLflow's param value limit is 6000 chars (8000 on newer stores); stay under both


def _http_limits() -> None:
    # MLflow's REST client retries for minutes by default; a pipeline should fail within seconds instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class Tracker:
    """One experiment on one tracking URI."""

    def __init__(self, uri: str, experiment_id: str):
        _http_limits()
        self.uri = uri
        self.experiment_id = experiment_id
        self.client = MlflowClient(tracking_uri=uri)

    # -- setup (driver only: concurrent experiment creation races) -----------------------------------------
    @classmethod
    def setup(cls, uri: str, experiment: str, artifact_root: str | None = None) -> "Tracker":
        _http_limits()
        # A fresh sqlite store must exist complete before MlflowClient opens it: MlflowClient would migrate it in
        # place, and another process opening the file meanwhile (mlflow ui, a notebook) collides with that.
        ensure_store(uri)
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            location = Path(artifact_root).absolute().as_uri() if artifact_root and _is_local_store(uri) else None
            try:
                eid = client.create_experiment(experiment, artifact_location=location)
            except Exception:  # created meanwhile by another driver
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                eid = exp.experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            eid = exp.experiment_id
        return cls(uri, eid)

    # -- finding runs -------------------------------------------------------------------------------------
    def find(self, status: str | None = "FINISHED", **tags: str) -> list[Any]:
        """Runs of this experiment with all the given tags (and status), newest first."""
        clauses = [f"tags.{k} = '{v}'" for k, v in tags.items()]
        if status:
            clauses.append(f"attributes.status = '{status}'")
        return self.client.search_runs([self.experiment_id], " and ".join(clauses), max_results=5000,
                                       order_by=["attributes.start_time DESC"])

    def scan(self, status: str | None = "FINISHED", page: int = 500, **tags: str) -> Iterator[Any]:
        """Every run of this experiment with the given tags (and status), a page at a time: one query per
        ``page`` runs instead of one per lookup, without holding them all."""
        clauses = [f"tags.{k} = '{v}'" for k, v in tags.items()] + ([f"attributes.status = '{status}'"] if status else [])
        token = None
        while True:
            runs = self.client.search_runs([self.experiment_id], " and ".join(clauses), max_results=page,
                                           page_token=token)
            yield from runs
            token = runs.token
            if not token:
                return

    def find_one(self, status: str | None = "FINISHED", **tags: str) -> Any | None:
        runs = self.find(status, **tags)
        return runs[0] if runs else None

    # -- writing ------------------------------------------------------------------------------------------
    def start(self, name: str, tags: Mapping[str, str], parent: str | None = None) -> str:
        t = dict(tags)
        if parent:
            t[PARENT_TAG] = parent
        t.setdefault("ksm_host", socket.gethostname())
        return self.client.create_run(self.experiment_id, tags=t, run_name=name).info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def params(self, run_id: str, params: Mapping[str, Any]) -> None:
        ps = [Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items()]
        for i in range(0, len(ps), 100):  # MLflow's per-batch param limit
            self.client.log_batch(run_id, params=ps[i:i + 100])

    def metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(run_id, metrics=ms[i:i + 1000])

    def tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def artifacts(self, run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
        for p in paths:
            self.artifact(run_id, p, artifact_path)

    def download(self, run_id: str, artifact_path: str, dst: str | os.PathLike) -> str:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return self.client.download_artifacts(run_id, artifact_path, str(dst))


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
