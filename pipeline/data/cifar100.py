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
from ..errors import DataError, SourceNotFoundError, UnsafeInputError, unknown_name

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

    These files are the official python-pickle release; they are read by :func:`load_pickle`, which refuses any
    global but the numpy-array reconstruction the release needs (a plain ``pickle.load`` would run code a crafted
    file names). Shards written from them hold only .npy/.png/.cls entries. When the file has coarse labels, the
    written-out superclass mapping is checked against them, so a typo in :data:`SUPERCLASSES` cannot go unnoticed.
    """
    files = cifar100_files(root)
    path = files[split]
    if not path.is_file():
        raise SourceNotFoundError(f"CIFAR-100 {split} file not found: {path}")
    entry = load_pickle(path)
    if not isinstance(entry, dict) or "data" not in entry or "fine_labels" not in entry:
        raise DataError(f"{path} is not a CIFAR-100 {split} file (expected a dict with `data` and `fine_labels`); "
                        "replace it with the official release (the source's `download: true` fetches it)")
    try:
        x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.asarray(entry["fine_labels"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: `data` or `fine_labels` is not CIFAR-100's ({exc}); replace the file with the "
                        "official release") from None
    if len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() >= len(FINE_NAMES))):
        raise DataError(f"{path}: {len(x)} images and {len(y)} fine labels in 0-99 expected; replace the file "
                        "with the official release")
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
    entry = load_pickle(meta)
    if not isinstance(entry, dict):
        raise DataError(f"{meta} is not CIFAR-100's meta file (expected a dict with `fine_label_names`)")
    return list(entry.get("fine_label_names", [])) or None


# --------------------------------------------------------------------------------- a pickle that holds only data
# The CIFAR-100 files are pickles, and a plain pickle.load runs whatever callable the file names: a file dropped
# under a `root` that a catalogue line names would run code as the driver's user while it plans. The release holds
# only dicts, lists, strings, ints and numpy arrays, so these are the only globals a file may name; anything else
# is refused before it is called.


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2, for latin-1 only (no other codec runs)."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode({encoding!r}) is not how a pickle stores bytes")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2 (numpy.core.* still names the same functions in older pickles)
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _latin1}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct  # ndarray, protocol <= 4
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer          # ndarray, protocol 5
    return allowed


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; any other global is refused, naming the file."""

    def __init__(self, file: object, path: Path):
        super().__init__(file, encoding="latin1")  # type: ignore[arg-type]
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise UnsafeInputError(f"{self.path} asks to call {module}.{name}, which a CIFAR-100 file never holds: "
                               "refused, nothing in it was run. Replace the file with the official release (the "
                               "source's `download: true` fetches it) or point the source's `root` elsewhere")

    def persistent_load(self, pid: object) -> object:
        raise UnsafeInputError(f"{self.path} holds a persistent reference, which a CIFAR-100 file never holds")


def load_pickle(path: Path) -> object:
    """A CIFAR-100 python-release file, unpickled with only the data types the release holds (see above). A file
    that names anything else, or is not a whole pickle, raises a DataError naming it."""
    try:
        with open(path, "rb") as f:
            return _DataOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check the file and its folder") from None
    except Exception as exc:  # truncated, not a pickle, an array that does not reconstruct
        raise DataError(f"{path} is not a readable CIFAR-100 file ({type(exc).__name__}: {exc}); replace it with "
                        "the official release") from None
