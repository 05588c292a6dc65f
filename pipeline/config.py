"""The run's configuration, typed: one dataclass per Hydra group, registered in Hydra's ConfigStore as the schema
that ``configs/config.yaml`` extends, and ``RunConfig``: the validated object every mode and job receives.

Hydra/OmegaConf enforce the schema while composing: an unknown key (``train.epoch=3``) or a wrong type
(``train.epochs=abc``) is refused with their own message, naming the key. What a type cannot say (ranges, a
method that ignores T, cluster resources) is checked by ``validation.validate``, once, before any work starts, with a
message that names the key and the fix. The benchmark section stays a plain mapping: its shape depends on its
``kind`` and the data layer checks it (``pipeline.data.benchmarks``).

Workers receive a ``RunConfig`` (plain dataclasses, picklable; no OmegaConf, every path absolute).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ksm_core import TrainConfig

from .errors import PipelineError

__all__ = ["RunConfig", "ModelCfg", "MethodCfg", "TrainCfg", "BackboneCfg", "ClusterCfg", "TrackingCfg", "DataCfg",
           "PathsCfg", "TuneCfg", "CompareCfg", "RegistryCfg", "MODES", "ROOT", "SEQUENTIAL_METHODS", "register",
           "resolve",
           "stable_hash",
           "absolute_tracking_uri"]

#: the project folder (where run_pipeline.py and configs/ live)
ROOT = Path(__file__).resolve().parents[1]
MODES = ("sequence", "tune", "shards", "evaluate", "compare", "follow", "export")
#: the sequential baselines (ksm_core.packnet, ksm_core.cpg): task t needs tasks < t, so a stream runs as one chain of
#: jobs (pipeline.chain), not a fan-out; beside the mask methods of ksm_core.METHODS
SEQUENTIAL_METHODS = ("packnet", "cpg")
#: their settings (MethodCfg), and which method uses which; None = the method's default (ksm_core's)
SEQUENTIAL_KEYS = {"packnet": ("prune", "retrain_epochs"),
                   "cpg": ("prune", "step", "allow_loss", "prune_epochs", "retrain_epochs")}
#: the modes a sequential method runs in (tune and follow build KSMNet tasks: not these; export serves the last
#: link's chain). In mode=compare it runs as one chain per (backbone, seed) beside the mask methods' fan-out
SEQUENTIAL_MODES = ("sequence", "evaluate", "shards", "compare", "export")
#: the sections an ``overrides_file`` may hold (what a Tune sweep's best.yaml sets)
OVERRIDABLE = ("method", "train")
#: a run name or a registered model's name: it names folders (``outputs/tune/<run_name>``), runs and the model in
#: MLflow (``models:/<name>/<version>``, the registry's filters). No '/', '\\', quote or control character, not
#: starting with '.', '-' or a blank (``..`` climbed out of ``outputs/``; a quote broke the registry's filter).
_ALL_SEQUENTIAL_KEYS = ("prune", "step", "allow_loss", "prune_epochs", "retrain_epochs")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=@ -]{0,127}\Z")
SAFE_NAME_SHAPE = ("1-128 letters, digits and _ . + = @ - or blanks, starting with a letter or digit and not "
                   "ending with a blank or '.'")


# ------------------------------------------------------------------------------------------------ schemas
@dataclass
class ModelCfg:
    name: str = MISSING                  # a ksm_core.create_model name
    width: Optional[float] = None        # channel multiplier (VGG)
    weights_path: Optional[str] = None   # a local state_dict: skip backbone training


@dataclass
class MethodCfg:
    name: str = MISSING                  # a ksm_core.METHODS name
    tau: Optional[float] = None          # None = the method's reference value
    k: Optional[float] = None
    T: Optional[float] = None
    init: Optional[float] = None
    # the sequential methods' (configs/method/packnet.yaml, cpg.yaml; null for the mask methods, and then left out
    # of every identity key, so results made before these settings existed keep their keys: RunConfig.section)
    prune: Optional[float] = None        # packnet: fraction of a task's weights freed; cpg: the sparsest gradual step
    step: Optional[float] = None         # cpg: the gradual pruning's increment
    allow_loss: Optional[float] = None   # cpg: a pruning step is kept while its accuracy + this >= the goal
    prune_epochs: Optional[int] = None   # cpg: epochs after each pruning step (null: ksm_core's default)
    retrain_epochs: Optional[int] = None  # both: epochs after the prune (null: ksm_core's default)

    def hparams(self) -> dict[str, float]:
        """The mask hyperparameters that are set, as ksm_core.mask_spec takes them."""
        return {k: getattr(self, k) for k in ("tau", "k", "T", "init") if getattr(self, k) is not None}

    def sequential(self) -> bool:
        """A sequential baseline (PackNet, CPG): the stream runs as a chain (pipeline.chain)."""
        return self.name in SEQUENTIAL_METHODS

    def chain_settings(self) -> dict[str, Any]:
        """The sequential method's settings that are set, by name (what pipeline.chain hands ksm_core)."""
        return {k: getattr(self, k) for k in SEQUENTIAL_KEYS.get(self.name, ()) if getattr(self, k) is not None}

    @classmethod
    def reference(cls, name: str) -> MethodCfg:
        """A sequential method's settings as ``method=<name>`` composes them (configs/method/<name>.yaml): what
        mode=compare trains it with when it is not the run's own method, so its results are a stream's own."""
        if name not in SEQUENTIAL_METHODS:
            raise ValueError(f"{name!r} is not a sequential method ({', '.join(SEQUENTIAL_METHODS)})")
        vals = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "method" / f"{name}.yaml"))
        assert isinstance(vals, dict)
        return cls(**{f.name: vals.get(f.name) for f in dataclasses.fields(cls) if f.name in vals})


