"""The domain checks on a resolved :class:`~pipeline.config.RunConfig` that its types cannot say (ranges, a method
that ignores T, a transform the model cannot take, a sequential method's settings and modes), once, before any
work starts; needs neither Ray nor MLflow. Each failure is a PipelineError naming the key and the fix. Mode-specific
checks live with their mode.
"""
from __future__ import annotations

import math
import os

from ksm_core import METHODS, list_models, mask_spec
from ksm_core.transforms import TRANSFORMS

from .config import (_ALL_SEQUENTIAL_KEYS, MODES, SAFE_NAME, SAFE_NAME_SHAPE, SEQUENTIAL_KEYS, SEQUENTIAL_METHODS,
                     SEQUENTIAL_MODES, RunConfig)
from .errors import PipelineError

__all__ = ["validate"]


def _number(name: str, v: float, lo: float, *, strict: bool) -> None:
    if not (math.isfinite(v) and (v > lo if strict else v >= lo)):
        raise PipelineError(f"{name}={v!r} must be a number {'>' if strict else '>='} {lo:g}")


def _at_least(name: str, v: int, lo: int, hint: str = "") -> None:
    if v < lo:
        raise PipelineError(f"{name}={v!r} must be an int >= {lo}{hint}")


def validate(rc: RunConfig) -> None:
    """The domain checks every mode shares (types were checked by the schema); needs neither Ray nor MLflow.
    Raises PipelineError naming the key and the fix. Mode-specific checks live with their mode."""
    if rc.mode not in MODES:
        raise PipelineError(f"mode={rc.mode!r} is not a mode; valid modes: {', '.join(MODES)}")
    if rc.model.name not in list_models():
        raise PipelineError(f"model.name={rc.model.name!r} is unknown; valid models: {', '.join(list_models())}")
    if rc.model.weights_path and not os.path.isfile(rc.model.weights_path):
        raise PipelineError(f"model.weights_path={rc.model.weights_path!r} does not exist; give a local state_dict "
                            "file or set model.weights_path=null to train the backbone on the initial task")
    if rc.method.name not in METHODS + SEQUENTIAL_METHODS:
        raise PipelineError(f"method.name={rc.method.name!r} is unknown; valid methods: "
                            f"{', '.join(METHODS + SEQUENTIAL_METHODS)} (e.g. method=ksm)")
    try:
        if rc.method.sequential():
            _check_sequential(rc)
        else:
            set_ = [k for k in _ALL_SEQUENTIAL_KEYS if getattr(rc.method, k) is not None]
            if set_:
                raise PipelineError(f"method.{set_[0]}={getattr(rc.method, set_[0])!r} is a setting of the "
                                    f"sequential methods ({', '.join(SEQUENTIAL_METHODS)}); method={rc.method.name} "
                                    f"does not use it: remove it (method.{set_[0]}=null)")
            mask_spec(rc.method.name, **rc.method.hparams())
        rc.train.to_core()
    except ValueError as e:
        raise PipelineError(f"invalid method/train setting: {e}") from None
    bb = rc.train.backbone
    _number("train.backbone.lr", bb.lr, 0, strict=True)
    _at_least("train.backbone.epochs", bb.epochs, 1)
    _at_least("train.batch_size", rc.train.batch_size, 1)
    _at_least("train.backbone.batch_size", bb.batch_size, 1)
    _at_least("train.backbone.workers", bb.workers, 1, " (1 = one plain Ray job; more = Ray Train, DDP)")
    _at_least("data.shuffle_buffer", rc.data.shuffle_buffer, 1)
    if not (math.isfinite(rc.train.chance_margin) and 0 <= rc.train.chance_margin < 0.5):
        raise PipelineError(f"train.chance_margin={rc.train.chance_margin!r} must be a number in [0, 0.5): a task "
                            "whose test accuracy ends within it of chance (1 / classes) is flagged")
    cl = rc.cluster
    _number("cluster.cpus_per_task", cl.cpus_per_task, 0, strict=True)
    _number("cluster.gpus_per_task", cl.gpus_per_task, 0, strict=False)
    _at_least("cluster.max_retries", cl.max_retries, -1, " (0 = no retry, -1 = retry forever)")
    _number("cluster.claim_timeout_s", cl.claim_timeout_s, 0, strict=True)
    _number("cluster.stop_grace_s", cl.stop_grace_s, 0, strict=False)
    if cl.max_in_flight is not None:
        _at_least("cluster.max_in_flight", cl.max_in_flight, 1, " (or null: 2 x the free job slots)")
    _number("follow.poll_s", rc.follow.poll_s, 0, strict=True)
    _number("tracking.outage_s", rc.tracking.outage_s, 0, strict=False)
    _at_least("registry.export_max_tasks", rc.registry.export_max_tasks, 0, " (0 = never at the end of a sequence)")
    _number("tracking.system_metrics_s", rc.tracking.system_metrics_s, 0, strict=False)
    if rc.registry.model_name is not None and not rc.registry.model_name.strip():
        raise PipelineError("registry.model_name is empty; give a name, or null to register under the run name")
    for key, name in (("run_name", rc.run_name), ("registry.model_name", rc.registry.model_name)):
        if name is not None and (not SAFE_NAME.match(name) or name.endswith((" ", "."))):
            raise PipelineError(f"{key}={name!r} is not a safe name: it names folders under paths.output and the "
                                f"runs and model in MLflow; use {SAFE_NAME_SHAPE} (no '/', quotes or '..')")
    _at_least("registry.serve_max_rows", rc.registry.serve_max_rows, 1)
    _at_least("registry.serve_max_pixels", rc.registry.serve_max_pixels, 1)
    if cl.gpus_per_task > 1 and cl.gpus_per_task != int(cl.gpus_per_task):
        raise PipelineError(f"cluster.gpus_per_task={cl.gpus_per_task} must be a fraction <= 1 or a whole number")
    if not 0 <= rc.data.holdout < 1:
        raise PipelineError(f"data.holdout={rc.data.holdout!r} must be in [0, 1)")
    if rc.data.on_corrupt not in ("fail", "skip"):
        raise PipelineError(f"data.on_corrupt={rc.data.on_corrupt!r}; valid: fail, skip")
    if rc.data.transform not in TRANSFORMS:
        raise PipelineError(f"data.transform={rc.data.transform!r} is not a transform protocol; valid: "
                            f"{', '.join(TRANSFORMS)} (cifar: 32 px pad-crop-flip; imagenet: 224 px RandomResizedCrop, "
                            "test Resize 256 + CenterCrop 224, ImageNet mean/std)")
    if rc.data.transform == "imagenet" and rc.model.name == "vgg16_bn_cifar":  # its classifier takes 1x1 features
        raise PipelineError("data.transform=imagenet feeds 224 x 224 images; model vgg16_bn_cifar takes 32 x 32 "
                            "only: use model=resnet18 or model=resnet50, or data.transform=cifar")
    if not rc.tracking.uri:
        raise PipelineError("tracking.uri is empty; use tracking=local (sqlite file) or tracking.uri=http://host:port")


