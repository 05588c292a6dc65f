"""GPU device check: one task at paper scale, several tasks packed on one GPU, and how much of the GPU a step uses.

    benchmarks/gpu_check.sh --prepare            # here, on CPU: real Fashion-MNIST -> outputs/gpu_check_data.npz
    benchmarks/gpu_check.sh [--out DIR]          # on the GPU machine (sized to finish in < 8 min on an H100)
    benchmarks/gpu_check.sh --smoke [--out DIR]  # on CPU in seconds: the same sections and summary keys, tiny sizes

Measures, on one CUDA GPU (VGG16-BN width 1, tasks of 2500 train images 32x32x3 made from real Fashion-MNIST,
30 epochs, batch 32, cudnn.benchmark on, channels_last):
  1. one task: seconds per task (the whole ``ksm_core.fit_task``: 30 epochs and the deploy, evaluation excluded)
     and test accuracy for fine-tune, Piggyback and KSM, in fp32 and in bf16 autocast;
  2. 1, 4 and 8 KSM bf16 tasks at once, each in its own process: wall time from the moment all of them are loaded
     and warmed up to the last one's end (the start-up is reported apart), tasks/hour, and 20 tasks projected;
  3. the share of the GPU's bf16 dense peak a training step reaches: FLOPs of one step counted with
     ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and backward) times the
     steps, over the measured training seconds; the peak comes from a small table keyed by the GPU's name;
  4. ksm_core's fast paths, each switched off alone against all on (KSM, host-memory batches as the pipeline's
     loader makes them): ms per step without pinned memory, without channels_last, without bf16, and with
     ``torch.compile`` (its compile seconds beside its gain); and the host syncs a training step makes, counted
     with ``torch.cuda.set_sync_debug_mode("warn")`` (on the CPU smoke run: the host reads of the dispatched ops);
  5. the 224-px data path (issue #21): JPEG decode of real Fashion-MNIST images upsampled to 256-300 px (quality 90,
     made in memory), images/s of ``torchvision.io.decode_jpeg`` on the device (a batch a call, as the loader does
     on CUDA), of the same plus ksm_core's RandomResizedCrop(224) per image there, and of PIL on one CPU thread;
     beside them, images/s of a KSM-masked resnet18 and resnet50 training step at 224 px (ksm_core's ``fit_task``
     step, batch 32), so the decode a GPU job needs per second is next to what decodes it.
Targets are printed beside the numbers, not asserted: a KSM task <= 10 s; 20 tasks <= 60 s wall when packed.

The backbone is trained first, briefly (``--backbone-epochs``, 0 = random init), on the other five Fashion-MNIST
classes (T-shirt .. coat); the tasks are the last five (sandal .. ankle boot). Data: ``--data`` (the npz that
``--prepare`` writes) if present, else the Debian package dataset-fashion-mnist read directly; images stay uint8
until on the device, where they are resized to 32x32 once. Writes summary.json and summary.md into ``--out``.

Without a CUDA GPU and without --smoke the check says so and exits with status 1: CPU numbers at paper scale would
take hours and answer nothing. --smoke runs on the CPU even where a GPU is present (one torch thread per process).
Needs only ksm_core, torch, torchvision (and the Pillow it installs) and numpy (no Ray, MLflow or Hydra).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ksm_core import KSMNet, TrainConfig, create_model, evaluate, fit_task, train_backbone
from ksm_core.transforms import random_resized_crop_params, resized_crop

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "outputs" / "gpu_check_data.npz"
DEFAULT_OUT = REPO / "outputs" / "gpu_check"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
BACKBONE_CLASSES = (0, 1, 2, 3, 4)  # T-shirt, trouser, pullover, dress, coat
TASK_CLASSES = (5, 6, 7, 8, 9)      # sandal, shirt, sneaker, bag, ankle boot
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
MODEL = "vgg16_bn_cifar"
METHODS = ("finetune", "piggyback", "ksm")
PACKED_METHOD = "ksm"
BACKBONE_BATCH = 128
EVAL_BATCH = 500
PROBE_STEPS = 2
FAST_PATH_STEPS = 60   # timed steps per fast-path switch (full batches only: 60 x 32 <= 2500 images)
FAST_PATH_WARMUP = 10  # untimed steps before them (cudnn autotuning, the pinned-block cache, allocator growth)
# ops whose result the host must read: a CUDA sync wherever their input lives on the GPU
HOST_READ_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.masked_select",
                 "aten._unique2", "aten.unique_consecutive", "aten.repeat_interleave")
TARGET_KSM_TASK_S = 10.0
TARGET_TASKS, TARGET_TASKS_WALL_S = 20, 60.0
# bf16 dense tensor-core peak (TFLOPS, no sparsity), first matching substring of torch.cuda.get_device_name wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 80GB HBM3", 989.4),  # the SXM part's name as the driver reports it
    ("H100 SXM", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """Everything that differs between the GPU check and its CPU smoke run; images are counted per class."""

    width: float
    backbone_train: int
    backbone_test: int
    task_train: int
    task_test: int
    epochs: int
    batch: int
    backbone_epochs: int
    parallel: tuple[int, ...]
    precisions: tuple[str, ...]
    compile_row: bool  # section 4's compiled step: 7-40 s of compiling on a CPU, so not in the smoke run
    decode_images: int = 2048            # section 5: JPEGs decoded per measurement
    decode_batch: int = 128              # ... per decode_jpeg call
    step_models: tuple[str, ...] = ("resnet18", "resnet50")  # ... KSM steps at 224 px
    step_batch: int = 32
    step_steps: int = 20                 # timed steps per model (after as many untimed)


FULL = Scale(width=1.0, backbone_train=1500, backbone_test=200, task_train=500, task_test=500, epochs=30, batch=32,
             backbone_epochs=3, parallel=(1, 4, 8), precisions=("fp32", "bf16"), compile_row=True)
# bf16 autocast is CUDA-only in ksm_core: the smoke run is fp32
SMOKE = Scale(width=0.0625, backbone_train=40, backbone_test=20, task_train=40, task_test=20, epochs=1, batch=32,
              backbone_epochs=1, parallel=(1, 2), precisions=("fp32",), compile_row=False, decode_images=16,
              decode_batch=8, step_models=("resnet18",), step_batch=2, step_steps=1)
JPEG_SIDES = (256, 300)  # section 5: each JPEG's height and width are drawn in this range


# ------------------------------------------------------------------------------------------------ data (host)
def read_idx(path: Path) -> np.ndarray:
    """One gzipped unsigned-byte IDX file as a uint8 array (numpy + gzip only: the GPU machine has no pipeline)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4]!r})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def read_debian(folder: Path) -> dict[str, np.ndarray]:
    """Fashion-MNIST's four IDX files as {train,test}_{x,y}, original labels 0..9."""
    out = {}
    for split, (images, labels) in IDX_FILES.items():
        out[f"{split}_x"], out[f"{split}_y"] = read_idx(folder / images), read_idx(folder / labels)
    return out


