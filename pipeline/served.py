"""The served multi-task model: one frozen backbone and every task's mask, BN and head in ONE ``KSMNet``, behind
MLflow's pyfunc interface. A request names the task of each row; rows of different tasks may be mixed in one call:
they are grouped by task and each group runs with that task's mask, BN and head::

    import mlflow, numpy as np
    model = mlflow.pyfunc.load_model("models:/split_fashion_mnist-ksm/1")
    classes = model.predict({"task": np.array(["t1", "t3", "t1"]),
                             "image": images})       # uint8 (3, 28, 28) or (3, 28, 28, 1), pixels 0..255
    # -> np.ndarray int64 (3,): the class index of each row within its task (ksm_model.json lists the names)

Over REST (``mlflow models serve -m models:/<name>/<version>``): ``POST /invocations`` with
``{"inputs": {"task": ["t1", "t3"], "image": [[[0, 12, ...], ...], ...]}}`` answers
``{"predictions": [1, 0]}``.

An image is preprocessed exactly as the task's test images were when its accuracy was logged (the streaming
loader's eval transform: scale to [0, 1], bilinear resize to the network's input size, grey to 3 channels, the
task's mean/std), so the model reproduces the logged accuracy on the same images. Nothing else is resized: an
image must have the task's stored shape (H, W, C), or (H, W) for a grey task. A bad request (an unknown task, a
wrong shape, pixels that are not uint8) raises :class:`BadRequest` naming the first bad row and the form the row's
task expects; over REST it is an HTTP 400 with that message.

Loading reads safetensors only (the backbone and one artifact per task, ``ksm_core.load_task``) and a JSON spec:
no task artifact is ever unpickled. The backbone's fingerprint is checked against the one recorded at export.

This file is also the model's code as MLflow stores it ("models from code"): ``pipeline.export`` writes it
verbatim into the logged model, followed by one ``mlflow.models.set_model(MultiTaskModel())`` line, with
``ksm_core`` beside it in the model's ``code/`` folder. So it imports nothing from ``pipeline``: a model loads
wherever torch, numpy, safetensors and MLflow are installed.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

__all__ = ["MultiTaskModel", "BadRequest", "SPEC_FILE", "FORMAT", "eval_transform", "resize_matrix"]

FORMAT = "ksm-served/1"
SPEC_FILE = "ksm_model.json"   # in the model's artifact folder "ksm", beside backbone.safetensors and tasks/
CROP_PADDING = 4               # the loader's eval crop is the centre of a 4-pixel zero padding: the image itself
_NAMED = 10                    # tasks named in an "unknown task" message before "..."


class BadRequest(MlflowException, ValueError):
    """A request the model cannot answer; the message names the first bad row and what its task expects.
    An MlflowException with INVALID_PARAMETER_VALUE, so MLflow's scoring server answers HTTP 400 with it."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def resize_matrix(n: int, size: int) -> torch.Tensor:
    """[size, n] weights of torch's bilinear resize n -> size along one axis (antialiased when shrinking): the
    streaming loader's own construction (pipeline.data.loader.resize_matrix), repeated so this file stands alone."""
    if n == size:
        return torch.eye(n)
    eye = torch.eye(n)[None, None]
    return F.interpolate(eye, size=(size, n), mode="bilinear", align_corners=False, antialias=size < n)[0, 0]


