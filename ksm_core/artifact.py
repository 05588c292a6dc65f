"""A task's artifact: everything needed to serve one task on top of the shared backbone, and nothing more.

Stored as one safetensors file (JSON metadata in its header):
* per masked layer: the binary mask bit-packed (numpy.packbits, 1 bit per kernel) and, for soft methods, the
  soft values as fp16 for the zeroed entries only (in flat order);
* per BatchNorm: the task's affine parameters and running statistics; the task's head;
* for the fine-tune baseline: the task's full weights instead of masks;
* the method's hyperparameters and the backbone fingerprint: loading onto another backbone is refused.

Round trip is exact: ``deploy`` fixes a task's soft values to fp16 before packing, so the loaded task computes
the same logits bit for bit.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save as np_save
from safetensors import safe_open
from torch import Tensor

from .masks import MaskSpec
from .network import KSMNet

__all__ = ["save_task", "load_task", "read_metadata", "write_atomic", "ArtifactWriteError", "BackboneMismatch",
           "FORMAT"]

FORMAT = "ksm-task/1"


class BackboneMismatch(ValueError):
    """The artifact was made on a different backbone than the one it is being loaded onto."""


class ArtifactWriteError(OSError):
    """An artifact could not be written (disk full, read-only or forbidden folder). An OSError with the errno and
    the path of the failed write; the message names both and what to do. Nothing is left under the real name."""

    def __str__(self) -> str:
        return str(self.strerror)  # the whole sentence; OSError's own form would repeat errno and path


def _write_error(e: OSError, path: Path) -> ArtifactWriteError:
    code = e.errno
    name = errno.errorcode.get(code, str(code)) if code is not None else "?"
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        todo = "free space on that file system, or write the artifacts to another folder"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        todo = "make the folder writable, or write the artifacts to another folder"
    else:
        todo = "check that folder, or write the artifacts to another folder"
    where = e.filename if e.filename not in (None, str(path)) else None
    msg = (f"cannot write artifact {path}: [{name}] {e.strerror or e}"
           + (f" (at {where})" if where else "") + f"; {todo}. No partial file was left under that name.")
    return ArtifactWriteError(code, msg, str(path))


def write_atomic(data: bytes, path: str | os.PathLike) -> int:
    """Write ``data`` to ``path`` all or nothing: into a temporary file in the same folder, flushed to disk,
    then renamed over ``path`` (``os.replace``, atomic on one file system). A reader, or a rerun, sees the old
    file or the complete new one, never a truncated one. A failed write (ENOSPC, EROFS, EACCES, ...) removes the
    temporary file and raises :class:`ArtifactWriteError` naming the path and the errno. Returns the size."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes it 0600; an artifact is read by other users' jobs too
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _write_error(e, path) from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return len(data)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def pack_task(net: KSMNet, task: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A deployed task's tensors (numpy, as stored) and metadata."""
    net.check_task(task)
    if task == 0:
        raise ValueError("task 0 is the backbone itself; it has no artifact (log the backbone weights instead)")
    spec = net.specs[task]
    if not net.is_deployed(task):
        net.deploy(task)
    k = str(task)
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, Any] = {}
    for name, m in net.masked_layers():
        st = m.tasks[k]
        if spec.method == "finetune":
            tensors[f"weight.{name}"] = _np(st.weight)
            if st.bias is not None:
                tensors[f"bias.{name}"] = _np(st.bias)
            continue
        mk = _np(st.mask)
        hard = mk >= 1.0
        tensors[f"mask.{name}.bits"] = np.packbits(hard.reshape(-1))
        if spec.soft:
            tensors[f"mask.{name}.soft"] = mk.reshape(-1)[~hard.reshape(-1)].astype(np.float16)
        layers[name] = list(mk.shape)
    tensors.update(pack_bn_head(net, task))
    meta = {
        "format": FORMAT,
        "spec": spec.to_dict(),
        "backbone_fingerprint": net.backbone_fingerprint,
        "num_classes": net.num_classes(task),
        "task_name": net.task_names[task],
        "mask_shapes": layers,
    }
    return tensors, meta