def take(x: np.ndarray, y: np.ndarray, classes: tuple[int, ...], per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of each class, in file order (reproducible without a seed)."""
    idx = []
    for c in classes:
        found = np.flatnonzero(y == c)[:per_class]
        if len(found) < per_class:
            raise ValueError(f"class {c} has {len(found)} images, {per_class} needed: the data file is too small "
                             "for this scale; rerun --prepare")
        idx.append(found)
    keep = np.sort(np.concatenate(idx))
    return x[keep], y[keep]


def carve(raw: dict[str, np.ndarray], scale: Scale) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four splits a check uses, labels renumbered 0..4 within the backbone's and the task's classes."""
    parts = {
        "backbone_train": ("train", BACKBONE_CLASSES, scale.backbone_train),
        "backbone_test": ("test", BACKBONE_CLASSES, scale.backbone_test),
        "task_train": ("train", TASK_CLASSES, scale.task_train),
        "task_test": ("test", TASK_CLASSES, scale.task_test),
    }
    out = {}
    for name, (split, classes, per_class) in parts.items():
        x, y = take(raw[f"{split}_x"], raw[f"{split}_y"], classes, per_class)
        out[name] = (x, (y - min(classes)).astype(np.int64))
    return out


def prepare(path: Path) -> None:
    """Write the images the full check needs (and no more) as one small compressed npz, original labels kept."""
    raw = read_debian(DEBIAN_FASHION_MNIST)
    small = {}
    for split, per_class in (("train", (FULL.backbone_train, FULL.task_train)),
                             ("test", (FULL.backbone_test, FULL.task_test))):
        parts = [take(raw[f"{split}_x"], raw[f"{split}_y"], cls, n)
                 for cls, n in zip((BACKBONE_CLASSES, TASK_CLASSES), per_class)]
        small[f"{split}_x"] = np.concatenate([p[0] for p in parts])
        small[f"{split}_y"] = np.concatenate([p[1] for p in parts])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **small)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB: {len(small['train_x'])} train and "
          f"{len(small['test_x'])} test images of real Fashion-MNIST from {DEBIAN_FASHION_MNIST})")


def load_raw(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """The prepared npz, else the Debian package; a clear error naming both (and --prepare) if neither is here."""
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}, str(path)
    if all((DEBIAN_FASHION_MNIST / f).is_file() for pair in IDX_FILES.values() for f in pair):
        return read_debian(DEBIAN_FASHION_MNIST), str(DEBIAN_FASHION_MNIST)
    raise SystemExit(f"gpu_check: no Fashion-MNIST data: neither {path} nor the Debian package's IDX files in "
                     f"{DEBIAN_FASHION_MNIST}. Make the npz on a machine with the package: "
                     "`benchmarks/gpu_check.sh --prepare` (then copy outputs/gpu_check_data.npz along)")


# ---------------------------------------------------------------------------------------------- data (device)
def to_device_images(x: np.ndarray, dev: torch.device) -> Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 3, 32, 32) on the device, resized once there (not per step)."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(dev).unsqueeze(1).float().div_(255.0)
    t = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)
    return ((t - FASHION_MEAN) / FASHION_STD).expand(-1, 3, -1, -1).contiguous()


