"""Real-data helpers for the data-layer tests (tests/test_data_*.py).

The CIFAR-100 images are the 20 real CIFAR-100 test images shipped in the foolbox wheel (extracted by
scripts/install.sh); their file names carry the test-set index and the fine label.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ksm_core import KSMNet, create_model, save_task
from pipeline.served import FORMAT, SPEC_FILE

ROOT = Path(__file__).resolve().parents[1]
FOOLBOX_CIFAR = ROOT / ".cache" / "foolbox" / "cifar100"

# Written out independently of pipeline/data/cifar100.py, from the CIFAR-100 class list:
# fine label -> (fine name, superclass, label within the superclass task = alphabetical rank of the fine name)
FOOLBOX_EXPECTED: dict[int, tuple[str, str, int]] = {
    0: ("apple", "fruit_and_vegetables", 0),
    14: ("butterfly", "insects", 2),
    15: ("camel", "large_omnivores_and_herbivores", 0),
    23: ("cloud", "large_natural_outdoor_scenes", 0),
    33: ("forest", "large_natural_outdoor_scenes", 1),
    40: ("lamp", "household_electrical_devices", 2),
    43: ("lion", "large_carnivores", 2),
    49: ("mountain", "large_natural_outdoor_scenes", 2),
    51: ("mushroom", "fruit_and_vegetables", 1),
    53: ("orange", "fruit_and_vegetables", 2),
    69: ("rocket", "vehicles_2", 1),
    70: ("rose", "flowers", 2),
    71: ("sea", "large_natural_outdoor_scenes", 4),
    72: ("seal", "aquatic_mammals", 3),
    75: ("skunk", "medium_mammals", 4),
    81: ("streetcar", "vehicles_2", 2),
    92: ("tulip", "flowers", 4),
    97: ("wolf", "large_carnivores", 4),
}
# The superclasses in CPG's order, as the issue lists them (coarse label = position).
CPG_ORDER_LITERAL = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
]


def foolbox_cifar_images() -> list[tuple[int, int, np.ndarray]]:
    """(test-set index, fine label, uint8 [32, 32, 3]) of the 20 real CIFAR-100 images; skips if absent."""
    files = sorted(FOOLBOX_CIFAR.glob("cifar100_*_*.png"))
    if len(files) != 20:
        pytest.skip(f"CIFAR-100 sample images missing in {FOOLBOX_CIFAR}; run `bash scripts/install.sh`")
    out = []
    for f in files:
        idx, fine = map(int, re.match(r"cifar100_(\d+)_(\d+)\.png", f.name).groups())
        out.append((idx, fine, np.asarray(Image.open(f).convert("RGB"))))
    return out


def write_cifar100_tree(root: Path, *, coarse_override: dict[int, int] | None = None) -> Path:
    """Write the 20 real images in torchvision's on-disk CIFAR-100 format (root/cifar-100-python/).

    Both splits hold all 20 images; coarse labels come from FOOLBOX_EXPECTED (independent of the code
    under test), optionally overridden per row to test the loader's consistency check.
    """
    images = foolbox_cifar_images()
    x = np.stack([im for _, _, im in images])
    fine = [f for _, f, _ in images]
    coarse = [CPG_ORDER_LITERAL.index(FOOLBOX_EXPECTED[f][1]) for f in fine]
    for row, c in (coarse_override or {}).items():
        coarse[row] = c
    entry = {
        "data": x.transpose(0, 3, 1, 2).reshape(len(x), -1),  # rows of R, G, B planes, as CIFAR stores them
        "fine_labels": fine,
        "coarse_labels": coarse,
        "filenames": [f"img_{i}.png" for i, _, _ in images],
    }
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
    from pipeline.data.cifar100 import FINE_NAMES  # names only, for the meta file

    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(FINE_NAMES), "coarse_label_names": CPG_ORDER_LITERAL}, f)
    return root


def small_fashion_benchmark(**overrides) -> dict:
    """A fast split Fashion-MNIST benchmark: 3 tasks x 2 classes, small caps, several shards per split."""
    bench = {
        "name": "fmnist_small",
        "kind": "class_split",
        "source": {"name": "fashion_mnist", "root": None, "download": False},
        "num_tasks": 3,
        "classes_per_task": 2,
        "class_lists": None,
        "caps": {"train": 300, "test": 100, "seed": 0},
        "initial_caps": {"train": 400, "test": 100},
        "channels": 3,
        "flip": None,
        "seed": 0,
        "shard": {"max_samples": 128, "format": "npy"},
    }
    bench.update(overrides)
    return bench


def namespace_mounts_work() -> bool:
    """Whether this machine lets a process mount a tmpfs in a private mount namespace (``unshare -rm``)."""
    import shutil
    import subprocess

    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=8k tmpfs $d"],
                       capture_output=True)
    return r.returncode == 0


def run_on_full_and_read_only_disks(tmp_path: Path, script: str, full_size: str, skip_why: str
                                    ) -> tuple[dict, Path, Path]:
    """Run the Python ``script`` (argv: FULL RO) in a private mount namespace where FULL is a real tmpfs of
    ``full_size`` and RO a real read-only tmpfs: a full disk and a read-only file system, as root, without touching
    the machine's own mounts. Returns the JSON the script prints after ``RESULT ``, and the two folders. Skips the
    test (``skip_why``) where the machine refuses such namespaces."""
    import subprocess
    import sys

    if not namespace_mounts_work():
        pytest.skip(skip_why)
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    path = tmp_path / "ns.py"
    path.write_text(script)
    cmd = (f"mount -t tmpfs -o size={full_size} tmpfs {full} && mount -t tmpfs -o ro,size=64k tmpfs {ro} && "
           f"exec {sys.executable} {path} {full} {ro}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT ", 1)[1]), full, ro


def build_model_dir(root: Path, limits: dict | None = None, *, random_heads: bool = False) -> Path:
    """A served model's artifact folder as export writes it: a real (untrained) backbone whose own task takes
    grey 28x28 images, a grey 28x28 task and a colour 32x32 task, each a real ksm_core artifact (``random_heads``:
    heads drawn from N(0, 1), so the tasks give non-trivial answers); ``limits`` are the served request limits."""
    root.mkdir(parents=True)
    (root / "tasks").mkdir()
    torch.manual_seed(0)
    bb = create_model("vgg16_bn_cifar", num_classes=3, width=0.0625)
    net = KSMNet.from_backbone(bb)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(root / "backbone.safetensors"))
    tasks = [{"name": "base", "artifact": None, "classes": ["a", "b", "c"], "image_shape": [28, 28, 1]}]
    for name, classes, shape in [("grey", ["x", "y"], [28, 28, 1]), ("rgb", ["p", "q", "r", "s"], [32, 32, 3])]:
        t = net.add_task(len(classes), method="ksm", name=name)
        if random_heads:
            with torch.no_grad():
                for p in net.heads.tasks[str(t)].parameters():
                    p.normal_()
        save_task(net, t, root / "tasks" / f"{name}.safetensors")
        tasks.append({"name": name, "artifact": f"tasks/{name}.safetensors", "classes": classes, "image_shape": shape})
    for d in tasks:
        d.update(image_size=32, channels=3, mean=[0.3] * 3, std=[0.3] * 3, run_id="-", test_acc=None)
    spec = {"format": FORMAT, "backbone": "backbone.safetensors", "backbone_fingerprint": net.backbone_fingerprint,
            "model": {"name": "vgg16_bn_cifar", "width": 0.0625, "num_classes": 3}, "tasks": tasks}
    if limits is not None:
        spec["limits"] = limits
    (root / SPEC_FILE).write_text(json.dumps(spec))
    return root


def fashion_jpegs(classes: list[int], per_class: int, size: int = 64, quality: int = 90, offset: int = 0
                  ) -> list[tuple[int, bytes]]:
    """(label, JPEG bytes) of real Fashion-MNIST test images, ``per_class`` of each of ``classes`` (in label order),
    upsampled to ``size`` px RGB: small real photos-like files for the streamed-source tests; skips without the
    dataset."""
    import io

    from pipeline.data import load_source
    from pipeline.data.sources import DEBIAN_FASHION_MNIST

    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("needs dataset-fashion-mnist")
    test = load_source({"name": "fashion_mnist"}, "test")
    out = []
    for label in classes:
        for i in np.flatnonzero(test.y == label)[offset:offset + per_class]:
            im = Image.fromarray(test.x[i, ..., 0]).convert("RGB").resize((size, size), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
            out.append((int(label), buf.getvalue()))
    return out


def write_jpeg_folder(root: Path, classes: list[int], per_class: int, size: int = 64) -> Path:
    """An ImageFolder of real Fashion-MNIST JPEGs: root/c<label>/<n>.jpg."""
    for n, (label, data) in enumerate(fashion_jpegs(classes, per_class, size)):
        folder = root / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n:05d}.jpg").write_bytes(data)
    return root


def write_jpeg_corpus(root: Path, classes: list[int], per_class: int, shards: int = 2, *, json_label: bool = False,
                      size: int = 64) -> list[Path]:
    """A WebDataset corpus of real Fashion-MNIST JPEGs written with webdataset's own TarWriter: samples spread over
    ``shards`` tars (round robin), each ``<key>.jpg`` + ``<key>.cls`` (the label), or ``<key>.json``
    ({"label": "c<label>"}) with ``json_label``. Returns the shard paths."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"corpus-{i:06d}.tar" for i in range(shards)]
    writers = [wds.TarWriter(str(p), encoder=False) for p in paths]
    for n, (label, data) in enumerate(fashion_jpegs(classes, per_class, size)):
        sample = {"__key__": f"s{n:06d}", "jpg": data}
        if json_label:
            sample["json"] = json.dumps({"label": f"c{label}", "other": n}).encode()
        else:
            sample["cls"] = str(label).encode()
        writers[n % shards].write(sample)
    for w in writers:
        w.close()
    return paths