@dataclass
class BackboneCfg:
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 64                 # global: split over the workers
    workers: int = 1                     # > 1: data-parallel with Ray Train (DDP), one worker per cluster.*_per_task


@dataclass
class TrainCfg:
    epochs: int = 3
    batch_size: int = 32
    lr_mask: float = 1e-3
    lr_head: float = 1e-3
    lr_finetune: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    pin_memory: bool = True
    # true | false | auto: the training step compiled once per worker (ksm_core.compiled); auto = on once the worker has
    # trained, or is about to train, enough masked steps to repay the compile (ksm_core.compiled.BREAK_EVEN_STEPS)
    compile: Any = "auto"
    head_refit: bool = True              # after the last epoch, fit the head alone to the final features (#22)
    chance_margin: float = 0.05          # a task ending within this of chance (1 / classes) is flagged
    retrain_at_chance: bool = False      # ... and trained once more with another seed, logged as such
    backbone: BackboneCfg = field(default_factory=BackboneCfg)

    def to_core(self, **over: Any) -> TrainConfig:
        """ksm_core's TrainConfig for a task (``over``: device, seed, ...); raises ValueError on bad values."""
        keys = ("epochs", "lr_mask", "lr_head", "lr_finetune", "weight_decay", "schedule", "device", "amp",
                "channels_last", "pin_memory", "compile", "head_refit")
        return TrainConfig(**{**{k: getattr(self, k) for k in keys}, **over})


@dataclass
class ClusterCfg:
    address: str = "local"               # local | auto | host:port | ray://host:10001 (RAY_ADDRESS wins)
    num_cpus: Optional[int] = None       # embedded only
    num_gpus: Optional[int] = None       # embedded only
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 2
    connect_timeout_s: float = 5.0
    claim_timeout_s: float = 60.0        # a claim (another launch training it) whose heartbeat is older is taken over
    max_in_flight: Optional[int] = None  # task jobs submitted to Ray at once (null = 2 x the free job slots)
    stop_grace_s: float = 30.0           # on SIGINT/SIGTERM: how long in-flight jobs may finish before they are killed


@dataclass
class TrackingCfg:
    uri: str = MISSING
    artifact_root: Optional[str] = None
    experiment: str = "ksm"
    outage_s: float = 120.0              # an HTTP tracking server unreachable mid-run is waited out this long
    system_metrics_s: float = 10.0       # MLflow system metrics (CPU, memory, GPU) of each task run, sampled this often; 0 = off


@dataclass
class DataCfg:
    holdout: float = 0.0
    on_corrupt: str = "fail"             # fail | skip
    shuffle_buffer: int = 1000
    transform: str = "cifar"             # cifar (pad-crop-flip at 32) | imagenet (RandomResizedCrop 224, test 256/224)


@dataclass
class PathsCfg:
    root: str = MISSING
    data: str = MISSING
    shards: str = MISSING
    output: str = MISSING