class DeviceBatches:
    """Mini-batches of a split held in one tensor. On the device each step is one index op, no host copy, no sync;
    held in host memory (section 4) each step is a fresh pageable tensor, as the pipeline's loader yields.

    The loader ``fit_task`` expects (re-iterable, ``len``, ``set_epoch``). The epoch's order is drawn on the device
    (argsort of uniform noise from a device generator seeded by (seed, epoch)): a host-drawn permutation would
    cost a blocking copy, and the same seed gives every run of the check the same order.
    """

    def __init__(self, x: Tensor, y: Tensor, batch: int, shuffle: bool, seed: int = 0):
        self.x, self.y, self.batch, self.shuffle, self.seed = x, y, batch, shuffle, seed
        self.epoch = 0
        self.gen = torch.Generator(device=x.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.y)
        if self.shuffle:
            self.gen.manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.rand(n, device=self.x.device, generator=self.gen).argsort()
        else:
            order = torch.arange(n, device=self.x.device)
        for i in range(0, n, self.batch):
            idx = order[i: i + self.batch]
            yield self.x[idx], self.y[idx]


def loaders(split: tuple[np.ndarray, np.ndarray], batch: int, dev: torch.device, seed: int
            ) -> tuple[DeviceBatches, DeviceBatches]:
    """(shuffled train batches, fixed-order evaluation batches) of one split, uploaded once."""
    x, y = to_device_images(split[0], dev), torch.from_numpy(split[1]).to(dev)
    return DeviceBatches(x, y, batch, shuffle=True, seed=seed), DeviceBatches(x, y, EVAL_BATCH, shuffle=False)


# ----------------------------------------------------------------------------------------------- measurement
def sync(dev: torch.device) -> None:
    """Wait for the GPU: only around timings, never inside the timed steps."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device) -> tuple[Any, float]:
    """(fn(), seconds), the GPU drained before and after so the seconds are the work's, not the queue's."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def train_config(precision: str, scale: Scale, dev: torch.device, seed: int) -> TrainConfig:
    """ksm_core's defaults (Adam, lr 2e-4, cosine) at this scale; bf16 is ksm_core's autocast switch."""
    return TrainConfig(epochs=scale.epochs, device=str(dev), amp=precision == "bf16", channels_last=True, seed=seed)


def pretrain_backbone(data: dict[str, tuple[np.ndarray, np.ndarray]], scale: Scale, dev: torch.device
                      ) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen backbone every task adapts: briefly trained on the backbone classes (random if 0 epochs)."""
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=len(BACKBONE_CLASSES), width=scale.width)
    info: dict[str, Any] = {"init": "random", "classes": list(BACKBONE_CLASSES), "epochs": scale.backbone_epochs,
                            "train_images": int(len(data["backbone_train"][1])), "seconds": 0.0, "test_acc": None}
    if scale.backbone_epochs == 0:
        return model, info
    train, _ = loaders(data["backbone_train"], BACKBONE_BATCH, dev, seed=0)
    _, test = loaders(data["backbone_test"], BACKBONE_BATCH, dev, seed=0)
    cfg = dataclasses.replace(train_config("bf16", scale, dev, seed=0), epochs=scale.backbone_epochs)
    res, seconds = timed(lambda: train_backbone(model, train, test, cfg), dev)
    info.update(init="pretrained", seconds=seconds, test_acc=res.test_acc)
    return model, info


def new_task(backbone: nn.Module, method: str) -> tuple[KSMNet, int]:
    """A fresh KSMNet on the backbone with one task of ``method`` added."""
    net = KSMNet.from_backbone(backbone)
    return net, net.add_task(len(TASK_CLASSES), method=method, name=method)


def probe(backbone: nn.Module, method: str, cfg: TrainConfig, train: DeviceBatches) -> float:
    """FLOPs per training sample of ``fit_task``'s own step, counted over a few steps of a throwaway task.

    Untimed on purpose: these steps also pay cudnn's autotuning, the allocator's first growth and the CUDA
    context's lazy set-ups, so the timed fit that follows measures steady training only.
    """
    net, task = new_task(backbone, method)
    with FlopCounterMode(display=False) as counter:
        res = fit_task(net, task, train, None, dataclasses.replace(cfg, epochs=1, max_steps_per_epoch=PROBE_STEPS),
                       deploy=False)
    return counter.get_total_flops() / res.samples


def fit_timed(net: KSMNet, task: int, cfg: TrainConfig, train: DeviceBatches, test: DeviceBatches,
              dev: torch.device) -> dict[str, Any]:
    """Train and deploy one task (seconds per task), then its test accuracy on the deployed task."""
    res, seconds = timed(lambda: fit_task(net, task, train, None, cfg), dev)
    acc, _ = evaluate(net, test, cfg)
    return {"seconds_per_task": seconds, "train_seconds": res.train_seconds, "steps": res.steps,
            "samples": res.samples, "test_acc": acc}


def single_task(backbone: nn.Module, method: str, precision: str, data: dict, scale: Scale,
                dev: torch.device) -> dict[str, Any]:
    """Section 1's row: one task of ``method`` at ``precision``, alone on the device."""
    train, _ = loaders(data["task_train"], scale.batch, dev, seed=0)
    _, test = loaders(data["task_test"], scale.batch, dev, seed=0)
    cfg = train_config(precision, scale, dev, seed=0)
    flops = probe(backbone, method, cfg, train)
    net, task = new_task(backbone, method)
    row = {"method": method, "precision": precision, **fit_timed(net, task, cfg, train, test, dev)}
    print(f"  {method:9s} {precision}: {row['seconds_per_task']:7.2f} s/task, test acc {row['test_acc']:.4f}",
          flush=True)
    return {**row, "flops_per_sample": flops}


