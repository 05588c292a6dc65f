"""The resolved run configuration: Hydra's config turned into a validated plain dict, before any work starts.

Workers only ever see this plain dict (no OmegaConf, no relative paths). Validation runs every check that does
not need Ray or MLflow, so a typo costs seconds, not a backbone training.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ksm_core import METHODS, TrainConfig, list_models, mask_spec

from .errors import PipelineError

__all__ = ["PipelineError", "resolve", "validate", "stable_hash", "check_tracking_uri", "check_ray_address",
           "mask_hparams", "method_params", "train_config"]

MODES = ("sequence", "tune", "shards", "evaluate")


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short hash of a JSON-able object, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def resolve(cfg: Any) -> dict[str, Any]:
    """OmegaConf config -> plain dict with every path absolute (relative paths are taken from the cwd)."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(d, dict)
    d.pop("hydra", None)
    if d.get("overrides_file"):
        apply_overrides_file(d, d["overrides_file"])
    for k, v in list(d.get("paths", {}).items()):
        if v is not None and "://" not in str(v) and not str(v).startswith("pipe:"):
            d["paths"][k] = str(Path(v).expanduser().absolute())
    tr = d.get("tracking", {})
    if tr.get("artifact_root"):
        tr["artifact_root"] = str(Path(tr["artifact_root"]).expanduser().absolute())
    tr["uri"] = absolute_tracking_uri(tr.get("uri") or "")
    if d.get("model", {}).get("weights_path"):
        d["model"]["weights_path"] = str(Path(d["model"]["weights_path"]).expanduser().absolute())
    if d.get("testing", {}).get("crash_once_marker"):
        d["testing"]["crash_once_marker"] = str(Path(d["testing"]["crash_once_marker"]).absolute())
    return d