def _check_sequential(rc: RunConfig) -> None:
    """method=packnet / cpg: only their own settings, in range; modes that can run a chain; no weight decay."""
    me, name = rc.method, rc.method.name
    if rc.mode not in SEQUENTIAL_MODES:
        raise PipelineError(f"mode={rc.mode} does not take method={name} yet: a sequential method runs as one chain "
                            f"of jobs (modes {', '.join(SEQUENTIAL_MODES)}); use mode=sequence, or a mask method "
                            "(e.g. method=ksm)")
    unused = [k for k in ("tau", "k", "T", "init") if me.hparams().get(k) is not None] + [
        k for k in _ALL_SEQUENTIAL_KEYS if k not in SEQUENTIAL_KEYS[name] and getattr(me, k) is not None]
    if unused:
        raise PipelineError(f"method.{unused[0]}={getattr(me, unused[0])!r}: method={name} does not use it (its "
                            f"settings: {', '.join(SEQUENTIAL_KEYS[name])}); remove it (method.{unused[0]}=null)")
    if me.prune is not None and not (math.isfinite(me.prune) and 0 < me.prune < 1):
        raise PipelineError(f"method.prune={me.prune!r} must be a number in (0, 1): "
                            + ("the fraction of a task's weights freed for the next tasks (their scripts: 0.5)"
                               if name == "packnet" else "the sparsest gradual pruning step (theirs: 0.95)"))
    if me.step is not None and not (math.isfinite(me.step) and 0 < me.step <= (me.prune or 0.95)):
        raise PipelineError(f"method.step={me.step!r} must be a number in (0, method.prune={me.prune or 0.95}] "
                            "(the gradual pruning's increment; theirs: 0.1)")
    if me.allow_loss is not None and not (math.isfinite(me.allow_loss) and 0 <= me.allow_loss <= 1):
        raise PipelineError(f"method.allow_loss={me.allow_loss!r} must be a number in [0, 1] (their --allow_acc_loss: 0)")
    for k in ("prune_epochs", "retrain_epochs"):
        v = getattr(me, k)
        if v is not None and v < 0:
            raise PipelineError(f"method.{k}={v!r} must be an int >= 0, or null for ksm_core's default")
    if rc.train.weight_decay:
        raise PipelineError(f"train.weight_decay={rc.train.weight_decay!r}: method={name} needs 0 (a decay would "
                            "move the frozen weights of earlier tasks); set train.weight_decay=0")