def pack_bn_head(net: Any, task: int) -> dict[str, np.ndarray]:
    """A task's BatchNorm and head tensors as an artifact stores them (``bn.<layer>.<key>``, ``head.<key>``), for
    any network with ``batchnorms()`` and ``heads`` (KSMNet, ksm_core.packnet's PackNet)."""
    k = str(task)
    out = {f"bn.{name}.{key}": _np(v) for name, m in net.batchnorms() for key, v in m.tasks[k].state_dict().items()}
    out.update({f"head.{key}": _np(v) for key, v in net.heads.tasks[k].state_dict().items()})
    return out


def load_bn_head(net: Any, task: int, arrays: dict[str, np.ndarray]) -> None:
    """The inverse of :func:`pack_bn_head`: load task ``task``'s BatchNorm and head from an artifact's arrays."""
    k = str(task)
    for name, m in net.batchnorms():
        bn = m.tasks[k]
        bn.load_state_dict({key: torch.from_numpy(arrays[f"bn.{name}.{key}"].copy()) for key in bn.state_dict()})
    head = net.heads.tasks[k]
    head.load_state_dict({key: torch.from_numpy(arrays[f"head.{key}"].copy()) for key in head.state_dict()})


def save_task(net: KSMNet, task: int, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> int:
    """Write a task's artifact (deploying it first if needed); returns the file size in bytes.

    ``extra`` is JSON-serialisable user metadata (class names, metrics, ...) stored alongside. The write is
    atomic (:func:`write_atomic`); a failed one raises :class:`ArtifactWriteError` and leaves no file behind.
    """
    tensors, meta = pack_task(net, task)
    if extra:
        meta["extra"] = extra
    # serialised in memory (an artifact is KBs to MBs) and written by Python, so a failed write is an OSError
    # with its errno; written atomically: a killed or failed writer never leaves a truncated artifact
    return write_atomic(np_save(tensors, metadata={"ksm": json.dumps(meta)}), path)


def read_metadata(path: str | os.PathLike, fmt: str = FORMAT) -> dict[str, Any]:
    """The JSON metadata of an artifact of format ``fmt`` (KSM's; ksm_core.packnet and .cpg pass theirs), without
    loading its tensors."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get("ksm")
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a readable ksm task artifact ({e}); re-create it by training the task again") from e
    if raw is None:
        raise ValueError(f"{path} is a safetensors file without ksm metadata; it is not a task artifact")
    meta = json.loads(raw)
    if meta.get("format") != fmt:
        raise ValueError(f"{path} has artifact format {meta.get('format')!r}; this version reads {fmt!r}")
    return meta


def load_task(net: KSMNet, path: str | os.PathLike, name: str | None = None) -> int:
    """Add the task stored at ``path`` to ``net`` (deployed, ready for inference); returns its index.

    Raises BackboneMismatch when the artifact was made on another backbone.
    """
    meta = read_metadata(path)
    if meta["backbone_fingerprint"] != net.backbone_fingerprint:
        raise BackboneMismatch(
            f"artifact {path} was trained on backbone {meta['backbone_fingerprint'][:12]}..., but this network's "
            f"backbone is {net.backbone_fingerprint[:12]}...; load it onto the backbone it was made with "
            "(same weights file / MLflow backbone run)")
    spec = MaskSpec.from_dict(meta["spec"])
    arrays = np_load_file(str(path))
    t = net.add_task(int(meta["num_classes"]), method=spec.method, name=name or meta.get("task_name"),
                     tau=spec.tau, k=spec.k, T=spec.T, init=spec.init)
    k = str(t)
    with torch.no_grad():
        for lname, m in net.masked_layers():
            st = m.tasks[k]
            if spec.method == "finetune":
                st.weight.copy_(torch.from_numpy(arrays[f"weight.{lname}"]))
                if st.bias is not None:
                    st.bias.copy_(torch.from_numpy(arrays[f"bias.{lname}"]))
                continue
            shape = tuple(meta["mask_shapes"][lname])
            n = int(np.prod(shape))
            hard = np.unpackbits(arrays[f"mask.{lname}.bits"], count=n).astype(bool)
            mk = hard.astype(np.float32)
            if spec.soft:
                mk[~hard] = arrays[f"mask.{lname}.soft"].astype(np.float32)
            m.load_mask(t, torch.from_numpy(mk.reshape(shape)))
        load_bn_head(net, t, arrays)
    return t