def utilisation(row: dict[str, Any], batch: int, peak_tflops: float | None) -> dict[str, Any]:
    """Section 3 from a section-1 row: counted FLOPs x samples trained / training seconds, against the peak."""
    achieved = row["flops_per_sample"] * row["samples"] / row["train_seconds"] / 1e12
    return {"method": row["method"], "precision": row["precision"], "batch": batch,
            "gflop_per_step": row["flops_per_sample"] * batch / 1e9,
            "ms_per_step": 1e3 * row["train_seconds"] / row["steps"], "achieved_tflops": achieved,
            "peak_bf16_tflops": peak_tflops,
            "fraction_of_bf16_peak": achieved / peak_tflops if peak_tflops else None}


# --------------------------------------------------------------------------------------------- fast paths
class HostReads(TorchDispatchMode):
    """Counts the dispatched ops whose result the host reads (``.item()``, ``bool(t)``, ``nonzero`` ...): each is a
    CUDA sync when its input is on the GPU. Device-independent, so the CPU smoke run (and CI) counts them too.

    The optimizer's own step is not watched: Adam (not capturable) keeps its step counter in host memory on CUDA
    as well, so the ``.item()`` it takes of it is no sync there, only on a CPU where everything is host memory."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    def __enter__(self):
        self._hooks = [register_optimizer_step_pre_hook(lambda *_: self._pause(True)),
                       register_optimizer_step_post_hook(lambda *_: self._pause(False))]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def _pause(self, paused: bool) -> None:
        self.paused = paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not self.paused and name in HOST_READ_OPS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def count_syncs(run: Callable[[], Any], dev: torch.device) -> tuple[int, list[str]]:
    """(how many host syncs ``run()`` made, the first few of their messages). On CUDA each is a warning of
    ``torch.cuda.set_sync_debug_mode("warn")``; on a CPU each is a host read counted by :class:`HostReads`."""
    if dev.type != "cuda":
        with HostReads() as reads:
            run()
        return len(reads.ops), reads.ops[:5]
    sync(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return len(found), found[:5]


def step_syncs(backbone: nn.Module, cfg: TrainConfig, train: DeviceBatches, steps: int, dev: torch.device
               ) -> dict[str, Any]:
    """Host syncs per training step: one epoch of ``steps`` and one of ``2 * steps``, the difference over
    ``steps``, so what an epoch pays once (its loss and accuracy read at the end) cancels out."""
    counts = []
    for n in (steps, 2 * steps):
        net, task = new_task(backbone, PACKED_METHOD)
        one = dataclasses.replace(cfg, epochs=1, max_steps_per_epoch=n)
        counts.append(count_syncs(lambda: fit_task(net, task, train, None, one, deploy=False), dev))
    (short, where), (long, _) = counts
    return {"check": "torch.cuda.set_sync_debug_mode" if dev.type == "cuda" else "host reads of dispatched ops",
            "steps": steps, "syncs_per_step": (long - short) / steps, "syncs_per_epoch": short, "first": where}


def fast_paths(backbone: nn.Module, data: dict, scale: Scale, precision: str, dev: torch.device) -> dict[str, Any]:
    """Section 4: ms per KSM step with every fast path on, then each switched off alone (and compile on)."""
    host = to_device_images(data["task_train"][0], torch.device("cpu"))
    train = DeviceBatches(host, torch.from_numpy(data["task_train"][1]), scale.batch, shuffle=True)
    full = len(train.y) // scale.batch  # steps stay within the full batches: one shape, so one compile
    steps, warmup = min(FAST_PATH_STEPS, full), min(FAST_PATH_WARMUP, full)
    base = dataclasses.replace(train_config(precision, scale, dev, seed=0), pin_memory=True, compile=False)
    switches = [("all on", {}), ("pin_memory off", {"pin_memory": False}),
                ("channels_last off", {"channels_last": False})]
    if scale.compile_row:
        switches.append(("compile on", {"compile": True}))
    if precision == "bf16":
        switches.append(("bf16 off (fp32)", {"amp": False}))
    rows = []
    for name, change in switches:
        cfg = dataclasses.replace(base, **change)
        net, task = new_task(backbone, PACKED_METHOD)
        if not cfg.compile:  # a compiled step warms up inside its own timed run: its first step is the compile
            fit_task(net, task, train, None, dataclasses.replace(cfg, epochs=1, max_steps_per_epoch=warmup),
                     deploy=False)
            net, task = new_task(backbone, PACKED_METHOD)
        res, _ = timed(lambda: fit_task(net, task, train, None,
                                        dataclasses.replace(cfg, epochs=1, max_steps_per_epoch=steps), deploy=False),
                       dev)
        ms = 1e3 * (res.train_seconds - res.compile_seconds) / res.steps
        rows.append({"switch": name, "ms_per_step": ms, "compile_seconds": res.compile_seconds if cfg.compile else None})
        print(f"  {name:18s}: {ms:8.2f} ms/step" + (f" ({res.compile_seconds:.1f} s compiling)" if cfg.compile else ""),
              flush=True)
    for r in rows:
        r["vs_all_on"] = r["ms_per_step"] / rows[0]["ms_per_step"]
    return {"method": PACKED_METHOD, "precision": precision, "batches": "host memory, a new tensor per step",
            "steps": steps, "rows": rows,
            "syncs": step_syncs(backbone, base, train, max(1, min(FAST_PATH_WARMUP, full // 2)), dev)}


# ------------------------------------------------------------------------------------------- 224-px data path
def jpeg_bytes(x: np.ndarray, n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs (quality 90, RGB) of real images ``x`` (uint8 [N, 28, 28]) upsampled (bicubic) to sides drawn in
    JPEG_SIDES, made in memory: what a passthrough shard of photos holds, without the pipeline to write one."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(JPEG_SIDES[0], JPEG_SIDES[1] + 1, size=2))
        buf = io.BytesIO()
        Image.fromarray(x[i % len(x)]).resize((w, h), Image.BICUBIC).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode_rates(blobs: list[bytes], batch: int, dev: torch.device) -> dict[str, Any]:
    """Images/s of PIL on one CPU thread, of ``decode_jpeg`` on ``dev`` a batch a call, and of that plus
    RandomResizedCrop(224) per image on ``dev`` (ksm_core's, as the loader's device path runs it)."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    n = len(blobs)
    t0 = time.perf_counter()
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            np.asarray(im.convert("RGB"))
    pil = n / (time.perf_counter() - t0)
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    g = torch.Generator().manual_seed(0)

    def decode(crop: bool) -> None:
        for i in range(0, n, batch):
            images = decode_jpeg(datas[i:i + batch], mode=ImageReadMode.RGB, device=dev)
            if crop:
                torch.stack([resized_crop(im, *random_resized_crop_params(im.shape[1], im.shape[2], g))
                             for im in images])

    decode(True)  # warm-up: the decoder's handles, the allocator, the resize kernels
    _, plain = timed(lambda: decode(False), dev)
    _, cropped = timed(lambda: decode(True), dev)
    return {"images": n, "batch": batch, "sides": list(JPEG_SIDES), "pil_cpu_1_thread": pil,
            "decode_jpeg_device": n / plain, "decode_jpeg_and_crop_device": n / cropped}


