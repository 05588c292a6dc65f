"""Fit one task and evaluate it; device-agnostic (bf16 autocast and channels_last on CUDA).

``fit_task`` trains a task of a KSMNet (masks + BN affine with one learning rate, the head with another, or
the whole copied net for the fine-tune baseline), then deploys it so the reported accuracy is exactly what its
artifact reproduces. ``train_backbone`` trains a plain network on the initial task.

Loaders are any re-iterable of (x, y) batches; if they have ``set_epoch`` it is called each epoch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from . import compiled
from .network import KSMNet

R = TypeVar("R")

__all__ = ["TrainConfig", "FitResult", "fit_task", "train_backbone", "evaluate", "resolve_device", "refit_head",
           "at_chance"]

#: L2 penalty of the head refit (on the weights, not the bias), fixed a priori, not tuned: it only keeps the
#: solution finite when the features separate the classes perfectly (then plain cross-entropy has no minimum)
REFIT_L2 = 1e-3
REFIT_MAX_ITER = 100


@dataclass
class TrainConfig:
    """Training knobs. Defaults follow the issue/authors: Adam, lr 2e-4 for masks+BN and head, cosine."""

    epochs: int = 5
    lr_mask: float = 2e-4      # masks and BN affine parameters
    lr_head: float = 2e-4
    lr_finetune: float = 2e-4  # all weights, fine-tune baseline
    lr_backbone: float = 1e-3  # train_backbone (from scratch)
    weight_decay: float = 0.0
    schedule: str = "cosine"   # cosine | constant
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    amp: bool = True           # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    pin_memory: bool = True    # CUDA only: host batches pinned, then copied without blocking the host (see _to)
    # a task's training forward through torch.compile, once per process (ksm_core.compiled): True | False |
    # "auto" (on when this process holds the graph already or will have trained enough steps to repay it)
    compile: bool | str = False
    seed: int = 0
    max_steps_per_epoch: int | None = None  # cap for smoke runs; None = whole loader
    # after the last epoch (and the deploy), fit the task's head alone to the task's final features (see
    # refit_head). Off here and in train=paper (the authors' recipe); on in the pipeline's train=default.
    head_refit: bool = False
    head_refit_samples: int = 8192  # train samples whose features the refit sees (the features are held in memory)

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ValueError(f"epochs={self.epochs!r} must be an int >= 1")
        for k in ("lr_mask", "lr_head", "lr_finetune", "lr_backbone"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{k}={v!r} must be a number > 0")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule={self.schedule!r}; valid: 'cosine', 'constant'")
        if not (self.compile is True or self.compile is False or self.compile == "auto"):
            raise ValueError(f"compile={self.compile!r}; valid: true, false, 'auto'")
        if not (isinstance(self.head_refit_samples, int) and self.head_refit_samples >= 1):
            raise ValueError(f"head_refit_samples={self.head_refit_samples!r} must be an int >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """What a fit returns: per-epoch history, final test accuracy/loss, and where the time went."""

    history: list[dict[str, float]] = field(default_factory=list)
    test_acc: float = float("nan")
    test_loss: float = float("nan")
    train_seconds: float = 0.0   # optimisation steps only (data loading included, evaluation excluded)
    # with compile: the first step's time beyond a compiled step's (part of train_seconds) when this fit compiled
    # the graph; 0 when it reused the one this process compiled for an earlier task (ksm_core.compiled)
    compile_seconds: float = 0.0
    compiled: bool = False       # the training forward ran compiled (train.compile=true, or auto's rule said so)
    refit_seconds: float = 0.0   # the head refit (feature pass + solve); counted in train_seconds too
    total_seconds: float = 0.0
    steps: int = 0
    samples: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EpochCallback = Callable[[int, dict[str, float]], None]


def at_chance(acc: float | None, num_classes: int, margin: float) -> bool:
    """Whether an accuracy is within ``margin`` of chance (1 / num_classes): a task that failed to learn. A run
    with no accuracy is not judged here."""
    if acc is None or not math.isfinite(acc) or num_classes < 1:
        return False
    return acc <= 1.0 / num_classes + margin


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} asked for CUDA but torch sees no GPU; use device=auto or cpu")
    return dev


def _autocast(dev: torch.device, cfg: TrainConfig):
    if dev.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _to(x: torch.Tensor, dev: torch.device, cfg: TrainConfig) -> torch.Tensor:
    """A batch onto the training device. From pageable host memory a CUDA copy makes the host wait for it; from
    page-locked memory it is queued behind the previous step's kernels and the host goes on to launch the next
    step's. ``pin_memory()`` copies into a block of torch's caching host allocator, reused after the first steps."""
    if dev.type == "cuda" and cfg.pin_memory and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    x = x.to(dev, non_blocking=True)
    if dev.type == "cuda" and cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, cfg: TrainConfig | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a model over a loader, in eval mode."""
    cfg = cfg or TrainConfig()
    dev = next(iter(model.state_dict().values())).device
    was = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with _fixed_weights(model):
        for x, y in loader:
            x, y = _to(x, dev, cfg), _to(y, dev, cfg)
            with _autocast(dev, cfg):
                logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += y.numel()
    model.train(was)
    if total == 0:
        raise ValueError("evaluation loader yielded no samples; check the task's test split")
    return correct / total, loss_sum / total


