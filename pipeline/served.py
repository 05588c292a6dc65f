"""The served multi-task model: one frozen backbone and every task's mask, BN and head in ONE ``KSMNet`` (for a
PackNet / CPG stream: its chain, ``ksm_core.packnet``), behind MLflow's pyfunc interface. A request names the task of each row; rows of different tasks may be mixed in one call:
they are grouped by task and each group runs with that task's mask, BN and head::

    import mlflow, numpy as np
    model = mlflow.pyfunc.load_model("models:/split_fashion_mnist-ksm/1")
    classes = model.predict({"task": np.array(["t1", "t3", "t1"]),
                             "image": images})       # uint8 (3, 28, 28) or (3, 28, 28, 1), pixels 0..255
    # -> np.ndarray int64 (3,): the class index of each row within its task (ksm_model.json lists the names)

Over REST (``mlflow models serve -m models:/<name>/<version>``): ``POST /invocations`` with
``{"inputs": {"task": ["t1", "t3"], "image": [[[0, 12, ...], ...], ...]}}`` answers
``{"predictions": [1, 0]}``.

An image is preprocessed exactly as the task's test images were when its accuracy was logged: the task's own
transform as the spec records it (``transform``), from ``ksm_core.transforms``. ``cifar``
(``eval_transform``): scale to [0, 1], bilinear resize to the network's input size, grey to 3 channels, the task's
mean/std; an image must have the task's stored shape (H, W, C), or (H, W) for a grey task, nothing else is
resized. ``imagenet`` (``imagenet_eval_transform``): Resize(``resize_size``, shorter side) + CenterCrop
(``image_size``) on the uint8 image, then ImageNet's mean/std; an image may have any size (H, W) with the task's
channel count: one request's images share one size (they are one array). So the model reproduces the logged
accuracy on the same images (full-resolution pixels: the loader decodes test JPEGs at full scale too).

A bad request (an unknown task, a wrong shape, pixels that are not uint8) raises :class:`BadRequest` naming the first bad row and the form the row's
task expects; over REST it is an HTTP 400 with that message.

A request is bounded: at most ``max_rows`` rows and ``max_pixels`` pixels (the spec's ``limits``, written at export
from ``registry.serve_max_rows`` / ``serve_max_pixels``; :data:`DEFAULT_LIMITS` for a spec without them;
``model_config`` at load overrides both). Its size and shape are checked before any pixel is converted, and a
REST request's pixels (JSON numbers: an object array) are converted to uint8 a slice at a time, never as one
float64 copy of the whole request. MLflow's scoring server itself parses the whole JSON body before the model sees
it, with no limit of its own: cap the body in front of it (a proxy) when it faces untrusted clients.

Loading reads safetensors only (the backbone and one artifact per task, ``ksm_core.load_task``; for a PackNet or
CPG stream, the one chain file its last link left, ``load_chain``) and a JSON spec: no task artifact is ever
unpickled. The backbone's fingerprint (and a chain's) is checked against the one recorded at export.

This file is also the model's code as MLflow stores it ("models from code"): ``pipeline.export`` writes it
verbatim into the logged model, followed by one ``mlflow.models.set_model(MultiTaskModel())`` line, with
``ksm_core`` beside it in the model's ``code/`` folder. So it imports nothing from ``pipeline``: a model loads
wherever torch, numpy, safetensors and MLflow are installed.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from ksm_core.transforms import TRANSFORMS, eval_transform, imagenet_eval_transform, resize_matrix

__all__ = ["MultiTaskModel", "BadRequest", "SPEC_FILE", "FORMAT", "DEFAULT_LIMITS", "eval_transform",
           "imagenet_eval_transform", "resize_matrix"]

FORMAT = "ksm-served/1"
SPEC_FILE = "ksm_model.json"   # in the model's artifact folder "ksm", beside backbone.safetensors and tasks/
_NAMED = 10                    # tasks named in an "unknown task" message before "..."
#: one request's bounds when the spec has none (a model exported before they existed): 4096 rows, 16 Mi pixels
#: (4096 images of 64x64; the uint8 request is 16 MiB, its JSON ~60 MB). The config's defaults are the same.
DEFAULT_LIMITS = {"max_rows": 4096, "max_pixels": 1 << 24}
_SLICE = 1 << 16               # pixels of a REST request converted at once (their float64 copy: 512 KiB)


class BadRequest(MlflowException, ValueError):
    """A request the model cannot answer; the message names the first bad row and what its task expects.
    An MlflowException with INVALID_PARAMETER_VALUE, so MLflow's scoring server answers HTTP 400 with it."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class _Task:
    """One served task: its index in the network and how its images are checked and preprocessed."""

    def __init__(self, d: dict[str, Any], index: int):
        self.name: str = d["name"]
        self.index = index
        self.classes: list[str] = list(d["classes"])
        self.shape = tuple(int(v) for v in d["image_shape"])  # (H, W, C) as stored in the task's shards
        self.size, self.channels = int(d["image_size"]), int(d["channels"])
        # the task's transform protocol (a spec written before there was a choice is cifar) and its eval resize
        self.transform = str(d.get("transform", "cifar"))
        if self.transform not in TRANSFORMS:
            raise MlflowException(f"task {self.name!r}: transform {self.transform!r} is not one this code applies "
                                  f"({', '.join(TRANSFORMS)}); export the model again with this version")
        self.resize = int(d["resize_size"]) if d.get("resize_size") is not None else None
        if self.transform == "imagenet" and (self.resize is None or self.resize < self.size):
            raise MlflowException(f"task {self.name!r}: the imagenet transform needs resize_size >= image_size "
                                  f"({self.size}) in the spec, got {d.get('resize_size')!r}; export the model again")
        self.mean = torch.tensor(d["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(d["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def expected(self) -> str:
        h, w, c = self.shape
        if self.transform == "imagenet":  # resized and centre-cropped: any size
            return "uint8 H x W" + (" or H x W x 1" if c == 1 else f" x {c}") + " of any size, pixels 0..255"
        return f"uint8 {h}x{w}" + (f" or {h}x{w}x1" if c == 1 else f"x{c}") + " (H x W x C), pixels 0..255"


class MultiTaskModel(PythonModel):
    """Every task of a ksm sequence in one network: ``predict({"task": names (N,), "image": uint8 (N,H,W) or
    (N,H,W,C)})`` -> int64 (N,) class indices, rows of different tasks mixed freely.

    Example::

        import mlflow, numpy as np
        model = mlflow.pyfunc.load_model("models:/split_fashion_mnist-ksm/1")
        model.predict({"task": np.array(["t1", "t2"]), "image": np.zeros((2, 28, 28), np.uint8)})
        # array([0, 1])

    ``model_config={"device": "cuda"}`` at load runs it on a GPU (default: cpu); ``"batch_size"`` (default 256)
    caps the rows one forward pass takes; ``"threads"`` sets torch's CPU threads for the process (default: torch's
    own; on a busy machine 1 thread per server process is much faster, see benchmarks/RESULTS.md);
    ``"max_rows"`` / ``"max_pixels"`` replace the spec's request limits.
    """

    # predict() checks its input itself (naming the bad row); MLflow's type-hint validation of it is off (the flag
    # MLflow's own ChatModel uses), and the logged signature names the inputs and output
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from safetensors.torch import load_file

        from ksm_core import KSMNet, create_model, load_task

        root = Path(context.artifacts["ksm"])
        spec = json.loads((root / SPEC_FILE).read_text())
        if spec.get("format") != FORMAT:
            raise MlflowException(f"{root / SPEC_FILE} has format {spec.get('format')!r}; this code reads {FORMAT!r}")
        config = dict(getattr(context, "model_config", None) or {})
        self.device = torch.device(config.get("device", "cpu"))
        self.batch_size = int(config.get("batch_size", 256))
        limits = {**DEFAULT_LIMITS, **spec.get("limits", {}), **{k: config[k] for k in DEFAULT_LIMITS if k in config}}
        self.max_rows, self.max_pixels = int(limits["max_rows"]), int(limits["max_pixels"])
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        m = spec["model"]
        backbone = create_model(m["name"], num_classes=int(m["num_classes"]),
                                **({"width": m["width"]} if m.get("width") is not None else {}))
        backbone.load_state_dict(load_file(str(root / spec["backbone"])))
        self.tasks: dict[str, _Task] = {}
        if spec.get("chain"):  # a PackNet / CPG chain: every task in the one file its last link left
            net = self._load_chain(backbone, root, spec)
        else:
            net = KSMNet.from_backbone(backbone, copy_backbone=False)
            for d in spec["tasks"]:
                index = 0 if d.get("artifact") is None else load_task(net, root / d["artifact"], name=d["name"])
                self.tasks[d["name"]] = _Task(d, index)
        if net.backbone_fingerprint != spec["backbone_fingerprint"]:
            raise MlflowException(f"the model's backbone does not hash to the fingerprint recorded at export "
                                  f"({spec['backbone_fingerprint'][:12]}...): its files were changed; export it again")
        self.net = net.to(self.device).eval()
        self.spec = spec
        self._lock = threading.Lock()  # set_task switches the whole network: one request's group at a time

    def _load_chain(self, backbone: torch.nn.Module, root: Path, spec: dict[str, Any]) -> Any:
        """A sequential method's chain (``ksm_core.packnet`` / ``ksm_core.cpg``: safetensors + JSON, checked
        against its own fingerprint on load), its tasks indexed by their link in the chain, as the spec lists them."""
        from ksm_core.cpg import CHAINS

        cls = CHAINS.get(spec.get("method"))
        if cls is None:
            raise MlflowException(f"{SPEC_FILE}: a chain of method {spec.get('method')!r}; this code serves packnet "
                                  "and cpg chains")
        net = cls.load_chain(backbone, root / spec["chain"])
        if net.chain_fingerprint(net.num_tasks - 1) != spec.get("chain_fingerprint"):
            raise MlflowException(f"{spec['chain']} is not the chain recorded at export: export the model again")
        for d in spec["tasks"]:
            index = int(d["index"])
            if not 0 <= index < net.num_tasks or net.task_names[index] != d["name"]:
                raise MlflowException(f"{SPEC_FILE}: task {d['name']!r} is not link {index} of the chain")
            self.tasks[d["name"]] = _Task(d, index)
        return net

    # ---------------------------------------------------------------------------------------------- checks
    def _rows(self, model_input: Any) -> tuple[np.ndarray, np.ndarray]:
        """The request's task names and uint8 images, checked cheapest first and before any pixel is converted:
        its form, its size against the limits, the task names, each task's image shape; then the pixels."""
        if not isinstance(model_input, dict) or "task" not in model_input or "image" not in model_input:
            raise BadRequest('the input must be {"task": task names (N,), "image": uint8 images (N, H, W) or '
                             '(N, H, W, C)}; over REST: {"inputs": {"task": [...], "image": [...]}}, got '
                             f"{type(model_input).__name__}"
                             + (f" with keys {sorted(model_input)}" if isinstance(model_input, dict) else ""))
        n = _length(model_input["task"], "task")
        if n > self.max_rows:
            raise BadRequest(f"the request has {n} rows; this model takes at most {self.max_rows} rows a request: "
                             "split it into smaller requests (the limit is max_rows in the model's spec)")
        tasks = np.asarray(model_input["task"])
        image = model_input["image"]
        if tasks.ndim != 1:
            raise BadRequest(f"task must be one name per row, shape (N,); got shape {tasks.shape}")
        if _length(image, "image") != n:
            got = f"shape {image.shape}" if isinstance(image, np.ndarray) else f"{len(image)} rows"
            raise BadRequest(f"image must be (N, H, W) or (N, H, W, C) with N = {n} rows (one per task name); got "
                             f"{got}")
        if not isinstance(image, np.ndarray):
            image = np.asarray(image)  # a caller's own lists, their rows already counted
        if image.ndim not in (3, 4) or image.shape[0] != n:
            raise BadRequest(f"image must be (N, H, W) or (N, H, W, C) with N = {n} rows (one per task "
                             f"name); got shape {image.shape}")
        if image.size > self.max_pixels:
            raise BadRequest(f"the request has {image.size} pixels ({n} images of {'x'.join(map(str, image.shape[1:]))})"
                             f"; this model takes at most {self.max_pixels} pixels a request: split it into smaller "
                             "requests (the limit is max_pixels in the model's spec)")
        known = [str(t) for t in tasks]
        for i, t in enumerate(known):
            if t not in self.tasks:
                names = list(self.tasks)
                shown = ", ".join(names[:_NAMED]) + (f", ... ({len(names)} in all)" if len(names) > _NAMED else "")
                raise BadRequest(f"row {i}: unknown task {t!r}; this model serves: {shown}")
        for name in dict.fromkeys(known):
            self._check_shape(self.tasks[name], image, known.index(name))
        if image.dtype != np.uint8:
            image = self._as_uint8(image, known)
        return np.asarray(known), image

    def _as_uint8(self, image: np.ndarray, tasks: list[str]) -> np.ndarray:
        """A REST request's pixels arrive as JSON values (an object array): whole numbers 0..255 are pixels; a
        string ("7"), a boolean (true), null or a list is not, though numpy would cast the first two. Converted a
        slice of rows at a time (a whole request's float64 copy would be 8 bytes a pixel, plus its masks). Any
        numpy dtype but uint8 and object is refused (no silent casts). Errors name the first bad row."""
        if image.dtype != object:
            self._refuse(0, tasks, f"dtype {image.dtype}")
        out = np.empty(image.shape, np.uint8)
        step = max(1, _SLICE // max(1, int(np.prod(image.shape[1:]))))
        for start in range(0, len(image), step):
            part = image[start:start + step]
            if not all(map(_is_number_type, set(map(type, part.ravel().tolist())))):  # C loops: ~1 ms a slice
                row, v = next((start + i, v) for i, r in enumerate(part) for v in r.flat if not _is_number(v))
                self._refuse(row, tasks, f"values that are not numbers: a {type(v).__name__} ({v!r:.40})")
            try:
                values = part.astype(np.float64)  # exact for every pixel value; keeps a fraction visible
            except (OverflowError, ValueError, TypeError):  # an integer too large for a float
                row = start + next((i for i, r in enumerate(part) if not _fits(r)), 0)
                self._refuse(row, tasks, "values that are not whole numbers 0..255")
            flat = values.reshape(len(values), -1)
            ok = ((flat == np.floor(flat)) & (flat >= 0) & (flat <= 255)).all(1)
            if not ok.all():
                self._refuse(start + int(np.flatnonzero(~ok)[0]), tasks, "values that are not whole numbers 0..255")
            out[start:start + step] = values
        return out

    def _refuse(self, row: int, tasks: list[str], got: str) -> NoReturn:
        t = self.tasks[tasks[row]]
        raise BadRequest(f"row {row} (task {t.name!r}): image pixels must be uint8 (whole numbers 0..255), got "
                         f"{got}; expected {t.expected()}")

    def _check_shape(self, t: _Task, image: np.ndarray, row: int) -> None:
        h, w, c = t.shape
        got = image.shape[1:]
        if got == (h, w, c) or (c == 1 and got == (h, w)):
            return
        if t.transform == "imagenet" and min(got[:2]) >= 1 and (got[2:] == (c,) or (c == 1 and len(got) == 2)):
            return
        raise BadRequest(f"row {row} (task {t.name!r}): image is {'x'.join(map(str, got))}, expected "
                         f"{t.expected()}; images are not resized beyond what the task's own transform does")

    # --------------------------------------------------------------------------------------------- predict
    def predict(self, context, model_input, params=None):  # untyped: MLflow reads a predict's hints as a schema
        """Class index (int64, shape (N,)) of each row; see the class doc for the input."""
        tasks, image = self._rows(model_input)
        out = np.empty(len(tasks), dtype=np.int64)
        groups = {name: np.flatnonzero(tasks == name) for name in dict.fromkeys(tasks.tolist())}
        with torch.inference_mode(), self._lock:
            for name, rows in groups.items():
                t = self.tasks[name]
                self.net.set_task(t.index)
                for i in range(0, len(rows), self.batch_size):
                    part = rows[i:i + self.batch_size]
                    x = torch.from_numpy(np.ascontiguousarray(image[part]))
                    if x.dim() == 3:
                        x = x[..., None]
                    if t.transform == "imagenet":
                        x = imagenet_eval_transform(x, t.mean, t.std, t.size, t.resize, t.channels, BadRequest)
                    else:
                        x = eval_transform(x, t.mean, t.std, t.size, t.channels, BadRequest)
                    x = x.to(self.device)
                    out[part] = self.net(x).argmax(1).cpu().numpy()
        return out


def _length(x: Any, what: str) -> int:
    """Rows of a request's input, counted without converting it (a list's rows may be anything)."""
    if isinstance(x, np.ndarray) and x.ndim >= 1:
        return int(x.shape[0])
    if isinstance(x, (list, tuple)):
        return len(x)
    raise BadRequest(f"{what} must be a list or array with one entry per row; got {type(x).__name__}"
                     + (f" of shape {x.shape}" if isinstance(x, np.ndarray) else ""))


def _is_number_type(t: type) -> bool:
    """A JSON number's type (or a numpy one's, in-process); bool is an int to Python and numpy, but never a pixel."""
    return issubclass(t, (int, float, np.integer, np.floating)) and not issubclass(t, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return _is_number_type(type(v))


def _fits(row: np.ndarray) -> bool:
    try:
        row.astype(np.float64)
    except (OverflowError, ValueError, TypeError):
        return False
    return True