@dataclass
class TuneCfg:
    num_samples: int = 8
    tasks: Any = None                    # a list of task names, one bare name, or null (the first two new tasks)
    holdout: float = 0.2
    max_epochs: int = 4
    grace_period: int = 2
    reduction_factor: float = 2.0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: Optional[int] = None
    seed: int = 0
    points_to_evaluate: List[Dict[str, Any]] = field(default_factory=list)  # numbers, checked by tune.space
    # key -> {type, low, high, values} or null. Untyped here: OmegaConf cannot merge a mapping given on the command
    # line into a typed entry that is null; pipeline.tune.space checks each entry instead.
    space: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RegistryCfg:
    """The served multi-task model (pipeline.export): one registered MLflow model per sequence."""

    model_name: Optional[str] = None     # the Model Registry name; null = the run name
    export: bool = True                  # register a new version at the end of a sequence (when its tasks changed)
    export_max_tasks: int = 50           # above this many tasks the end-of-sequence export is left to mode=export
    serve_max_rows: int = 4096           # the served model refuses a request with more rows (recorded in its spec)
    serve_max_pixels: int = 1 << 24      # ... or more pixels in all (16 Mi: 4096 images of 64x64)


@dataclass
class FollowCfg:
    """mode=follow: a long-running driver that trains the catalogue's new lines as they appear."""

    poll_s: float = 5.0                  # how often the catalogue is looked at (one stat() when it has not changed)


@dataclass
class CompareCfg:
    """mode=compare: the methods, the task seeds and the backbone seeds; every method x task seed runs on every
    backbone (checked by pipeline.compare)."""

    methods: List[str] = field(default_factory=lambda: ["ksm", "ksm_softmax", "ksm_elementwise", "piggyback",
                                                        "piggyback_kernelwise", "piggyback_soft", "finetune"])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    # one backbone per seed (configs/config.yaml: [${seed}], the run's own: one backbone, as before this setting
    # existed, and the same compare key); None means the same
    backbone_seeds: Optional[List[int]] = None


