"""A trained task's record between its training and its upload: the artifact kept under
``paths.output/unlogged/``, and, when the tracking server stays down past ``tracking.outage_s``, the whole run
(params, metrics, tags, epoch records) as ``run.json`` beside it, until a rerun of the same result logs it
instead of training (ARCHITECTURE.md, "Faults").
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ksm_core import write_atomic

from .config import RunConfig
from .errors import PipelineError, TrackingUnreachable
from .redact import redact_text
from .tracking import Tracker

__all__ = ["UNLOGGED_DIR", "RECORD_FILE", "unlogged_dir", "Unlogged", "EpochRecords", "log_outcome"]


#: ``paths.output/unlogged/<task>-<result>/``: a task's artifact between its training and its upload, and, when the
#: tracking server stayed down past ``tracking.outage_s``, its whole record (RECORD_FILE) until a rerun logs it
UNLOGGED_DIR = "unlogged"
RECORD_FILE = "run.json"


def unlogged_dir(rc: RunConfig, task_name: str, result: str) -> Path:
    return Path(rc.paths.output) / UNLOGGED_DIR / f"{task_name}-{result}"


@dataclass
class Unlogged:
    """What a trained task's run logs at its end (its artifact file, params, final metrics at ``step``, tags, and
    the epoch records the server did not take while it was down), kept as ``run.json`` beside the artifact when
    the tracking server cannot be reached: the next run of the same result logs this instead of training."""

    artifact: str
    sha256: str
    params: dict[str, Any]
    metrics: dict[str, float]
    tags: dict[str, str]
    step: int
    run_id: str                                   # the run that trained it
    epochs: list[tuple[int, dict[str, float]]]

    def keep(self) -> Path:
        """Write ``run.json`` beside the artifact, atomically: from then on a rerun trusts the folder."""
        path = Path(self.artifact).parent / RECORD_FILE
        write_atomic(json.dumps(asdict(self), indent=1).encode(), path)
        return path.parent

    @classmethod
    def load(cls, folder: Path) -> "Unlogged | None":
        """A kept record whose artifact still has its sha256; None once the artifact is proven bad (its sha256 is
        not the record's): the folder is then removed and the task trains again.

        That proof is the only reason finished work is deleted. A record or artifact that cannot be read (EIO,
        EACCES, a run.json that is partial or not a record, an artifact that is missing or not a file) may be
        fine once the disk or the permissions are: it raises a PipelineError naming the folder, which is kept."""
        try:
            rec = cls(**json.loads((folder / RECORD_FILE).read_text()))
            # the artifact is the .safetensors file of that name in this folder, wherever the record was written:
            # a record cannot send a file from elsewhere to the tracking server (and paths.output may have moved)
            name = Path(rec.artifact).name
            if not name.endswith(".safetensors") or not isinstance(rec.sha256, str) or len(rec.sha256) != 64:
                raise ValueError(f"{RECORD_FILE} does not name a .safetensors artifact and its sha256")
            artifact = folder / name
            digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
            rec.artifact = str(artifact)
            rec.epochs = [(int(e), m) for e, m in rec.epochs]
        except OSError as e:
            raise PipelineError(cls._unreadable(folder, f"[{errno.errorcode.get(e.errno or 0, e.errno)}] "
                                                        f"{e.strerror or e} ({e.filename or folder})")) from e
        except (ValueError, TypeError, AttributeError) as e:  # bad JSON, a partial read, not a record
            raise PipelineError(cls._unreadable(folder, f"{RECORD_FILE} is not a whole record: {e}")) from e
        if digest != rec.sha256:  # proof: the bytes are not the ones trained; nothing worth keeping
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return rec

    @staticmethod
    def _unreadable(folder: Path, why: str) -> str:
        return (f"the trained task kept at {folder} cannot be read ({why}). It is kept, not deleted (only an "
                "artifact that fails its recorded sha256 is), and this task's run ends FAILED. Fix: make the folder "
                "readable (disk, permissions) and run the same command again to log it without training, or delete "
                "the folder to train the task again")


@dataclass
class EpochRecords:
    """A job's epoch records as they come: each logged at once while the server takes them. From the first one it
    does not take (TrackingUnreachable: down past ``tracking.outage_s``), that record and every later one wait in
    ``waiting`` for the job's last log (``Unlogged.epochs``): training never stops for the store."""

    tr: Tracker
    run_id: str
    waiting: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    count: int = 0  # records added so far

    def add(self, step: int, values: dict[str, float], *, defer: bool = False) -> None:
        """Log one epoch's record at ``step``, or keep it for the last log (``defer``: it goes with that batch)."""
        self.count += 1
        if not self.waiting and not defer:
            try:
                self.tr.metrics(self.run_id, values, step=step)
                return
            except TrackingUnreachable:  # training goes on; this and later records are logged at the end
                pass
        self.waiting.append((step, values))


def log_outcome(tr: Tracker, run: Any, rec: Unlogged, rc: RunConfig, tags: Mapping[str, str] | None = None,
                artifact_path: str = "task") -> None:
    """Everything a trained task's run still needs, then FINISHED: the artifact (under ``artifact_path``: a mask
    task's ``task/``, a chain link's ``chain/``), then one batch of the epoch records not logged yet, the params,
    the final metrics and the tags. Raises TrackingUnreachable when the server stays down."""
    run_id = run.info.run_id
    try:
        tr.artifact(run_id, rec.artifact, artifact_path, artifact_uri=run.info.artifact_uri)
    except OSError as e:  # a local artifact store: the copy into it failed (the run ends FAILED)
        raise PipelineError(f"task {rec.params.get('task')}: cannot copy its artifact into the tracking store's "
                            f"artifact location ({redact_text(rc.tracking.artifact_root or rc.tracking.uri)}): "
                            f"[{errno.errorcode.get(e.errno or 0, e.errno)}] {e.strerror or e}"
                            f"{f' ({e.filename})' if e.filename else ''}; free space there or set "
                            "tracking.artifact_root to another folder") from e
    tr.log(run_id, params=rec.params, metrics=rec.metrics, tags={**rec.tags, **(tags or {})}, step=rec.step,
           history=rec.epochs)
    tr.finish(run_id, "FINISHED")