def step_rate_224(model: str, scale: Scale, precision: str, dev: torch.device) -> dict[str, Any]:
    """Images/s of ksm_core's KSM training step (``fit_task``'s, with this check's fast paths) of ``model`` at
    224 px, batch ``scale.step_batch``, inputs already on the device (random: the rate, not the accuracy)."""
    torch.manual_seed(0)
    n = scale.step_batch * scale.step_steps
    x = torch.randn(n, 3, 224, 224, device=dev)
    y = torch.randint(0, 10, (n,), device=dev)
    train = DeviceBatches(x, y, scale.step_batch, shuffle=False)
    cfg = dataclasses.replace(train_config(precision, scale, dev, seed=0), epochs=1,
                              max_steps_per_epoch=scale.step_steps)
    net = KSMNet.from_backbone(create_model(model, num_classes=10))
    fit_task(net, net.add_task(10, method="ksm"), train, None, cfg, deploy=False)  # warm-up (cudnn autotuning)
    net = KSMNet.from_backbone(create_model(model, num_classes=10))
    res, _ = timed(lambda: fit_task(net, net.add_task(10, method="ksm"), train, None, cfg, deploy=False), dev)
    return {"model": model, "batch": scale.step_batch, "precision": precision, "steps": res.steps,
            "ms_per_step": 1e3 * res.train_seconds / res.steps, "images_per_s": res.samples / res.train_seconds}


def data_path(x: np.ndarray, scale: Scale, precision: str, dev: torch.device) -> dict[str, Any]:
    """Section 5: JPEG decode rates beside the 224-px training steps' consumption."""
    out = decode_rates(jpeg_bytes(x, scale.decode_images), scale.decode_batch, dev)
    print(f"  decode: PIL 1 CPU thread {out['pil_cpu_1_thread']:.0f} img/s, decode_jpeg on {dev.type} "
          f"{out['decode_jpeg_device']:.0f} img/s (+ crop: {out['decode_jpeg_and_crop_device']:.0f})", flush=True)
    out["steps"] = []
    for model in scale.step_models:
        row = step_rate_224(model, scale, precision, dev)
        out["steps"].append(row)
        print(f"  {model} KSM step at 224 px: {row['images_per_s']:.1f} img/s ({row['ms_per_step']:.1f} ms/step)",
              flush=True)
    return out