@dataclass
class RunConfig:
    """The whole run: what ``python run_pipeline.py ...`` composed, made absolute and validated."""

    mode: str = "sequence"
    run_name: str = MISSING
    seed: int = 0
    progress: bool = True
    overrides_file: Optional[str] = None
    paths: PathsCfg = field(default_factory=PathsCfg)
    data: DataCfg = field(default_factory=DataCfg)
    benchmark: Dict[str, Any] = field(default_factory=dict)
    model: ModelCfg = field(default_factory=ModelCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    tune: TuneCfg = field(default_factory=TuneCfg)
    compare: CompareCfg = field(default_factory=CompareCfg)
    follow: FollowCfg = field(default_factory=FollowCfg)
    registry: RegistryCfg = field(default_factory=RegistryCfg)

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain data (for hashing and for MLflow params). The method's sequential settings are left
        out while null (every mask method): the keys hashed before they existed stay the same."""
        out = dataclasses.asdict(getattr(self, name))
        if name == "method":
            for k in _ALL_SEQUENTIAL_KEYS:
                if out.get(k) is None:
                    out.pop(k, None)
        return out

    def train_identity(self) -> dict[str, Any]:
        """The train section as the identity keys hash it: ``backbone.workers`` (1) and ``compile`` (false, auto) are
        left out at their defaults, so the backbones and results made before those settings existed keep their
        keys; ``pin_memory`` always, as it changes when a batch's copy runs, not a single number."""
        train = self.section("train")
        del train["pin_memory"]
        # what flags a result or retries it does not change the result itself (a retry logs its own seed)
        del train["chance_margin"], train["retrain_at_chance"]
        if train.get("head_refit") is False:  # train=paper: the results made before the refit existed keep their keys
            del train["head_refit"]
        if train["backbone"].get("workers") == 1:
            del train["backbone"]["workers"]
        if train.get("compile") is False or train.get("compile") == "auto":  # auto: eager's results within float
            del train["compile"]                                               # rounding, so eager's keys
        return train

    def data_identity(self) -> dict[str, Any]:
        """The data section as the identity keys hash it: ``transform`` is left out at its default (cifar), so the
        backbones and results made before the imagenet protocol existed keep their keys."""
        data = self.section("data")
        if data.get("transform") == "cifar":
            del data["transform"]
        return data

    def device(self) -> str:
        """The torch device a job uses: a job that asked Ray for no GPU must not grab one it happens to see."""
        if self.train.device == "auto" and self.cluster.gpus_per_task <= 0:
            return "cpu"
        return self.train.device

    def backbone_train_config(self) -> TrainConfig:
        """ksm_core's TrainConfig for the backbone, alike on one worker (``jobs.backbone_job``) and on each
        data-parallel rank (``backbone_dp``): ``train.backbone``'s epochs and lr, the run's device and seed, and
        ``train``'s amp, channels_last and pin_memory."""
        bb, t = self.train.backbone, self.train
        return TrainConfig(epochs=bb.epochs, lr_backbone=bb.lr, device=self.device(), seed=self.seed, amp=t.amp,
                           channels_last=t.channels_last, pin_memory=t.pin_memory)


def register() -> None:
    """The schema in Hydra's ConfigStore (``ksm_schema``, first in configs/config.yaml's defaults) and the
    ``${ksm_root:}`` resolver the configs use. Idempotent; done on import."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ksm_schema", node=RunConfig)
    if not OmegaConf.has_resolver("ksm_root"):
        OmegaConf.register_new_resolver("ksm_root", lambda: str(ROOT))


register()


# ------------------------------------------------------------------------------------------------ resolve
def stable_hash(obj: Any, n: int = 16) -> str:
    """A short hash of a JSON-able object, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def resolve(cfg: Any) -> RunConfig:
    """Hydra's composed config -> RunConfig: the overrides file merged in, every local path made absolute (from
    the cwd: Ray workers and Tune trials run elsewhere)."""
    try:
        rc = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
    except MissingMandatoryValue as e:  # a `???` in a config: a value only the user can give (a dataset's folder)
        key = e.full_key or "?"
        raise PipelineError(f"{key} has no value (the config says ???, a value only you can give); set it on the "
                            f"command line, e.g. `python run_pipeline.py ... {key}=/path/to/it`") from None
    if not isinstance(rc, RunConfig):
        raise PipelineError("the config was not composed over the ksm schema; keep `- ksm_schema` first in "
                            "configs/config.yaml's defaults")
    if rc.overrides_file:
        apply_overrides_file(rc, rc.overrides_file)
    for k in ("root", "data", "shards", "output"):
        v = getattr(rc.paths, k)
        if "://" not in v and not v.startswith("pipe:"):
            setattr(rc.paths, k, str(Path(v).expanduser().absolute()))
    if rc.tracking.artifact_root:
        rc.tracking.artifact_root = str(Path(rc.tracking.artifact_root).expanduser().absolute())
    rc.tracking.uri = absolute_tracking_uri(rc.tracking.uri or "")
    if rc.model.weights_path:
        rc.model.weights_path = str(Path(rc.model.weights_path).expanduser().absolute())
    return rc


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


def apply_overrides_file(rc: RunConfig, path: str) -> None:
    """Merge a YAML file's ``method:`` / ``train:`` sections over the config (a Tune sweep writes such a file).

    Keys in the file win over the composed config; keys the file lacks keep their config value; another method
    name starts that method from its defaults (the old method's hyperparameters do not carry over)."""
    import yaml

    p = Path(path).expanduser().absolute()
    if not p.is_file():
        raise PipelineError(f"overrides_file={path!r} does not exist (resolved to {p}); give the path of a YAML "
                            "with method:/train: sections, e.g. the best.yaml a `mode=tune` run printed")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict) or not set(data) <= set(OVERRIDABLE) or not data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise PipelineError(f"overrides_file {p} must be a mapping with only these sections: "
                            f"{', '.join(OVERRIDABLE)}; found: {found}")
    for sec, vals in data.items():
        if not isinstance(vals, dict):
            raise PipelineError(f"overrides_file {p}: section {sec!r} must be a mapping")
        current = getattr(rc, sec)
        valid = [f.name for f in dataclasses.fields(current)]
        unknown = set(vals) - set(valid)
        if unknown:
            raise PipelineError(f"overrides_file {p}: unknown key(s) {sorted(unknown)} in {sec!r}; valid: {sorted(valid)}")
        if sec == "method" and vals.get("name") not in (None, current.name):
            current = MethodCfg(name=vals["name"])
        try:  # through OmegaConf, so the file's values are type-checked like the command line's
            merged = OmegaConf.merge(OmegaConf.structured(current), vals)
        except OmegaConfBaseException as e:
            raise PipelineError(f"overrides_file {p}: {e}") from None
        setattr(rc, sec, OmegaConf.to_object(merged))
    rc.overrides_file = str(p)