def eval_transform(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 [B, H, W, C] -> the network's normalised float32 [B, channels, size, size], the same operations in
    the same order as the loader's BatchTransform with train=False (so the same bits)."""
    x = x.permute(0, 3, 1, 2).float()
    rows = (resize_matrix(x.shape[2], size) / 255.0)[None]
    cols = resize_matrix(x.shape[3], size)[None]
    x = rows[:, None] @ x @ cols[:, None].transpose(-1, -2)
    c = x.shape[1]
    if c != channels:
        if c == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c == 3 and channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise BadRequest(f"cannot turn {c}-channel images into {channels} channels")
    return ((x - mean) / std).contiguous()


class _Task:
    """One served task: its index in the network and how its images are checked and preprocessed."""

    def __init__(self, d: dict[str, Any], index: int):
        self.name: str = d["name"]
        self.index = index
        self.classes: list[str] = list(d["classes"])
        self.shape = tuple(int(v) for v in d["image_shape"])  # (H, W, C) as stored in the task's shards
        self.size, self.channels = int(d["image_size"]), int(d["channels"])
        self.mean = torch.tensor(d["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(d["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def expected(self) -> str:
        h, w, c = self.shape
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
    own; on a busy machine 1 thread per server process is much faster, see benchmarks/RESULTS.md).
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
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        m = spec["model"]
        backbone = create_model(m["name"], num_classes=int(m["num_classes"]),
                                **({"width": m["width"]} if m.get("width") is not None else {}))
        backbone.load_state_dict(load_file(str(root / spec["backbone"])))
        net = KSMNet.from_backbone(backbone, copy_backbone=False)
        if net.backbone_fingerprint != spec["backbone_fingerprint"]:
            raise MlflowException(f"the model's backbone does not hash to the fingerprint recorded at export "
                                  f"({spec['backbone_fingerprint'][:12]}...): its files were changed; export it again")
        self.tasks: dict[str, _Task] = {}
        for d in spec["tasks"]:
            index = 0 if d.get("artifact") is None else load_task(net, root / d["artifact"], name=d["name"])
            self.tasks[d["name"]] = _Task(d, index)
        self.net = net.to(self.device).eval()
        self.spec = spec
        self._lock = threading.Lock()  # set_task switches the whole network: one request's group at a time

    # ---------------------------------------------------------------------------------------------- checks
    def _rows(self, model_input: Any) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(model_input, dict) or "task" not in model_input or "image" not in model_input:
            raise BadRequest('the input must be {"task": task names (N,), "image": uint8 images (N, H, W) or '
                             '(N, H, W, C)}; over REST: {"inputs": {"task": [...], "image": [...]}}, got '
                             f"{type(model_input).__name__}"
                             + (f" with keys {sorted(model_input)}" if isinstance(model_input, dict) else ""))
        tasks = np.asarray(model_input["task"])
        image = model_input["image"]
        if tasks.ndim != 1:
            raise BadRequest(f"task must be one name per row, shape (N,); got shape {tasks.shape}")
        if not isinstance(image, np.ndarray):
            image = np.asarray(image)
        if image.ndim not in (3, 4) or image.shape[0] != len(tasks):
            raise BadRequest(f"image must be (N, H, W) or (N, H, W, C) with N = {len(tasks)} rows (one per task "
                             f"name); got shape {image.shape}")
        known = [str(t) for t in tasks]
        for i, t in enumerate(known):
            if t not in self.tasks:
                names = list(self.tasks)
                shown = ", ".join(names[:_NAMED]) + (f", ... ({len(names)} in all)" if len(names) > _NAMED else "")
                raise BadRequest(f"row {i}: unknown task {t!r}; this model serves: {shown}")
        if image.dtype != np.uint8:
            image = self._as_uint8(image, known)
        return np.asarray(known), image

    def _as_uint8(self, image: np.ndarray, tasks: list[str]) -> np.ndarray:
        """A REST request's pixels arrive as JSON numbers (an object array): whole numbers 0..255 are pixels. Any
        other value, and any numpy dtype but uint8 (no silent casts), is refused naming the first bad row."""
        row, got = 0, f"dtype {image.dtype}"
        if image.dtype == object:
            try:
                values = image.astype(np.float64)  # exact for pixel values; keeps a fraction visible
            except (TypeError, ValueError):
                got = "values that are not numbers"
            else:
                flat = values.reshape(len(values), -1)
                ok = ((flat == np.floor(flat)) & (flat >= 0) & (flat <= 255)).all(1)
                if ok.all():
                    return values.astype(np.uint8)
                row, got = int(np.flatnonzero(~ok)[0]), "values that are not whole numbers 0..255"
        t = self.tasks[tasks[row]]
        raise BadRequest(f"row {row} (task {t.name!r}): image pixels must be uint8, got {got}; "
                         f"expected {t.expected()}")

    def _check_shape(self, t: _Task, image: np.ndarray, rows: np.ndarray) -> None:
        h, w, c = t.shape
        got = image.shape[1:]
        if got == (h, w, c) or (c == 1 and got == (h, w)):
            return
        raise BadRequest(f"row {int(rows[0])} (task {t.name!r}): image is {'x'.join(map(str, got))}, expected "
                         f"{t.expected()}; images are not resized beyond what the task's own transform does")

    # --------------------------------------------------------------------------------------------- predict
    def predict(self, context, model_input, params=None):  # untyped: MLflow reads a predict's hints as a schema
        """Class index (int64, shape (N,)) of each row; see the class doc for the input."""
        tasks, image = self._rows(model_input)
        out = np.empty(len(tasks), dtype=np.int64)
        groups = {name: np.flatnonzero(tasks == name) for name in dict.fromkeys(tasks.tolist())}
        for name, rows in groups.items():
            self._check_shape(self.tasks[name], image, rows)
        with torch.inference_mode(), self._lock:
            for name, rows in groups.items():
                t = self.tasks[name]
                self.net.set_task(t.index)
                for i in range(0, len(rows), self.batch_size):
                    part = rows[i:i + self.batch_size]
                    x = torch.from_numpy(np.ascontiguousarray(image[part]))
                    if x.dim() == 3:
                        x = x[..., None]
                    x = eval_transform(x, t.mean, t.std, t.size, t.channels).to(self.device)
                    out[part] = self.net(x).argmax(1).cpu().numpy()
        return out
