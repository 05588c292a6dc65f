"""The loader at 224 px (issue #21): JPEG decode + the imagenet transform vs the rate a training step consumes.

Data: one task of real Fashion-MNIST images (/usr/share/datasets/fashion-mnist), each upsampled to its own size
between 256 and 300 px a side (bicubic, RGB) and stored as a JPEG of quality 90, written as WebDataset shards
with ``webdataset.TarWriter`` and a hand-made manifest (``Manifest`` / ``TaskInfo``), the layout the shard writer
makes (``<root>/<stream>/manifest.json`` -> ``../tasks/<task>-<key>/<split>-NNNNNN.tar``).

Loader: images/s of whole epochs of ``make_loader(..., transform="imagenet")`` (read + sha256, tar parsing,
shuffle, JPEG decode, RandomResizedCrop(224) + flip or Resize(256) + CenterCrop(224), batching, normalisation)
with 1 and 2 decode threads, train and test transforms. Training: images/s of one forward + backward + Adam step
of the KSM-masked ``resnet18`` and ``resnet50`` (``KSMNet.from_backbone`` + ``add_task(method="ksm")``) at
224 px, batch 32, on this CPU. Target: the loader is never the bottleneck (loader images/s above the step's).

    .venv/bin/python benchmarks/bench_loader.py                    # ~3 min on a 2-core machine
    .venv/bin/python benchmarks/bench_loader.py --images 512 --steps 5 --models resnet18

Times are medians over rounds, loader epochs and training steps interleaved (a shared machine's load moves both).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.manifest import Manifest, TaskInfo, sample_key  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
SIDES = (256, 300)  # each image's height and width are drawn in this range


# ------------------------------------------------------------------------------------------------ data
def read_fashion(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images (uint8 [n, 28, 28]) and labels of a Fashion-MNIST split, from the IDX files."""
    images, labels = FASHION_FILES[split]
    if not (FASHION / images).is_file():
        raise SystemExit(f"no Fashion-MNIST at {FASHION}: install the Debian package dataset-fashion-mnist")
    with gzip.open(FASHION / images) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / labels) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x[:n], y[:n].astype(np.int64)


def to_jpeg(image: np.ndarray, height: int, width: int, quality: int = 90, mode: str = "RGB") -> bytes:
    """A 28x28 grey image upsampled (bicubic) to height x width, as JPEG bytes in ``mode`` ("RGB" or "L")."""
    from PIL import Image

    big = Image.fromarray(image).resize((width, height), Image.BICUBIC).convert(mode)
    out = io.BytesIO()
    big.save(out, "JPEG", quality=quality)
    return out.getvalue()


def jpeg_split(x: np.ndarray, seed: int) -> list[bytes]:
    """Every image of ``x`` as a JPEG of its own size (sides drawn in SIDES, seeded)."""
    rng = np.random.default_rng(seed)
    sides = rng.integers(SIDES[0], SIDES[1] + 1, size=(len(x), 2))
    return [to_jpeg(im, int(h), int(w)) for im, (h, w) in zip(x, sides)]