# ------------------------------------------------------------------------------------------ packed processes
def worker(spec_path: str) -> None:
    """One packed task in its own process: load, warm up, say READY, wait for the go, train, print the RESULT."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    torch.backends.cudnn.benchmark = True
    scale = Scale(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["scale"].items()})  # JSON lists
    with np.load(spec["data"]) as z:
        split_train, split_test = (z["train_x"], z["train_y"]), (z["test_x"], z["test_y"])
    backbone = create_model(MODEL, num_classes=len(BACKBONE_CLASSES), width=scale.width,
                            weights_path=spec["backbone"])
    train, _ = loaders(split_train, scale.batch, dev, seed=spec["seed"])
    _, test = loaders(split_test, scale.batch, dev, seed=spec["seed"])
    cfg = train_config(spec["precision"], scale, dev, seed=spec["seed"])
    probe(backbone, PACKED_METHOD, cfg, train)
    net, task = new_task(backbone, PACKED_METHOD)
    sync(dev)
    print("READY", flush=True)
    sys.stdin.readline()
    print("RESULT " + json.dumps(fit_timed(net, task, cfg, train, test, dev)), flush=True)


def read_tagged(proc: subprocess.Popen, tag: str) -> str:
    """The rest of the first stdout line of ``proc`` that starts with ``tag``; fails loudly if it dies first."""
    for line in proc.stdout:
        if line.startswith(tag):
            return line[len(tag):].strip()
    raise RuntimeError(f"packed worker (pid {proc.pid}) exited with status {proc.wait()} before {tag.strip()!r}; "
                       "its traceback is above")


def packed(n: int, bundle: Path, scale: Scale, precision: str, dev: torch.device) -> dict[str, Any]:
    """Section 2's row: ``n`` tasks in ``n`` processes, released together once every one is loaded and warm."""
    threads = max(1, (os.cpu_count() or 1) // n) if dev.type == "cuda" else 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t_start = time.perf_counter()
    procs = []
    for i in range(n):
        spec = {"data": str(bundle / "task.npz"), "backbone": str(bundle / "backbone.pt"), "device": str(dev),
                "precision": precision, "seed": i, "threads": threads, "scale": dataclasses.asdict(scale)}
        (bundle / f"worker{i}.json").write_text(json.dumps(spec))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(bundle / f"worker{i}.json")],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
    for p in procs:
        read_tagged(p, "READY")
    t_go = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.close()
    results = [json.loads(read_tagged(p, "RESULT ")) for p in procs]
    t_end = time.perf_counter()
    for p in procs:
        p.wait()
    wall = t_end - t_go
    row = {"tasks": n, "wall_seconds": wall, "wall_with_startup_seconds": t_end - t_start,
           "tasks_per_hour": 3600.0 * n / wall,
           "mean_seconds_per_task": float(np.mean([r["seconds_per_task"] for r in results])),
           "mean_test_acc": float(np.mean([r["test_acc"] for r in results]))}
    print(f"  {n} at once: {wall:7.2f} s wall ({row['wall_with_startup_seconds']:.2f} s with start-up), "
          f"{row['tasks_per_hour']:.0f} tasks/hour", flush=True)
    return row


def write_bundle(bundle: Path, backbone: nn.Module, data: dict) -> None:
    """What the packed workers load: the backbone's weights and the task's uint8 images (no re-reading the source)."""
    torch.save({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}, bundle / "backbone.pt")
    (xtr, ytr), (xte, yte) = data["task_train"], data["task_test"]
    np.savez(bundle / "task.npz", train_x=xtr, train_y=ytr, test_x=xte, test_y=yte)


