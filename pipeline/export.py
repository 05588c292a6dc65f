"""A sequence's tasks as ONE served model: an MLflow pyfunc model holding the backbone and every FINISHED task's
artifact, registered in the Model Registry under ``registry.model_name`` (default: the run name).

``export_after_sequence`` runs at the end of ``mode=sequence`` (skipped when the newest version already holds
exactly these task runs, so a rerun that trained nothing adds no version); ``run_export`` is ``mode=export``
(always a new version). Each export is an ``export-<model name>`` run (tag ``ksm_sequence_run``: the sequence's run)
with the model logged on it (the UI's Models column) and registered as the next version.

The model is logged from code, as MLflow's models from code: its entry file is ``pipeline/served_model.py``
(checked in; its last line is ``set_model(MultiTaskModel())``), with ``pipeline/served.py`` and ``ksm_core`` in the
model's ``code/`` folder; its data are safetensors files (the backbone, one artifact per task) and a JSON spec with
each task's classes, stored image shape and eval transform. Nothing of ours is pickled.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import RunConfig, stable_hash
from .data import Manifest, iter_samples, make_loader
from .errors import Log, PipelineError
from .lineage import CHAIN_ARTIFACT, chain_class, open_inputs, trained_chain, trained_sequence
from .records import TaskResult
from .tracking import Tracker, filter_value

__all__ = ["export_model", "export_after_sequence", "run_export", "model_name", "served_tasks", "model_files"]

SERVED_CODE = Path(__file__).with_name("served.py")         # the model's code: imports only ksm_core
SERVED_ENTRY = Path(__file__).with_name("served_model.py")  # MLflow's entry file: set_model(MultiTaskModel())
_PROGRESS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
CONTENT_TAG = "ksm_content"  # on a model version: hash of the backbone and the task runs it holds


def model_name(rc: RunConfig) -> str:
    return rc.registry.model_name or rc.run_name


def served_tasks(m: Manifest, backbone_run: Any, task_runs: dict[str, Any], transform: str = "cifar",
                 chain: bool = False) -> list[dict[str, Any]]:
    """What the served model needs of each task, the backbone's own initial task first (index 0, no artifact):
    classes, stored image shape, and the eval transform exactly as the loader built it for the task's test split
    (so predictions reproduce the logged accuracy), with the run and accuracy it comes from. A ``chain``'s tasks
    are its links (``task_runs`` holds link 0, the initial task retrained, too), each with its ``index`` in it."""
    out = []
    first = task_runs[m.initial_task] if chain else backbone_run
    for name, run in [(m.initial_task, first), *((t, task_runs[t]) for t in m.new_tasks if t in task_runs)]:
        info = m.task(name)
        tf = make_loader(m, name, "test", transform=transform).transform  # builds the transform only: reads no shard
        out.append({"name": name, "artifact": None if run is backbone_run else f"tasks/{name}.safetensors",
                    "classes": list(info.class_names), "image_shape": list(info.image_shape),
                    "transform": tf.name, "image_size": tf.image_size, "resize_size": tf.resize_size,
                    "channels": tf.channels,
                    "mean": tf.mean.flatten().tolist(), "std": tf.std.flatten().tolist(),
                    "run_id": run.info.run_id, "test_acc": run.data.metrics.get("test_acc"),
                    **({"artifact": None, "index": len(out)} if chain else {})})
    return out


@contextlib.contextmanager
def _fluent(uri: str) -> Iterator[None]:
    """MLflow's model logging is fluent-only (process-global URIs, which it also exports as environment variables
    for subprocesses, and an active run): point it at this store for the export, quietly, and put back exactly
    what was there before, unset included (a URI left set would redirect every later client of this process)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", _PROGRESS)
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = tracking_state._tracking_uri, registry_state._registry_uri  # None when never set
    os.environ[_PROGRESS] = "false"  # one download bar per task artifact would flood the driver's log
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_state._registry_uri = saved[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _signature() -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # image: object, not uint8 (N, H, W, C): MLflow checks a tensor's dtype and rank before predict() sees it, so
    # a uint8 4-D spec would refuse the (N, H, W) form and answer a float image with its own message instead of
    # one naming the row. The model checks the images itself (served.MultiTaskModel); the docstring and the
    # version's description say the form: uint8 (N, H, W) or (N, H, W, C).
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(str), (-1,), "task"),
                                         TensorSpec(np.dtype(object), (-1,), "image")]),
                          outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,), "class")]))


def _requirements() -> list[str]:
    import mlflow
    import numpy
    import safetensors
    import torch

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={numpy.__version__}", f"safetensors=={safetensors.__version__}"]