def write_task(root: Path, stream: str, name: str, splits: dict[str, tuple[list[bytes], np.ndarray]],
               classes: list[str], *, ext: str = "jpg", max_samples: int = 128,
               image_shape: tuple[int, int, int] = (SIDES[1], SIDES[1], 3), flip: bool = True) -> TaskInfo:
    """One task's shards as the writer lays them out, and its manifest entry. ``splits``: split -> (encoded
    images, labels); ``ext``: the entry's extension (or a list, one per image, for mixed formats)."""
    import webdataset as wds

    key = hashlib.sha256(name.encode()).hexdigest()[:16]
    folder = root / "tasks" / f"{name}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[str]] = {}
    sha: dict[str, str] = {}
    sizes: dict[str, int] = {}
    counts: dict[str, int] = {}
    for split, (blobs, labels) in splits.items():
        exts = ext if isinstance(ext, list) else [ext] * len(blobs)
        shards[split] = []
        for s, start in enumerate(range(0, len(blobs), max_samples)):
            path = folder / f"{split}-{s:06d}.tar"
            # bytes as they are, an integer mtime: plain ustar headers, as the shard writer makes (a float mtime
            # adds a PAX header per member, which sends the loader to tarfile's slower reader)
            with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
                for i in range(start, min(start + max_samples, len(blobs))):
                    w.write({"__key__": sample_key(i), exts[i]: blobs[i], "cls": str(int(labels[i])).encode()})
            rel = f"../tasks/{folder.name}/{path.name}"
            shards[split].append(rel)
            sha[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            sizes[rel] = path.stat().st_size
            counts[rel] = min(max_samples, len(blobs) - start)
    return TaskInfo(name=name, class_names=classes, num_classes=len(classes),
                    counts={split: len(v[0]) for split, v in splits.items()}, image_shape=image_shape,
                    mean=[0.5] * image_shape[2], std=[0.25] * image_shape[2], shards=shards, sha256=sha, sizes=sizes,
                    shard_counts=counts, flip=flip, flip_default=flip, source="fashion_mnist",
                    image_format=ext if isinstance(ext, str) else "mixed")


def manifest_of(root: Path, stream: str, tasks: list[TaskInfo]) -> Manifest:
    """The stream's manifest (in memory: the loader needs nothing else), rooted at ``<root>/<stream>``."""
    (root / stream).mkdir(parents=True, exist_ok=True)
    return Manifest(root=str(root / stream), benchmark=stream, spec_hash="bench", tasks=tasks)


def fashion_jpeg_task(root: Path, n_train: int, n_test: int) -> Manifest:
    """A one-task stream of Fashion-MNIST JPEGs of mixed sizes: ``n_train`` train and ``n_test`` test images."""
    xtr, ytr = read_fashion("train", n_train)
    xte, yte = read_fashion("test", n_test)
    splits = {"train": (jpeg_split(xtr, 0), ytr), "test": (jpeg_split(xte, 1), yte)}
    info = write_task(root, "bench", "fashion224", splits, FASHION_CLASSES)
    return manifest_of(root, "bench", [info])


# ------------------------------------------------------------------------------------------ measuring
def loader_rate(loader) -> float:
    """Images/s of one full epoch."""
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return n / (time.perf_counter() - t0)


def ksm_step(model: str, num_classes: int):
    """One KSM training step (forward + backward + Adam on masks, BN, head) of ``model`` at 224 px."""
    from ksm_core import KSMNet, create_model

    torch.manual_seed(0)
    net = KSMNet.from_backbone(create_model(model, num_classes=num_classes))
    t = net.add_task(num_classes, method="ksm")
    net.set_task(t).train()
    opt = torch.optim.Adam([p for group in net.task_parameters(t).values() for p in group], lr=2e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def step_rate(step, x: torch.Tensor, y: torch.Tensor) -> float:
    t0 = time.perf_counter()
    step(x, y)
    return len(y) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512, help="train images (test: half)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each: every loader epoch, then the steps")
    ap.add_argument("--steps", type=int, default=2, help="training steps per model per round (one warm-up first)")
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the step")
    args = ap.parse_args(argv)
    from pipeline.data import make_loader

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        t0 = time.perf_counter()
        m = fashion_jpeg_task(Path(tmp), args.images, args.images // 2)
        kb = sum(m.tasks[0].sizes.values()) / (args.images * 1.5) / 1024
        print(f"wrote {args.images} + {args.images // 2} JPEGs ({kb:.1f} KiB each on average) in "
              f"{time.perf_counter() - t0:.1f} s")
        loaders = {(split, w): make_loader(m, "fashion224", split, batch_size=args.batch, transform="imagenet",
                                          decode_workers=w, seed=0)
                   for split in ("train", "test") for w in (1, 2)}
        x, y = next(iter(loaders["train", 1]))
        steps = {name: ksm_step(name, 10) for name in args.models.split(",")}
        for step in steps.values():
            step(x, y)  # warm-up: first-call allocations
        rates: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for (split, w), loader in loaders.items():
                rates.setdefault(f"loader {split} {w}", []).append(loader_rate(loader))
            for name, step in steps.items():
                rates.setdefault(f"step {name}", []).extend(step_rate(step, x, y) for _ in range(args.steps))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()),
                  flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    fastest_step = max(v for k, v in med.items() if k.startswith("step"))
    print(f"\n{torch.get_num_threads()} torch threads, batch {args.batch}, {args.images} train images, "
          f"median of {args.rounds} rounds\n")
    print("| stage | decode threads | images/s | vs the fastest training step |")
    print("|---|---:|---:|---:|")
    for split in ("train", "test"):
        for w in (1, 2):
            v = med[f"loader {split} {w}"]
            print(f"| loader, imagenet {split} transform | {w} | {v:,.0f} | {v / fastest_step:.1f}x |")
    for name in steps:
        print(f"| KSM {name} step (fwd + bwd + Adam), 224 px | — | {med[f'step {name}']:.1f} | 1 step |")


if __name__ == "__main__":
    main()