def projection(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """20 tasks as back-to-back rounds of n packed tasks, for the best measured n (start-up paid once, apart)."""
    best = min(runs, key=lambda r: math.ceil(TARGET_TASKS / r["tasks"]) * r["wall_seconds"])
    return {"projection_20_tasks_s": math.ceil(TARGET_TASKS / best["tasks"]) * best["wall_seconds"],
            "projection_packing": best["tasks"], "best_tasks_per_hour": max(r["tasks_per_hour"] for r in runs)}


# ---------------------------------------------------------------------------------------------------- report
def peak_bf16(name: str) -> float | None:
    """The device's bf16 dense peak from the table, None where the name is not in it (or on a CPU)."""
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def device_info(dev: torch.device) -> dict[str, Any]:
    """What ran the check: name, versions, and the TF32 switches that decide what 'fp32' means on the GPU."""
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU ({torch.get_num_threads()} torch threads)"
    return {"name": name, "type": dev.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "peak_bf16_tflops": peak_bf16(name) if cuda else None, "cpu_count": os.cpu_count(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """The one table formatter: a Markdown table, floats to 4 significant digits (CPU smoke TFLOPS are tiny)."""
    cell = lambda v: "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(value: float | None, target: float) -> str:
    """'met' / 'missed' for a number against an upper bound; '—' before it is measured."""
    return "—" if value is None else ("met" if value <= target else "missed")


def render_markdown(s: dict[str, Any]) -> str:
    """summary.md: the four sections as tables, the targets beside the numbers, what was run on what."""
    d, st, bb, pk = s["device"], s["setup"], s["setup"]["backbone"], s["packed"]
    head = [f"# GPU device check{' (CPU smoke run: not GPU results)' if s['smoke'] else ''}", "",
            f"Device: {d['name']}; torch {d['torch']}, CUDA {d['cuda']}; TF32 matmul {d['tf32_matmul']}, "
            f"TF32 cudnn {d['tf32_cudnn']}. Finished: {s['finished']} in {s['total_seconds']:.1f} s.", "",
            f"Model {st['model']} width {st['width']}; task: {st['train_images']} train / {st['test_images']} test "
            f"images 32x32x3 of real Fashion-MNIST classes {st['task_classes']} (from {st['data_source']}), "
            f"{st['epochs']} epochs, batch {st['batch']}. Backbone: {bb['init']}"
            + (f", trained {bb['epochs']} epochs on classes {bb['classes']} ({bb['train_images']} images, "
               f"{bb['seconds']:.1f} s, test acc {bb['test_acc']:.4f})" if bb["init"] == "pretrained" else "") + ".",
            "", "## One task", ""]
    single = md_table(["method", "precision", "s/task", "target", "test acc", "steps"],
                      [[r["method"], r["precision"], r["seconds_per_task"],
                        f"<= {TARGET_KSM_TASK_S:.0f} s: {verdict(r['seconds_per_task'], TARGET_KSM_TASK_S)}"
                        if r["method"] == "ksm" else None, f"{r['test_acc']:.4f}", r["steps"]]
                       for r in s["single_task"]])
    packed_md = md_table(["tasks at once", "wall s", "wall s with start-up", "tasks/hour", "mean s/task",
                          "mean test acc"],
                         [[r["tasks"], r["wall_seconds"], r["wall_with_startup_seconds"], f"{r['tasks_per_hour']:.0f}",
                           r["mean_seconds_per_task"], f"{r['mean_test_acc']:.4f}"] for r in pk["runs"]])
    proj = pk["projection_20_tasks_s"]
    proj_line = ("20 tasks: not measured." if proj is None else
                 f"20 tasks projected: {proj:.1f} s wall as rounds of {pk['projection_packing']} at once "
                 f"(target <= {TARGET_TASKS_WALL_S:.0f} s: {verdict(proj, TARGET_TASKS_WALL_S)}); "
                 "process start-up paid once on top.")
    util = md_table(["method", "precision", "batch", "GFLOP/step", "ms/step", "TFLOPS", "bf16 peak TFLOPS",
                     "of bf16 peak"],
                    [[u["method"], u["precision"], u["batch"], u["gflop_per_step"], u["ms_per_step"],
                      u["achieved_tflops"], u["peak_bf16_tflops"],
                      "unknown" if u["fraction_of_bf16_peak"] is None else f"{100 * u['fraction_of_bf16_peak']:.2f}%"]
                     for u in s["utilisation"]])
    return "\n".join(head + [single, "", f"## Tasks packed on one device ({pk['method']}, {pk['precision']}, "
                             "one process each)", "", packed_md, "", proj_line, "",
                             "## Share of the bf16 dense peak per training step (FLOPs counted: matmul + conv)", "",
                             util, "", *render_fast_paths(s["fast_paths"]), *render_data_path(s["data_path"])])


def render_fast_paths(fp: dict[str, Any] | None) -> list[str]:
    """Section 4's lines: one row per switch, then the host syncs per step."""
    if fp is None:
        return ["## Fast paths", "", "Not measured (the run stopped before this section).", ""]
    rows = md_table(["switch", "ms/step", "vs all on", "compile s"],
                    [[r["switch"], r["ms_per_step"], f"{r['vs_all_on']:.2f}x", r["compile_seconds"]]
                     for r in fp["rows"]])
    sy = fp["syncs"]
    return [f"## Fast paths ({fp['method']}, {fp['precision']}, {fp['batches']}, {fp['steps']} steps each)", "", rows,
            "", f"Host syncs per training step: {sy['syncs_per_step']:g} (counted by {sy['check']} over epochs of "
            f"{sy['steps']} and {2 * sy['steps']} steps; an epoch's end reads its loss and accuracy once: "
            f"{sy['syncs_per_epoch']} in all, first {sy['first']}).", ""]


def render_data_path(dp: dict[str, Any] | None) -> list[str]:
    """Section 5's lines: decode rates, then the 224-px steps they feed."""
    if dp is None:
        return ["## 224-px data path", "", "Not measured (the run stopped before this section).", ""]
    decode = md_table(["decoder", "images/s"],
                      [["PIL, 1 CPU thread", dp["pil_cpu_1_thread"]],
                       ["torchvision decode_jpeg on the device", dp["decode_jpeg_device"]],
                       ["decode_jpeg + RandomResizedCrop(224) on the device", dp["decode_jpeg_and_crop_device"]]])
    steps = md_table(["model", "precision", "batch", "ms/step", "images/s"],
                     [[r["model"], r["precision"], r["batch"], r["ms_per_step"], r["images_per_s"]]
                      for r in dp["steps"]])
    return [f"## 224-px data path ({dp['images']} JPEGs of {dp['sides'][0]}-{dp['sides'][1]} px, quality 90, "
            f"{dp['batch']} a decode call)", "", decode, "", "KSM training step at 224 px (inputs on the device):", "",
            steps, ""]


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """summary.json and summary.md, rewritten after every section so a run cut short still leaves its numbers."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(render_markdown(summary))


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU-sized run (seconds, 1 torch thread per process): tiny width, 1 epoch, fp32")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where summary.json/.md go (default {DEFAULT_OUT})")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"prepared npz (default {DEFAULT_DATA})")
    ap.add_argument("--prepare", action="store_true", help="write --data from the Debian package, then exit")
    ap.add_argument("--epochs", type=int, help="epochs per task (default 30; smoke 1)")
    ap.add_argument("--backbone-epochs", type=int, help="backbone pre-training epochs, 0 = random init (default 3)")
    ap.add_argument("--parallel", help="comma-separated task counts run at once (default 1,4,8; smoke 1,2)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def scale_from(args: argparse.Namespace) -> Scale:
    """FULL or SMOKE with the command line's overrides."""
    base = SMOKE if args.smoke else FULL
    over: dict[str, Any] = {}
    if args.epochs is not None:
        over["epochs"] = args.epochs
    if args.backbone_epochs is not None:
        over["backbone_epochs"] = args.backbone_epochs
    if args.parallel:
        over["parallel"] = tuple(int(n) for n in args.parallel.split(","))
    return dataclasses.replace(base, **over)


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """The four sections in order, the summary rewritten after each."""
    t0 = time.perf_counter()
    scale = scale_from(args)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if dev.type == "cpu" and not args.smoke:
        raise SystemExit("gpu_check: torch sees no CUDA GPU; this check is for a GPU machine "
                         "(use --smoke for the CPU-sized run)")
    if args.smoke:
        torch.set_num_threads(1)  # as each packed worker: a small shared CPU, and no OpenMP spin between processes
    torch.backends.cudnn.benchmark = True
    raw, source = load_raw(args.data)
    data = carve(raw, scale)
    peak = peak_bf16(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    packed_precision = scale.precisions[-1]
    summary: dict[str, Any] = {
        "smoke": args.smoke, "finished": False, "total_seconds": 0.0, "device": device_info(dev),
        "setup": {"model": MODEL, "width": scale.width, "train_images": int(len(data["task_train"][1])),
                  "test_images": int(len(data["task_test"][1])), "image_size": 32, "epochs": scale.epochs,
                  "batch": scale.batch, "task_classes": list(TASK_CLASSES), "data_source": source},
        "single_task": [], "utilisation": [],
        "packed": {"method": PACKED_METHOD, "precision": packed_precision, "runs": [],
                   "projection_20_tasks_s": None, "projection_packing": None, "best_tasks_per_hour": None},
        "targets": {"ksm_task_s": TARGET_KSM_TASK_S, "ksm_task_s_measured": None, "ksm_task_met": None,
                    "twenty_tasks_wall_s": TARGET_TASKS_WALL_S, "twenty_tasks_projected_s": None,
                    "twenty_tasks_met": None},
        "fast_paths": None, "data_path": None,
    }
    print(f"gpu_check on {summary['device']['name']}: backbone ...", flush=True)
    backbone, summary["setup"]["backbone"] = pretrain_backbone(data, scale, dev)
    backbone.cpu()
    print("one task:", flush=True)
    for precision in scale.precisions:
        for method in METHODS:
            row = single_task(backbone, method, precision, data, scale, dev)
            summary["utilisation"].append(utilisation(row, scale.batch, peak))
            summary["single_task"].append({k: v for k, v in row.items() if k != "flops_per_sample"})
    ksm_s = next(r["seconds_per_task"] for r in summary["single_task"]
                 if r["method"] == "ksm" and r["precision"] == packed_precision)
    summary["targets"].update(ksm_task_s_measured=ksm_s, ksm_task_met=ksm_s <= TARGET_KSM_TASK_S)
    summary["total_seconds"] = time.perf_counter() - t0
    write_summary(args.out, summary)
    print("tasks packed:", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        write_bundle(Path(tmp), backbone, data)
        for n in scale.parallel:
            summary["packed"]["runs"].append(packed(n, Path(tmp), scale, packed_precision, dev))
    summary["packed"].update(projection(summary["packed"]["runs"]))
    proj = summary["packed"]["projection_20_tasks_s"]
    summary["targets"].update(twenty_tasks_projected_s=proj, twenty_tasks_met=proj <= TARGET_TASKS_WALL_S)
    summary["total_seconds"] = time.perf_counter() - t0
    write_summary(args.out, summary)
    print("fast paths:", flush=True)
    summary["fast_paths"] = fast_paths(backbone, data, scale, packed_precision, dev)
    summary["total_seconds"] = time.perf_counter() - t0
    write_summary(args.out, summary)
    print("224-px data path:", flush=True)
    summary["data_path"] = data_path(data["task_train"][0], scale, packed_precision, dev)
    summary.update(finished=True, total_seconds=time.perf_counter() - t0)
    write_summary(args.out, summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
    elif args.prepare:
        prepare(args.data)
    else:
        run_check(args)
        print(f"\n{(args.out / 'summary.md').read_text()}\nwrote {args.out}/summary.json and summary.md")


if __name__ == "__main__":
    main()