def absolute_tracking_uri(uri: str) -> str:
    """A local store's URI with an absolute path: a relative one is relative to the cwd, which Ray Tune changes
    for every trial (and a Ray worker need not share). sqlite:///rel.db, file:rel, file:./rel and a plain path
    are made absolute; server URIs and absolute paths are returned as they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().absolute())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return Path(uri[len("file:"):]).expanduser().absolute().as_uri()
    if uri and "://" not in uri and ":" not in uri.split("/", 1)[0] and uri not in ("databricks", "databricks-uc"):
        return str(Path(uri).expanduser().absolute())
    return uri


OVERRIDABLE = ("method", "train")


def apply_overrides_file(d: dict[str, Any], path: str) -> None:
    """Merge a YAML file's ``method:`` / ``train:`` sections over the config (a Tune sweep writes such a file).

    Keys in the file win over the composed config; keys the file lacks keep their config value.
    """
    import yaml

    p = Path(path).expanduser().absolute()
    if not p.is_file():
        raise PipelineError(f"overrides_file={path!r} does not exist (resolved to {p}); give the path of a YAML "
                            "with method:/train: sections, e.g. the best.yaml a `mode=tune` run printed")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict) or not set(data) <= set(OVERRIDABLE) or not data:
        raise PipelineError(f"overrides_file {p} must be a mapping with only these sections: "
                            f"{', '.join(OVERRIDABLE)}; found: {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    for sec, vals in data.items():
        if not isinstance(vals, dict):
            raise PipelineError(f"overrides_file {p}: section {sec!r} must be a mapping")
        unknown = set(vals) - set(d[sec]) - ({"tau", "k", "T", "init"} if sec == "method" else set())
        if unknown:
            raise PipelineError(f"overrides_file {p}: unknown key(s) {sorted(unknown)} in {sec!r}; "
                                f"valid: {sorted(d[sec])}")
        if sec == "method" and vals.get("name") not in (None, d["method"]["name"]):
            d["method"] = {"name": vals["name"]}  # another method: don't carry the old method's hparams
        d[sec].update(vals)
    d["overrides_file"] = str(p)


def mask_hparams(method: dict[str, Any]) -> dict[str, float]:
    return {k: method[k] for k in ("tau", "k", "T", "init") if method.get(k) is not None}


def method_params(method: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """The method's name and the hyperparameters it actually uses, as run params: T and k only for the softmax
    trick, tau and the mask lr only for masked methods, lr_finetune only for the fine-tune baseline. A param
    that had no effect would read, in the MLflow UI, as a setting that was compared."""
    spec = mask_spec(method["name"], **mask_hparams(method))
    out: dict[str, Any] = {"method": method["name"]}
    if spec.masked:
        out.update(tau=spec.tau, init=spec.init)
        if spec.binarizer == "softmax":
            out.update(k=spec.k, T=spec.T)
        out["lr_mask"] = train["lr_mask"]
    else:
        out["lr_finetune"] = train["lr_finetune"]
    out["lr_head"] = train["lr_head"]
    return out


def train_config(train: dict[str, Any], **over: Any) -> TrainConfig:
    keys = ("epochs", "lr_mask", "lr_head", "lr_finetune", "weight_decay", "schedule", "device", "amp",
            "channels_last")
    kw = {k: train[k] for k in keys if k in train}
    kw.update(over)
    return TrainConfig(**kw)


def _positive(name: str, v: Any, allow_zero: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise PipelineError(f"{name}={v!r} must be a number {'>= 0' if allow_zero else '> 0'}")


def validate(d: dict[str, Any]) -> None:
    """Every check that needs neither Ray nor MLflow. Raises PipelineError naming the key and the fix."""
    if d.get("mode") not in MODES:
        raise PipelineError(f"mode={d.get('mode')!r} is not a mode; valid modes: {', '.join(MODES)}")
    model = d["model"]
    if model.get("name") not in list_models():
        raise PipelineError(f"model.name={model.get('name')!r} is unknown; valid models: {', '.join(list_models())}")
    if model.get("weights_path") and not os.path.isfile(model["weights_path"]):
        raise PipelineError(f"model.weights_path={model['weights_path']!r} does not exist; give a local state_dict "
                            "file or set model.weights_path=null to train the backbone on the initial task")
    method = d["method"]
    if method.get("name") not in METHODS:
        raise PipelineError(f"method.name={method.get('name')!r} is unknown; valid methods: {', '.join(METHODS)}")
    try:
        mask_spec(method["name"], **mask_hparams(method))
        train_config(d["train"])
    except ValueError as e:
        raise PipelineError(f"invalid method/train setting: {e}") from None
    bb = d["train"].get("backbone", {})
    _positive("train.backbone.lr", bb.get("lr"))
    if not (isinstance(bb.get("epochs"), int) and bb["epochs"] >= 1):
        raise PipelineError(f"train.backbone.epochs={bb.get('epochs')!r} must be an int >= 1")
    for key, v in (("train.batch_size", d["train"].get("batch_size")),
                   ("train.backbone.batch_size", bb.get("batch_size")),
                   ("data.shuffle_buffer", d.get("data", {}).get("shuffle_buffer", 1))):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise PipelineError(f"{key}={v!r} must be an int >= 1")
    cl = d["cluster"]
    _positive("cluster.cpus_per_task", cl.get("cpus_per_task"))
    _positive("cluster.gpus_per_task", cl.get("gpus_per_task"), allow_zero=True)
    retries = cl.get("max_retries", 2)
    if not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= -1):
        raise PipelineError(f"cluster.max_retries={retries!r} must be an int >= 0 (or -1: retry forever)")
    if cl["gpus_per_task"] > 1 and cl["gpus_per_task"] != int(cl["gpus_per_task"]):
        raise PipelineError(f"cluster.gpus_per_task={cl['gpus_per_task']} must be a fraction <= 1 or a whole number")
    h = d.get("data", {}).get("holdout", 0.0)
    if not (isinstance(h, (int, float)) and 0 <= h < 1):
        raise PipelineError(f"data.holdout={h!r} must be in [0, 1)")
    if d.get("data", {}).get("on_corrupt", "fail") not in ("fail", "skip"):
        raise PipelineError(f"data.on_corrupt={d['data']['on_corrupt']!r}; valid: fail, skip")
    uri = d["tracking"].get("uri", "")
    if not uri:
        raise PipelineError("tracking.uri is empty; use tracking=local (sqlite file) or tracking.uri=http://host:port")
    if d["mode"] == "tune":
        from .tune import check_tune

        check_tune(d)


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, naming the URI, when a tracking server does not answer."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status != 200:
                    raise PipelineError(f"MLflow tracking server {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise PipelineError(f"MLflow tracking server {uri} is not reachable ({reason}); start it "
                                "(cluster/start_mlflow_server.sh) or fix tracking.uri") from None
    elif scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(f"tracking.uri={uri}: cannot create folder {path.parent} ({e}); "
                                "set paths.root or tracking.uri to a writable place") from None
    elif scheme not in ("file", "", "databricks", "postgresql", "mysql", "mssql"):
        raise PipelineError(f"tracking.uri={uri!r} has an unsupported scheme {scheme!r}; use sqlite:///abs/path.db "
                            "or http://host:port")


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """For host:port and ray://host:port addresses, a TCP connect with a timeout (ray.init itself can hang for
    a minute on a wrong address). 'local' and 'auto' need no check."""
    if address in ("local", "auto", "", None):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"cluster.address={address!r} is not local, auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise PipelineError(f"Ray cluster at {address} is not reachable ({e}); check cluster.address / RAY_ADDRESS "
                            "(`ray status` on the head node shows the address)") from None