def _fixed_weights(model: nn.Module):
    """A KSMNet's W_task built once for an inference pass (``KSMNet.fixed_weights``); nothing for a plain model."""
    return model.fixed_weights() if isinstance(model, KSMNet) else nullcontext()


def _steps_per_epoch(loader: Iterable, cfg: TrainConfig) -> int | None:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return cfg.max_steps_per_epoch
    return min(n, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n


def drain_epochs(epochs: Generator[dict[str, float], None, R], on_epoch: EpochCallback | None = None) -> R:
    """Run an epoch generator (``fit_task_epochs``, or one wrapping it) to its end, showing every epoch's record
    to ``on_epoch``; returns the generator's return value."""
    while True:
        try:
            rec = next(epochs)
        except StopIteration as stop:
            return stop.value
        if on_epoch is not None:
            on_epoch(int(rec["epoch"]), rec)


def _fit_epochs(model: nn.Module, groups: list[dict], train_loader: Iterable, test_loader: Iterable | None,
                cfg: TrainConfig, dev: torch.device, fwd: Callable[[torch.Tensor], torch.Tensor] | None = None,
                compiling: bool = False) -> Generator[dict[str, float], None, FitResult]:
    """The training loop, one epoch per ``next()``: it yields each epoch's record and returns the FitResult.
    A generator so that a caller can step several tasks in lockstep in one thread (Tune trials do).

    ``fwd``: the training forward (default: the model; a task under ``compile``: its
    ``compiled.TrainForward``). ``compiling``: this fit's first step compiles (its time is compile_seconds).
    Evaluation always runs the model itself, eagerly."""
    groups = [g for g in groups if g["params"]]
    fwd = fwd or model
    opt = torch.optim.Adam(groups, weight_decay=cfg.weight_decay, foreach=True)
    spe = _steps_per_epoch(train_loader, cfg)
    sched = None
    if cfg.schedule == "cosine" and spe:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * spe)
    res = FitResult(device=str(dev))
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (x, y) in enumerate(train_loader):
            if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
                break
            first = compiling and res.steps == 0
            if first:
                t_first = time.perf_counter()
            x, y = _to(x, dev, cfg), _to(y, dev, cfg)
            with _autocast(dev, cfg):
                logits = fwd(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if first:
                res.compile_seconds = time.perf_counter() - t_first  # a compiled step's time is taken off below
                t_rest = time.perf_counter()
            loss_sum += loss.detach() * y.numel()  # stays on device: no sync per step
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            res.steps += 1
        if seen == 0:
            raise ValueError("training loader yielded no samples; check the task's train split")
        # reading the epoch's sums waits for its last step on a GPU: taken before the clock stops, so the time
        # of the steps still queued when the host finished launching them counts
        train_loss, train_acc = float(loss_sum) / seen, float(correct) / seen
        res.train_seconds += time.perf_counter() - t0
        if compiling and epoch == 0 and res.steps > 1:
            res.compile_seconds = max(0.0, res.compile_seconds - (time.perf_counter() - t_rest) / (res.steps - 1))
        res.samples += seen
        rec = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "epoch_seconds": time.perf_counter() - t0}
        if test_loader is not None:
            rec["test_acc"], rec["test_loss"] = evaluate(model, test_loader, cfg)
        res.history.append(rec)
        yield rec
    res.total_seconds = time.perf_counter() - t_start
    return res


def fit_task(net: KSMNet, task: int, train_loader: Iterable, test_loader: Iterable | None = None,
             cfg: TrainConfig | None = None, on_epoch: EpochCallback | None = None, deploy: bool = True) -> FitResult:
    """Train one task of ``net`` (its masks + BN + head, or all its weights for 'finetune'), evaluate it.

    With ``deploy`` (default) the task is fixed afterwards and the final test accuracy is measured on the
    deployed task: the number its artifact reproduces. ``on_epoch(epoch, record)`` sees every epoch's metrics.
    """
    return drain_epochs(fit_task_epochs(net, task, train_loader, test_loader, cfg, deploy), on_epoch)