def fashion_subset(split, names: list[str], n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` seeded images of each class ``names`` of a Fashion-MNIST split, as the network's input
    (1x28x28 zero-padded to 32x32, repeated to 3 channels, normalised with Fashion-MNIST's mean/std) and labels
    0..len(names)-1 in the order of ``names``."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(split.y == split.class_names.index(c)), n_per_class, replace=False)
                          for c in names])
    x = torch.from_numpy(split.x[idx]).permute(0, 3, 1, 2).float().div_(255.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()  # 1x28x28 -> 3x32x32
    y = torch.tensor([names.index(split.class_names[i]) for i in split.y[idx]])
    return (x - 0.286) / 0.353, y


def tensor_loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool) -> "torch.utils.data.DataLoader":
    """Batches of 32 over in-memory tensors; shuffled (seeded: the same order every run) or in order."""
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=shuffle, generator=gen)


# the sequential baselines' tests (test_packnet, test_cpg): split_fashion_mnist's first three tasks, small
CHAIN_BACKBONE = ["T-shirt/top", "Trouser"]  # the initial task, as split_fashion_mnist's t0
CHAIN_TASKS = [["Pullover", "Dress"], ["Coat", "Sandal"]]


def fashion_chain(per_class: int = 150, test_per_class: int = 100, width: float = 0.0625):
    """A VGG16-BN backbone trained 2 epochs on CHAIN_BACKBONE's classes, and (train, test) loaders for it and each of
    CHAIN_TASKS (seeded subsets of real Fashion-MNIST, ``fashion_subset``). Skips without the Debian data."""
    from ksm_core import TrainConfig, train_backbone
    from pipeline.data import load_source
    from pipeline.data.sources import DEBIAN_FASHION_MNIST

    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("needs dataset-fashion-mnist")
    train, test = load_source({"name": "fashion_mnist"}, "train"), load_source({"name": "fashion_mnist"}, "test")
    data = [(tensor_loader(*fashion_subset(train, names, per_class, seed=i), True),
             tensor_loader(*fashion_subset(test, names, test_per_class, seed=i), False))
            for i, names in enumerate([CHAIN_BACKBONE, *CHAIN_TASKS])]
    torch.manual_seed(0)
    bb = create_model("vgg16_bn_cifar", num_classes=len(CHAIN_BACKBONE), width=width)
    train_backbone(bb, data[0][0], data[0][1], TrainConfig(epochs=2))
    return bb, data