def _example(m: Manifest, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Two real test images of up to two tasks, as a request: the model's input example (shown in the UI and
    written as serving_input_example.json)."""
    import numpy as np

    names, images = [], []
    for d in [d for d in tasks if d["artifact"]][:2] or tasks[:1]:
        for _, image, _ in iter_samples(m, d["name"], "test"):
            names.append(d["name"])
            images.append(image)
            break
    shapes = {im.shape for im in images}
    if len(shapes) > 1:  # tasks of different shapes cannot share one array: one task only
        names, images = names[:1], images[:1]
    return {"task": np.array(names), "image": np.stack(images)}


def model_files(tmp: Path, root: Path) -> dict[str, Any]:
    """What makes a folder ``root`` (backbone, tasks, spec) a pyfunc model, as ``mlflow.pyfunc.log_model`` /
    ``save_model`` take it: the entry file (``served_model.py``, as it is checked in), the code it runs
    (``served.py`` and ``ksm_core``, each copied into the model's ``code/``), the signature and the pinned
    requirements. ``ksm_core`` is staged under ``tmp`` first, without its bytecode caches."""
    import ksm_core

    core = tmp / "code" / "ksm_core"
    shutil.copytree(Path(ksm_core.__file__).parent, core, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return {"python_model": str(SERVED_ENTRY), "artifacts": {"ksm": str(root)},
            "code_paths": [str(SERVED_CODE), str(core)], "signature": _signature(), "pip_requirements": _requirements()}


def _latest_version(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:  # quoted for the filter: a name holding a quote must not turn into another filter (or a parse error)
        versions = client.search_model_versions(f"name = {filter_value(name)}", order_by=["version_number DESC"],
                                                max_results=1)
    except MlflowException:
        return None
    return versions[0] if versions else None


def _add_chain(tr: Tracker, rc: RunConfig, fp: str, tasks: list[dict[str, Any]], task_runs: dict[str, Any],
               root: Path, dl: Path) -> dict[str, Any]:
    """A chain's model data: the chain file its last served link logged (which holds every earlier task), checked
    to be the chain that run was tagged with, on this backbone, with exactly the served tasks; moved into
    ``root``. Returns the spec's chain fields."""
    last = task_runs[tasks[-1]["name"]]
    path = tr.download(last.info.run_id, CHAIN_ARTIFACT, dl)
    meta = chain_class(rc.method.name).read_chain_metadata(path)
    want = last.data.tags.get("ksm_chain_fingerprint")
    if meta["fingerprint"] != want or meta["backbone_fingerprint"] != fp or \
            [t["task_name"] for t in meta["tasks"]] != [d["name"] for d in tasks]:
        raise PipelineError(f"the chain logged by run {last.info.run_id} ({tasks[-1]['name']}) is not the one its "
                            "run was tagged with, on this backbone: delete that run and re-run the sequence")
    shutil.move(path, root / "chain.safetensors")
    return {"chain": "chain.safetensors", "chain_fingerprint": want}


def export_model(rc: RunConfig, tr: Tracker, m: Manifest, parent_run_id: str, backbone_run_id: str,
                 task_runs: dict[str, Any], log: Log = print, only_if_changed: bool = False) -> dict[str, Any]:
    """Package the backbone and ``task_runs`` (task -> its FINISHED run) as one pyfunc model, log it on a new
    ``export`` run of the sequence and register it under :func:`model_name` as a new version. Returns
    {"name", "version", "uri", "run_id", "tasks"}; with ``only_if_changed``, an unchanged newest version is
    returned instead of a new one ({"skipped": True, ...})."""
    import mlflow

    from ksm_core import read_metadata

    from mlflow import MlflowClient

    name = model_name(rc)
    registry = MlflowClient(tracking_uri=tr.uri, registry_uri=tr.uri)  # the registry of this store, whatever is set
    bb = tr.client.get_run(backbone_run_id)
    fp = bb.data.tags.get("ksm_fingerprint", "")
    chain = rc.method.sequential()
    tasks = served_tasks(m, bb, task_runs, transform=rc.data.transform, chain=chain)
    content = stable_hash({"backbone": fp, "tasks": [(d["name"], d["run_id"]) for d in tasks]})
    latest = _latest_version(registry, name)
    if only_if_changed and latest is not None and latest.tags.get(CONTENT_TAG) == content:
        log(f"[export] model {name} version {latest.version} already holds these {len(tasks)} tasks; "
            f"load it with mlflow.pyfunc.load_model('models:/{name}/{latest.version}')")
        return {"name": name, "version": int(latest.version), "uri": f"models:/{name}/{latest.version}",
                "run_id": latest.run_id, "tasks": [d["name"] for d in tasks], "skipped": True}

    t0 = time.perf_counter()
    # a top-level run (not a child of the sequence's: those are its tasks), tied to it by a tag
    run_id = tr.start(f"export-{name}", {"ksm_kind": "export", "ksm_model_name": name,
                                         "ksm_sequence_run": parent_run_id})
    with tr.running(run_id):
        with _fluent(tr.uri), tempfile.TemporaryDirectory(prefix="ksm-export-") as tmp:
            root = Path(tmp) / "ksm"
            (root / "tasks").mkdir(parents=True)
            shutil.move(tr.download(backbone_run_id, "backbone/backbone.safetensors", Path(tmp) / "dl"),
                        root / "backbone.safetensors")
            # a chain: its last link's file holds every task; mask tasks: one artifact each
            extra = _add_chain(tr, rc, fp, tasks, task_runs, root, Path(tmp) / "dl") if chain else {}
            for d in [] if chain else tasks[1:]:
                path = tr.download(d["run_id"], f"task/{d['name']}.safetensors", Path(tmp) / "dl")
                if read_metadata(path)["backbone_fingerprint"] != fp:
                    raise PipelineError(f"task {d['name']} (run {d['run_id']}) was trained on another backbone than "
                                        f"run {backbone_run_id}; it cannot be served with it")
                shutil.move(path, root / d["artifact"])
            spec = {"format": "ksm-served/1", "backbone": "backbone.safetensors", "backbone_fingerprint": fp,
                    "model": {"name": rc.model.name, "width": rc.model.width,
                              "num_classes": m.task(m.initial_task).num_classes},
                    "method": rc.method.name, "sequence_run_id": parent_run_id, "tasks": tasks, **extra,
                    # what one request may hold: checked by the model before it converts a pixel
                    "limits": {"max_rows": rc.registry.serve_max_rows, "max_pixels": rc.registry.serve_max_pixels}}
            (root / "ksm_model.json").write_text(json.dumps(spec, indent=1))
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model", **model_files(Path(tmp), root), input_example=_example(m, tasks),
                    registered_model_name=name, metadata={"ksm_format": "ksm-served/1", "tasks": len(tasks)})
        version = str(info.registered_model_version)
        names = [d["name"] for d in tasks]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        registry.set_model_version_tag(name, version, CONTENT_TAG, content)
        registry.set_model_version_tag(name, version, "ksm_sequence_run", parent_run_id)
        registry.update_model_version(name, version, description=(
            f"ksm: one frozen backbone ({rc.model.name}, fingerprint {fp[:12]}) and {len(tasks)} tasks ({shown}). "
            f"predict({{'task': np.array([...task names...]), 'image': uint8 array (N, H, W) or (N, H, W, C)}}) -> "
            f"int64 class index per row; rows of different tasks may be mixed. Over REST: POST /invocations "
            f"{{\"inputs\": {{\"task\": [...], \"image\": [...]}}}}."))
        tr.params(run_id, {"model_name": name, "model_version": version, "tasks": len(tasks),
                           "backbone_run_id": backbone_run_id, "backbone_fingerprint": fp})
        tr.metrics(run_id, {"export_seconds": time.perf_counter() - t0, "tasks": len(tasks)})
    uri = f"models:/{name}/{version}"
    log(f"[export] registered model {name} version {version}: backbone + {len(tasks) - 1} task(s) "
        f"(+ the backbone's own {m.initial_task}); load it with mlflow.pyfunc.load_model('{uri}')")
    return {"name": name, "version": int(version), "uri": uri, "run_id": run_id, "tasks": names, "skipped": False}