def fit_task_epochs(net: KSMNet, task: int, train_loader: Iterable, test_loader: Iterable | None = None,
                    cfg: TrainConfig | None = None, deploy: bool = True) -> Generator[dict[str, float], None, FitResult]:
    """:func:`fit_task`, one epoch per ``next()``: yields each epoch's record, returns the FitResult (after the
    deploy and the final evaluation, which run on the ``next()`` after the last epoch)."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    dev = resolve_device(cfg.device)
    net.check_task(task)
    if net.is_deployed(task) and net.specs[task].masked:
        raise ValueError(f"task {task} ({net.task_names[task]}) is deployed (fixed); add a new task to train again")
    p = net.task_parameters(task)
    net.to(dev)
    if dev.type == "cuda" and cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    net.set_task(task)
    if net.specs[task].method == "finetune":
        groups = [{"params": p["masks"] + p["bn"], "lr": cfg.lr_finetune}, {"params": p["head"], "lr": cfg.lr_head}]
    else:
        groups = [{"params": p["masks"] + p["bn"], "lr": cfg.lr_mask}, {"params": p["head"], "lr": cfg.lr_head}]
    # cfg.compile: the training forward through the process's cached graph (ksm_core.compiled): inductor fuses
    # each masked layer's element-wise passes (threshold, soft part, slope) and the BN / ReLU around the convs,
    # and a task after the first in a process compiles nothing (the same holds for the fine-tune baseline)
    key = compiled.graph_key(net, task)
    spe = _steps_per_epoch(train_loader, cfg)
    use = key is not None and (cfg.compile is True or (
        cfg.compile == "auto" and compiled.should_compile(key, cfg.epochs * spe if spe else None)))
    fwd = compiled.TrainForward(net, task) if use else None
    res = yield from _fit_epochs(net, groups, train_loader, test_loader, cfg, dev, fwd=fwd,
                                 compiling=fwd is not None and fwd.new)
    res.compiled = use and fwd.ok is not False
    if not res.compiled:  # (a body with anything after its head ran eagerly: nothing was compiled)
        res.compile_seconds = 0.0
    if not use:
        compiled.note_eager_steps(key, res.steps)
    if deploy:
        net.deploy(task)
    if cfg.head_refit:
        t0 = time.perf_counter()
        refit_head(net, task, train_loader, cfg)
        res.refit_seconds = time.perf_counter() - t0
        res.train_seconds += res.refit_seconds
    if test_loader is not None:
        res.test_acc, res.test_loss = evaluate(net, test_loader, cfg)
    return res


@torch.no_grad()
def _head_inputs(net: KSMNet, task: int, loader: Iterable, cfg: TrainConfig, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs (the task's penultimate features, eval mode) and labels for up to ``limit`` samples."""
    dev = next(iter(net.state_dict().values())).device
    feats: list[torch.Tensor] = []
    hook = net.heads.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach().float()))
    was = net.training
    net.set_task(task).eval()
    ys: list[torch.Tensor] = []
    seen = 0
    try:
        with _fixed_weights(net):
            for x, y in loader:
                with _autocast(dev, cfg):
                    net(_to(x, dev, cfg))
                ys.append(_to(y, dev, cfg))
                seen += y.numel()
                if seen >= limit:
                    break
    finally:
        hook.remove()
        net.train(was)
    if not ys:
        raise ValueError("head refit: the training loader yielded no samples; check the task's train split")
    return torch.cat(feats)[:limit], torch.cat(ys)[:limit]


def refit_head(net: KSMNet, task: int, loader: Iterable, cfg: TrainConfig | None = None) -> None:
    """Fit a task's head alone to the features the trained task now computes: the convex problem (softmax
    regression with a small L2) solved by L-BFGS from the current head.

    Why (issue #22, benchmarks/RESULTS.md): on a short schedule the masks and BN move much faster than the head,
    whose weights and bias step by ~lr each. In the runs that ended at chance, nearly every sample of one class
    reached the head as one and the same feature vector (nothing of the image got through), a code that still
    separates the two classes, but the head's bias had not moved far enough to call that class: its logits sat
    at a near-tie, test loss 0.39 with accuracy 0.50. Recalibrating BN, a head-only warm-up, a zero-initialised
    or faster head, and lower or warmed-up mask learning rates did not remove the collapse; fitting the head to the final features does, on every seed. It
    costs one eval-mode pass over (at most ``head_refit_samples`` of) the train split. The backbone and the
    masks are untouched; the artifact stores the refitted head, so it reproduces the reported accuracy.
    """
    cfg = cfg or TrainConfig()
    x, y = _head_inputs(net, task, loader, cfg, cfg.head_refit_samples)
    head = net.heads.tasks[str(task)]
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=REFIT_MAX_ITER, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(x), y) + REFIT_L2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)


def train_backbone(model: nn.Module, train_loader: Iterable, test_loader: Iterable | None = None,
                   cfg: TrainConfig | None = None, on_epoch: EpochCallback | None = None) -> FitResult:
    """Train a plain network (all parameters, Adam at ``lr_backbone``) on the initial task."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    dev = resolve_device(cfg.device)
    model.to(dev)
    if dev.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # compile (true; auto is eager here: one network, one fit): the whole network through torch.compile
    fwd = torch.compile(model) if cfg.compile is True else None
    res = drain_epochs(_fit_epochs(model, [{"params": [q for q in model.parameters() if q.requires_grad],
                                      "lr": cfg.lr_backbone}], train_loader, test_loader, cfg, dev, fwd=fwd,
                                   compiling=fwd is not None), on_epoch)
    res.compiled = fwd is not None
    if test_loader is not None:
        res.test_acc, res.test_loss = evaluate(model, test_loader, cfg)
    return res
