"""Sources and benchmark task splits, on real data (Fashion-MNIST, MNIST-5k, digits, CIFAR-100 images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_helpers import CPG_ORDER_LITERAL, FOOLBOX_EXPECTED, foolbox_cifar_images, write_cifar100_tree
from PIL import Image

from pipeline.data import (
    BENCHMARK_KINDS,
    CPG_ORDER,
    SOURCES,
    SUPERCLASSES,
    ConfigError,
    DataError,
    SourceNotFoundError,
    UnknownNameError,
    build_tasks,
    list_benchmarks,
    load_benchmark_config,
    load_source,
    superclass_of,
)
from pipeline.data.sources import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES

FASHION = {"name": "fashion_mnist", "root": None, "download": False}


@pytest.fixture(scope="module")
def fashion() -> dict:
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed; `apt-get install dataset-fashion-mnist`")
    return {split: load_source(FASHION, split) for split in ("train", "test")}


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def test_fashion_mnist_is_the_full_real_dataset(fashion):
    train, test = fashion["train"], fashion["test"]
    assert train.x.shape == (60000, 28, 28, 1) and test.x.shape == (10000, 28, 28, 1)
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int64
    assert train.class_names == FASHION_MNIST_CLASSES
    assert set(train.counts().values()) == {6000} and set(test.counts().values()) == {1000}
    assert train.x.max() == 255 and train.x.min() == 0


def test_split_fashion_mnist_uncapped_has_right_classes_and_counts(fashion):
    bench = load_benchmark_config("split_fashion_mnist")
    bench.update(caps=None, initial_caps=None)
    tasks = build_tasks(bench)
    assert [t.name for t in tasks] == ["t0", "t1", "t2", "t3", "t4"]
    assert [t.class_names for t in tasks] == [
        ["T-shirt/top", "Trouser"],
        ["Pullover", "Dress"],
        ["Coat", "Sandal"],
        ["Shirt", "Sneaker"],
        ["Bag", "Ankle boot"],
    ]
    for t in tasks:
        assert t.train.counts() == {c: 6000 for c in t.class_names}
        assert t.test.counts() == {c: 1000 for c in t.class_names}
    # task t2 label 1 is Sandal (original label 5): pixels are the source's Sandal images
    t2 = tasks[2]
    sandal_rows = np.flatnonzero(fashion["test"].y == 5)
    np.testing.assert_array_equal(t2.test.x[t2.test.y == 1], fashion["test"].x[sandal_rows])


def test_split_fashion_mnist_default_caps_are_stratified(fashion):
    tasks = build_tasks(load_benchmark_config("split_fashion_mnist"))
    t0, new = tasks[0], tasks[1:]
    assert t0.train.counts() == {"T-shirt/top": 2000, "Trouser": 2000}
    assert t0.test.counts() == {"T-shirt/top": 500, "Trouser": 500}
    for t in new:
        assert list(t.train.counts().values()) == [500, 500]
        assert list(t.test.counts().values()) == [200, 200]
    again = build_tasks(load_benchmark_config("split_fashion_mnist"))
    np.testing.assert_array_equal(again[3].train.x, tasks[3].train.x)  # seeded: same samples, same order


def test_explicit_class_lists_and_unknown_class_names(fashion):
    bench = load_benchmark_config("split_fashion_mnist")
    bench.update(class_lists=[["Bag", "Coat"], [9, 0]], caps={"train": 100, "test": 50})
    tasks = build_tasks(bench)
    assert [t.class_names for t in tasks] == [["Bag", "Coat"], ["Ankle boot", "T-shirt/top"]]
    bench["class_lists"] = [["Bag", "Hat"]]
    with pytest.raises(UnknownNameError) as err:
        build_tasks(bench)
    assert "unknown class 'Hat'" in str(err.value)
    assert "'T-shirt/top', 'Trouser', 'Pullover'" in str(err.value) and "'Ankle boot'" in str(err.value)


def test_too_many_tasks_for_the_classes(fashion):
    bench = load_benchmark_config("split_fashion_mnist")
    bench.update(num_tasks=6)
    with pytest.raises(ConfigError, match="6 tasks x 2 classes needs 12 classes; source 'fashion_mnist' has 10"):
        build_tasks(bench)


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_fix(tmp_path):
    empty = tmp_path / "nowhere"
    with pytest.raises(SourceNotFoundError) as err:
        load_source({"name": "fashion_mnist", "root": str(empty)}, "train")
    msg = str(err.value)
    assert str(empty) in msg and str(empty / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download: true" in msg


def test_fashion_mnist_from_a_user_folder(tmp_path, fashion):
    """A root holding the (gunzipped) IDX files is read the same as the Debian copy."""
    import gzip
    import shutil

    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(DEBIAN_FASHION_MNIST / f"{stem}.gz") as src, open(tmp_path / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    test = load_source({"name": "fashion_mnist", "root": str(tmp_path)}, "test")
    np.testing.assert_array_equal(test.x, fashion["test"].x)
    np.testing.assert_array_equal(test.y, fashion["test"].y)


# ------------------------------------------------------------------------------------- MNIST-5k and digits


def test_mnist5k_seeded_stratified_80_20():
    cfg = {"name": "mnist5k", "test_fraction": 0.2, "split_seed": 0}
    train, test = load_source(cfg, "train"), load_source(cfg, "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert set(train.counts().values()) == {400} and set(test.counts().values()) == {100}
    assert train.x.shape[1:] == (28, 28, 1) and train.class_names == [str(d) for d in range(10)]
    # disjoint: no test image appears in train
    train_rows = {row.tobytes() for row in train.x}
    assert sum(row.tobytes() in train_rows for row in test.x) <= 5  # MNIST has a few exact duplicates at most
    again = load_source(cfg, "test")
    np.testing.assert_array_equal(again.x, test.x)
    other = load_source({**cfg, "split_seed": 1}, "test")
    assert not np.array_equal(other.x, test.x)


def test_digits_scaled_to_uint8_and_split():
    train, test = load_source({"name": "digits"}, "train"), load_source({"name": "digits"}, "test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.x.shape[1:] == (8, 8, 1) and train.x.dtype == np.uint8
    assert train.x.max() == 255  # 16 -> 255
    from sklearn.datasets import load_digits

    d = load_digits()
    assert np.isin(np.unique(train.x), np.rint(np.arange(17) * 255 / 16)).all()
    assert (np.bincount(np.concatenate([train.y, test.y])) == np.bincount(d.target)).all()


# ------------------------------------------------------------------------------------------ npz + folders


def test_npz_source_with_and_without_own_split(tmp_path):
    digits = {s: load_source({"name": "digits"}, s) for s in ("train", "test")}
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    np.savez(
        tmp_path / "own.npz",
        x_train=digits["train"].x[..., 0],
        y_train=digits["train"].y,
        x_test=digits["test"].x[..., 0],
        y_test=digits["test"].y,
        class_names=names,
    )
    own = load_source({"name": "npz", "path": str(tmp_path / "own.npz")}, "test")
    np.testing.assert_array_equal(own.x, digits["test"].x)
    assert own.class_names[3] == "three"
    np.savez(tmp_path / "all.npz", x=digits["train"].x, y=digits["train"].y)
    part = load_source({"name": "npz", "path": str(tmp_path / "all.npz"), "test_fraction": 0.25}, "test")
    assert len(part) == round(0.25 * len(digits["train"])) and part.class_names == [str(i) for i in range(10)]
    with pytest.raises(SourceNotFoundError, match="npz file .*missing.npz not found"):
        load_source({"name": "npz", "path": str(tmp_path / "missing.npz")}, "train")


def test_image_folder_source_reads_real_images(tmp_path, fashion):
    test = fashion["test"]
    for label in (0, 1):
        folder = tmp_path / "train" / FASHION_MNIST_CLASSES[label].replace("/", "_")
        folder.mkdir(parents=True)
        for i in np.flatnonzero(test.y == label)[:5]:
            Image.fromarray(test.x[i, ..., 0]).save(folder / f"{i:05d}.png")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x").mkdir()
    Image.fromarray(test.x[0, ..., 0]).save(tmp_path / "test" / "x" / "a.png")
    got = load_source({"name": "image_folder", "root": str(tmp_path), "mode": "L"}, "train")
    assert got.class_names == ["T-shirt_top", "Trouser"] and got.counts() == {"T-shirt_top": 5, "Trouser": 5}
    np.testing.assert_array_equal(got.x[:5], test.x[np.flatnonzero(test.y == 0)[:5]])
    rgb = load_source({"name": "image_folder", "root": str(tmp_path), "size": [16, 16]}, "train")
    assert rgb.x.shape == (10, 16, 16, 3)
    with pytest.raises(SourceNotFoundError, match="image folder .*nope not found"):
        load_source({"name": "image_folder", "root": str(tmp_path / "nope")}, "train")


# ------------------------------------------------------------------------------------- names and registries


def test_unknown_source_and_benchmark_kinds_list_the_valid_ones():
    with pytest.raises(UnknownNameError) as err:
        load_source({"name": "imagenet"}, "train")
    assert "unknown source 'imagenet'" in str(err.value)
    for kind in SOURCES:
        assert repr(kind) in str(err.value)
    with pytest.raises(UnknownNameError) as err:
        build_tasks({"name": "x", "kind": "task_incremental"})
    assert "unknown benchmark kind 'task_incremental'" in str(err.value)
    for kind in BENCHMARK_KINDS:
        assert repr(kind) in str(err.value)
    with pytest.raises(UnknownNameError, match="unknown benchmark 'nope'; valid: .*'split_fashion_mnist'"):
        load_benchmark_config("nope")


def test_benchmark_configs_are_named_after_their_files():
    names = list_benchmarks()
    assert {"split_fashion_mnist", "fashion_to_digits", "cifar100_20"} <= set(names)
    for name in names:
        assert load_benchmark_config(name)["name"] == name


def test_fashion_to_digits_sequence(fashion):
    tasks = build_tasks(load_benchmark_config("fashion_to_digits"))
    assert [t.name for t in tasks] == ["fashion_mnist", "mnist5k", "digits"]
    assert tasks[0].class_names == FASHION_MNIST_CLASSES and len(tasks[0].train) == 4000
    assert set(tasks[0].train.counts().values()) == {400}
    assert (len(tasks[1].train), len(tasks[1].test)) == (1000, 400)
    assert (len(tasks[2].train), len(tasks[2].test)) == (1000, 359)  # test cap above the 359 available
    assert tasks[2].train.image_shape == (8, 8, 1)
    assert not any(t.flip for t in tasks)


# ------------------------------------------------------------------------------------------------ CIFAR-100


def test_cpg_order_and_mapping_match_the_real_cifar100_images():
    assert list(CPG_ORDER) == CPG_ORDER_LITERAL
    assert all(list(f) == sorted(f) and len(f) == 5 for f in SUPERCLASSES.values())
    seen = 0
    for idx, fine, _ in foolbox_cifar_images():
        name, sup, local = FOOLBOX_EXPECTED[fine]
        assert superclass_of(fine) == (sup, local), f"test image {idx} (fine label {fine} = {name})"
        assert superclass_of(name) == (sup, local)
        seen += 1
    assert seen == 20


def test_cifar100_superclass_benchmark_on_real_images(tmp_path):
    root = write_cifar100_tree(tmp_path)
    images = foolbox_cifar_images()
    bench = load_benchmark_config("cifar100_20")
    bench["source"]["root"] = str(root)
    bench["superclasses"] = ["large_natural_outdoor_scenes", "fruit_and_vegetables", "flowers"]
    tasks = build_tasks(bench)
    assert [t.name for t in tasks] == bench["superclasses"]
    scenes = tasks[0]
    assert scenes.class_names == ["cloud", "forest", "mountain", "plain", "sea"]
    assert scenes.flip is True
    # test split keeps the source order: mountain(0), forest(1), sea(4), cloud(8), sea(10)
    assert scenes.test.y.tolist() == [2, 1, 4, 0, 4]
    expected = np.stack([im for _, fine, im in images if FOOLBOX_EXPECTED[fine][1] == "large_natural_outdoor_scenes"])
    np.testing.assert_array_equal(scenes.test.x, expected)
    assert sorted(tasks[1].test.y.tolist()) == [0, 1, 2]  # apple, mushroom, orange
    assert sorted(tasks[2].test.y.tolist()) == [2, 4, 4]  # rose, tulip, tulip


def test_cifar100_coarse_labels_are_cross_checked(tmp_path):
    write_cifar100_tree(tmp_path, coarse_override={0: 3})  # image 0 is a mountain, not a food container
    with pytest.raises(
        DataError, match="sample 0 has fine label 'mountain' and coarse label 3, but the superclass mapping says 10"
    ):
        load_source({"name": "cifar100", "root": str(tmp_path)}, "train")


def test_missing_cifar100_says_where_and_how(tmp_path):
    with pytest.raises(SourceNotFoundError) as err:
        load_source({"name": "cifar100", "root": str(tmp_path)}, "test")
    msg = str(err.value)
    assert str(Path(tmp_path) / "cifar-100-python" / "test") in msg
    assert "benchmark.source.root=" in msg and "download: true" in msg


def test_unknown_superclass_lists_cpg_order(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown CIFAR-100 superclass 'dogs'; valid: 'aquatic_mammals', 'fish'"):
        build_tasks(
            {
                "name": "c",
                "kind": "cifar100_superclass",
                "source": {"name": "cifar100", "root": str(tmp_path)},
                "superclasses": ["dogs"],
            }
        )
