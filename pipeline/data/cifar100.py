"""CIFAR-100: the coarse -> fine class mapping written out, and a reader of torchvision's on-disk format.

The 100 fine labels of CIFAR-100 index the alphabetically sorted fine class names; the 20 coarse labels
("superclasses") index the alphabetically sorted superclass names, which is also the task order CPG uses for
its 20-task CIFAR-100 benchmark. Within a superclass task, labels 0-4 are its 5 fine classes in alphabetical
order. The mapping below is the standard one from the CIFAR-100 description; when the data files carry coarse
labels (the official ones do), :func:`read_cifar100` checks the mapping against them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .arrays import ArraySplit
from ..errors import DataError, SourceNotFoundError, unknown_name

#: superclass -> its 5 fine classes (alphabetical); dict order = coarse label order = CPG's task order.
SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}

#: CPG's task order for the 20-task benchmark (= coarse label order).
CPG_ORDER: tuple[str, ...] = tuple(SUPERCLASSES)

#: The 100 fine class names; the fine label is the index in this (alphabetical) list.
FINE_NAMES: tuple[str, ...] = tuple(sorted(f for fines in SUPERCLASSES.values() for f in fines))

#: fine class name -> (superclass, label 0-4 within the superclass task)
FINE_TO_SUPER: dict[str, tuple[str, int]] = {
    fine: (sup, i) for sup, fines in SUPERCLASSES.items() for i, fine in enumerate(fines)
}

#: fine label (0-99) -> coarse label (0-19), as an array for vectorised lookup
FINE_TO_COARSE = np.array([CPG_ORDER.index(FINE_TO_SUPER[f][0]) for f in FINE_NAMES], dtype=np.int64)

#: fine label (0-99) -> label within its superclass task (0-4)
FINE_TO_LOCAL = np.array([FINE_TO_SUPER[f][1] for f in FINE_NAMES], dtype=np.int64)

#: the folder torchvision's CIFAR100 extracts into, under its ``root``
BASE_FOLDER = "cifar-100-python"

assert len(FINE_NAMES) == 100 and len(set(FINE_NAMES)) == 100 and len(CPG_ORDER) == 20


def superclass_of(fine: int | str) -> tuple[str, int]:
    """(superclass name, label within the superclass task) of a fine label or fine class name."""
    name = FINE_NAMES[fine] if isinstance(fine, (int, np.integer)) else fine
    if name not in FINE_TO_SUPER:
        raise unknown_name("CIFAR-100 fine class", fine, FINE_NAMES)
    return FINE_TO_SUPER[name]


def superclass_split(data: ArraySplit, superclass: str) -> ArraySplit:
    """The rows of one superclass from fine-labelled CIFAR-100 data, relabelled 0-4 (alphabetical fines)."""
    if superclass not in SUPERCLASSES:
        raise unknown_name("CIFAR-100 superclass", superclass, CPG_ORDER)
    if tuple(data.class_names) != FINE_NAMES:
        raise DataError("CIFAR-100 data must carry the 100 fine labels in alphabetical order (torchvision's)")
    keep = np.flatnonzero(FINE_TO_COARSE[data.y] == CPG_ORDER.index(superclass))
    return ArraySplit(data.x[keep], FINE_TO_LOCAL[data.y[keep]], list(SUPERCLASSES[superclass]))


def cifar100_files(root: Path) -> dict[str, Path]:
    """Where torchvision's CIFAR100(root) keeps the train/test/meta files."""
    return {name: root / BASE_FOLDER / name for name in ("train", "test", "meta")}


def read_cifar100(root: Path, split: str) -> ArraySplit:
    """Read one split of CIFAR-100 from torchvision's on-disk format (``root/cifar-100-python/``).

    These files are the official python-pickle release (what torchvision itself unpickles); shards written
    from them hold only .npy/.png/.cls entries. When the file has coarse labels, the written-out superclass
    mapping is checked against them, so a typo in :data:`SUPERCLASSES` cannot go unnoticed.
    """
    files = cifar100_files(root)
    path = files[split]
    if not path.is_file():
        raise SourceNotFoundError(f"CIFAR-100 {split} file not found: {path}")
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(entry["fine_labels"], dtype=np.int64)
    names = _fine_names_from_meta(files["meta"])
    if names is not None and tuple(names) != FINE_NAMES:
        raise DataError(f"{files['meta']}: fine class names differ from CIFAR-100's; is this CIFAR-100?")
    if "coarse_labels" in entry:
        coarse = np.asarray(entry["coarse_labels"], dtype=np.int64)
        bad = np.flatnonzero(FINE_TO_COARSE[y] != coarse)
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{path}: sample {i} has fine label {FINE_NAMES[y[i]]!r} and coarse label {int(coarse[i])}, "
                f"but the superclass mapping says {int(FINE_TO_COARSE[y[i]])}; the mapping or the file is wrong"
            )
    return ArraySplit(np.ascontiguousarray(x), y, list(FINE_NAMES))


def _fine_names_from_meta(meta: Path) -> list[str] | None:
    if not meta.is_file():
        return None
    with open(meta, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return list(entry.get("fine_label_names", [])) or None