def export_after_sequence(rc: RunConfig, tr: Tracker, m: Manifest, parent_run_id: str, backbone_run_id: str,
                          results: list[TaskResult], log: Log = print) -> dict[str, Any] | None:
    """The end of ``mode=sequence``: export the sequence's FINISHED tasks (``results``: the report's per-task
    records) unless ``registry.export`` is off or the newest version already holds them. A failed export does not
    fail the sequence (its tasks are saved): it is logged, tagged on the sequence run (``ksm_export_error``), and
    ``mode=export`` retries it."""
    if not rc.registry.export:
        return None
    if len(results) > rc.registry.export_max_tasks:
        # an export copies every task's artifact into a new model version: 106 s for 1000 tiny tasks here, paid
        # again by every append; a long stream exports when asked
        log(f"[export] skipped at the end of the sequence: {len(results)} tasks > registry.export_max_tasks="
            f"{rc.registry.export_max_tasks}; register them with the same command and mode=export")
        return None
    runs = {r.task: tr.client.get_run(r.run_id) for r in results if r.run_id}
    try:
        return export_model(rc, tr, m, parent_run_id, backbone_run_id, runs, log, only_if_changed=True)
    except Exception as e:  # noqa: BLE001  (reported, tagged and retriable; the tasks themselves are saved)
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        log(f"[export] FAILED, the tasks are saved; retry with the same command and mode=export: {msg}")
        tr.tags(parent_run_id, {"ksm_export_error": msg})
        return None


def run_export(rc: RunConfig, log: Log = print) -> dict[str, Any]:
    """mode=export: the sequence this config names (same run name and spec), every task with a FINISHED run,
    as a new version of the registered model."""
    p = open_inputs(rc, log)
    tr, m = p.tracker, p.manifest
    if rc.method.sequential():  # a chain: its links up to the first without a run (each needs the one before)
        parent, bb_run, links = trained_chain(tr, rc, m, "export")
        done = {ln.task: ln.run for ln in links if ln.run is not None}
    else:
        parent, bb_run, done = trained_sequence(tr, rc, m, "export")
    missing = [t for t in m.new_tasks if t not in done]
    if missing:
        log(f"[export] not trained yet, left out: {', '.join(missing)}")
    return export_model(rc, tr, m, parent.info.run_id, bb_run.info.run_id, done, log)
