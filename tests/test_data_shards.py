"""Shard writer, manifest and streaming loader, on real Fashion-MNIST / digits / CIFAR-100 images."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import run_on_full_and_read_only_disks, small_fashion_benchmark, write_cifar100_tree

from pipeline.data import (
    Manifest,
    ShardCorruptError,
    UnknownNameError,
    build_tasks,
    ensure_shards,
    iter_samples,
    load_benchmark_config,
    make_loader,
    spec_hash,
    task_specs,
    write_task,
)
from pipeline.data.sources import DEBIAN_FASHION_MNIST

pytestmark = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs dataset-fashion-mnist")

FIX = "delete it and run `python run_pipeline.py mode=shards`"


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def bench() -> dict:
    return small_fashion_benchmark()


@pytest.fixture(scope="module")
def tasks(bench):
    return build_tasks(bench)


@pytest.fixture(scope="module")
def manifest(bench, tmp_path_factory) -> Manifest:
    return ensure_shards(bench, tmp_path_factory.mktemp("shards"), log=quiet)


def fresh(bench: dict, tmp_path: Path) -> Manifest:
    """A private copy of the shards for tests that damage them."""
    return ensure_shards(bench, tmp_path, log=quiet)


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_describes_the_tasks(manifest, tasks):
    assert manifest.benchmark == "fmnist_small" and manifest.initial_task == "t0"
    assert manifest.new_tasks == ["t1", "t2"]
    assert manifest.path == Path(manifest.root) / "manifest.json" and manifest.path.is_file()
    t1 = manifest.task("t1")
    assert t1.class_names == ["Pullover", "Dress"] and t1.num_classes == 2
    assert t1.counts == {"train": 300, "test": 100} and manifest.task("t0").counts == {"train": 400, "test": 100}
    assert t1.image_shape == (28, 28, 1) and t1.image_format == "npy"
    folder = f"../tasks/{task_specs(manifest.spec)[1].folder}"  # the task's own content-addressed folder
    assert t1.shards["train"] == [f"{folder}/train-00000{i}.tar" for i in range(3)]
    assert Path(manifest.url(t1.shards["train"][0])).parent == Path(manifest.root).parent / folder[3:]
    assert [t1.shard_counts[r] for r in t1.shards["train"]] == [128, 128, 44]
    assert all(len(h) == 64 for h in t1.sha256.values()) and set(t1.sha256) == set(t1.sizes)
    # per-task mean/std of the train split, grey repeated to 3 channels
    x = tasks[1].train.x / 255.0
    np.testing.assert_allclose(t1.mean, [x.mean()] * 3, rtol=1e-9)
    np.testing.assert_allclose(t1.std, [x.std()] * 3, rtol=1e-9)
    assert manifest.spec["caps"] == {"train": 300, "test": 100, "seed": 0}
    assert Manifest.load(manifest.root).to_dict() == manifest.to_dict()


def test_unknown_task_lists_the_known_ones(manifest):
    with pytest.raises(
        UnknownNameError, match="unknown task of benchmark 'fmnist_small' 'tx'; valid: 't0', 't1', 't2'"
    ):
        manifest.task("tx")


# ----------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("task", ["t0", "t2"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_shard_round_trip_is_exact(manifest, tasks, task, split):
    data = {t.name: t for t in tasks}[task].split(split)
    keys, xs, ys = zip(*iter_samples(manifest, task, split))
    assert list(keys) == [f"{i:07d}" for i in range(len(data))]
    np.testing.assert_array_equal(np.stack(xs), data.x)
    np.testing.assert_array_equal(np.array(ys), data.y)


def test_png_round_trip_on_real_cifar100_images(tmp_path):
    bench = load_benchmark_config("cifar100_20")
    bench["source"]["root"] = str(write_cifar100_tree(tmp_path / "cifar"))
    bench["superclasses"] = ["large_natural_outdoor_scenes", "flowers"]
    bench["shard"] = {"max_samples": 2500, "format": "png"}
    manifest = ensure_shards(bench, tmp_path / "shards", log=quiet)
    task = build_tasks(bench)[0]
    info = manifest.task("large_natural_outdoor_scenes")
    assert info.image_format == "png" and info.image_shape == (32, 32, 3) and info.flip is True
    assert info.class_names == ["cloud", "forest", "mountain", "plain", "sea"]
    _, xs, ys = zip(*iter_samples(manifest, info.name, "train"))
    np.testing.assert_array_equal(np.stack(xs), task.train.x)
    np.testing.assert_array_equal(np.array(ys), task.train.y)
    np.testing.assert_allclose(info.mean, (task.train.x / 255.0).mean(axis=(0, 1, 2)), rtol=1e-9)
    x, y = next(iter(make_loader(manifest, info.name, "test", batch_size=8)))
    assert x.shape == (5, 3, 32, 32) and sorted(y.tolist()) == [0, 1, 2, 4, 4]


# --------------------------------------------------------------------------------------------- loader


def test_test_loader_is_deterministic_and_normalised(manifest, tasks):
    loader = make_loader(manifest, "t1", "test", batch_size=32, image_size=28, channels=1)
    assert len(loader) == 4 and loader.num_samples == 100
    batches = list(loader)
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    info = manifest.task("t1")
    raw = x * info.std[0] + info.mean[0]
    np.testing.assert_allclose(raw[:, 0].numpy(), tasks[1].test.x[..., 0] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), tasks[1].test.y)
    x2 = torch.cat([b[0] for b in loader])
    assert torch.equal(x, x2)


def test_test_loader_for_the_cifar_shaped_net(manifest, tasks):
    x, y = next(iter(make_loader(manifest, "t1", "test", batch_size=16)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey repeated
    info = manifest.task("t1")
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(tasks[1].test.x[:16]).permute(0, 3, 1, 2).float() / 255,
        size=(32, 32),
        mode="bilinear",
        align_corners=False,
    )
    torch.testing.assert_close(x[:, :1], (ref - info.mean[0]) / info.std[0])


def test_train_loader_shuffles_per_epoch_reproducibly(manifest, tasks):
    loader = make_loader(manifest, "t1", "train", batch_size=64, seed=3, shuffle_buffer=200)
    assert len(loader) == 5 and loader.flip is False
    e0 = [(x, y) for x, y in loader]
    e1 = [(x, y) for x, y in loader]  # the epoch advances by itself
    labels0 = torch.cat([y for _, y in e0])
    assert sorted(labels0.tolist()) == sorted(tasks[1].train.y.tolist())
    assert e0[0][0].shape == (64, 3, 32, 32)
    assert not torch.equal(labels0, torch.cat([y for _, y in e1]))
    loader.set_epoch(0)
    again = [(x, y) for x, y in loader]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, again))
    other = make_loader(manifest, "t1", "train", batch_size=64, seed=3, shuffle_buffer=200)
    assert torch.equal(next(iter(other))[0], e0[0][0])
    dropped = make_loader(manifest, "t1", "train", batch_size=64, drop_last=True)
    assert len(dropped) == 4 and [len(y) for _, y in dropped] == [64] * 4


def test_train_augmentation_is_crop_and_optional_flip(manifest):
    """Augmented images are 32x32 crops of the zero-padded image: each is a shift of the resized original."""
    # the test split is one shard, and shuffle_buffer=1 turns sample shuffling off: same order as `plain`
    plain = make_loader(manifest, "t1", "test", batch_size=100, train=False)
    aug = make_loader(manifest, "t1", "test", batch_size=100, train=True, shuffle_buffer=1, flip=True, seed=1)
    (xp, yp), (xa, ya) = next(iter(plain)), next(iter(aug))
    assert torch.equal(yp, ya)
    info = manifest.task("t1")
    zero = -info.mean[0] / info.std[0]  # the padding value after normalisation
    padded = torch.nn.functional.pad(xp[:, :1] - zero, (4, 4, 4, 4)) + zero
    flips = 0
    for i in range(20):
        windows = padded[i, 0].unfold(0, 32, 1).unfold(1, 32, 1)  # [9, 9, 32, 32] all crops
        target = xa[i, 0]
        if not (windows - target).abs().amax(dim=(2, 3)).min() < 1e-5:
            assert (windows - target.flip(-1)).abs().amax(dim=(2, 3)).min() < 1e-5
            flips += 1
    assert 0 < flips < 20


def test_holdout_partitions_the_train_split(manifest):
    fit = make_loader(manifest, "t1", "train", batch_size=50, holdout=0.2, part="fit", train=False)
    held = make_loader(manifest, "t1", "train", batch_size=50, holdout=0.2, part="holdout", train=False)
    every = make_loader(manifest, "t1", "train", batch_size=50, train=False)
    assert fit.num_samples + held.num_samples == every.num_samples == 300
    assert 30 <= held.num_samples <= 90
    xf = torch.cat([x for x, _ in fit])
    xh = torch.cat([x for x, _ in held])
    assert len(xf) == fit.num_samples and len(xh) == held.num_samples and len(held) == -(-held.num_samples // 50)
    xe = torch.cat([x for x, _ in every])
    assert sorted(map(bytes, xe.numpy())) == sorted(map(bytes, torch.cat([xf, xh]).numpy()))
    shuffled = make_loader(manifest, "t1", "train", batch_size=50, holdout=0.2, part="holdout", seed=9)
    assert sum(len(y) for _, y in shuffled) == held.num_samples  # same keys whatever the seed
    with pytest.raises(ValueError, match="selects from the train split only"):
        make_loader(manifest, "t1", "test", holdout=0.2, part="fit")
    with pytest.raises(UnknownNameError, match="unknown part 'val'; valid: 'all', 'fit', 'holdout'"):
        make_loader(manifest, "t1", "train", holdout=0.2, part="val")


# ---------------------------------------------------------------------------------------- idempotence


def test_same_spec_reuses_changed_task_rewrites_only_that_task(bench, tmp_path):
    logs: list[str] = []
    first = ensure_shards(bench, tmp_path, log=logs.append)
    shard = Path(first.url(first.task("t1").shards["train"][0]))
    mtime = shard.stat().st_mtime_ns
    second = ensure_shards(dict(bench), tmp_path, log=logs.append)
    assert second.to_dict() == first.to_dict() and shard.stat().st_mtime_ns == mtime
    assert logs[-1].startswith("[shards] reusing") and not any("writing" in m for m in logs[len(logs) - 1:])
    # loader-only option: manifest updated, shards kept
    third = ensure_shards({**bench, "flip": True}, tmp_path, log=logs.append)
    assert third.spec_hash == first.spec_hash and all(t.flip for t in third.tasks)
    assert shard.stat().st_mtime_ns == mtime and Manifest.load(tmp_path / "fmnist_small").task("t2").flip
    # one task's caps changed: only it is written again, into a new folder; the old folder stays for old runs
    logs.clear()
    changed = ensure_shards({**bench, "task_caps": {"t1": {"train": 200, "test": 50}}}, tmp_path, log=logs.append)
    assert changed.spec_hash != first.spec_hash and changed.task("t1").counts == {"train": 200, "test": 50}
    assert "2 task(s) reused, writing 1" in " ".join(logs)
    assert changed.task("t2").to_dict() == first.task("t2").to_dict() and shard.stat().st_mtime_ns == mtime
    assert changed.task("t1").identity != first.task("t1").identity
    assert changed.task("t0").identity == first.task("t0").identity
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist_small", "tasks"]
    assert len(list((tmp_path / "tasks").iterdir())) == 4  # t0, t1 (old and new), t2; no temp folders left
    assert spec_hash(bench) == first.spec_hash and spec_hash({**bench, "flip": False}) == first.spec_hash


def test_an_identical_task_is_shared_across_streams_and_an_appended_one_is_the_only_write(bench, tmp_path):
    """Two streams holding the same task (same source, classes, caps, name) share its one folder, whatever its
    position; appending a task to a stream writes that task alone."""
    lists = [["T-shirt/top", "Trouser"], ["Pullover", "Dress"], ["Coat", "Sandal"]]
    one = ensure_shards({**bench, "class_lists": lists}, tmp_path, log=quiet)
    logs: list[str] = []
    longer = ensure_shards({**bench, "class_lists": [*lists, ["Shirt", "Sneaker"]]}, tmp_path, log=logs.append)
    assert "3 task(s) reused, writing 1" in " ".join(logs)
    assert [t.to_dict() for t in longer.tasks[:3]] == [t.to_dict() for t in one.tasks]
    other = {"name": "other_stream", "kind": "sequence", "caps": bench["caps"], "initial_caps": bench["initial_caps"],
             "shard": bench["shard"],
             "tasks": [{"name": "t0", "source": {"name": "fashion_mnist"}, "classes": [0, 1]},
                       {"name": "t2", "source": {"name": "fashion_mnist"}, "classes": ["Coat", "Sandal"]}]}
    logs.clear()
    shared = ensure_shards(other, tmp_path, log=logs.append)
    assert not any("writing" in m for m in logs)  # both tasks were already on disk, under other positions
    assert shared.task("t2").identity == one.task("t2").identity
    assert shared.url(shared.task("t2").shards["test"][0]) == one.url(one.task("t2").shards["test"][0])


def test_killed_writer_leftovers_are_ignored_and_a_failed_write_leaves_no_task(bench, tmp_path):
    import os
    import socket

    specs = task_specs(bench)
    tasks_root = tmp_path / "tasks"
    dead = tasks_root / f".{specs[1].folder}.tmp-{socket.gethostname()}-999999-1"  # a killed writer's temp folder
    (dead / "x").mkdir(parents=True)
    live = tasks_root / f".{specs[1].folder}.tmp-{socket.gethostname()}-{os.getpid()}-1"  # a writer still at work
    live.mkdir()
    good = ensure_shards(bench, tmp_path, log=quiet)
    assert not dead.exists() and live.exists()
    live.rmdir()
    # a write that dies half way (here: a source with no such class) leaves no folder a later run would trust
    bad = {**specs[2].__dict__, "classes": [99]}
    with pytest.raises(Exception):
        write_task(type(specs[2])(**bad), str(tasks_root))
    assert sorted(p.name for p in tasks_root.iterdir()) == sorted(s.folder for s in specs)
    assert Manifest.load(tmp_path / "fmnist_small").to_dict() == good.to_dict()
    good.verify()
    # two writers of one task: the second rename loses, keeps the first folder, and returns the same task
    again = write_task(specs[1], str(tasks_root))
    assert again.to_dict() == Manifest.load(tasks_root.parent / "fmnist_small").task("t1").to_dict() | {
        "shards": again.shards, "sha256": again.sha256, "sizes": again.sizes, "shard_counts": again.shard_counts}
    assert sorted(p.name for p in tasks_root.iterdir()) == sorted(s.folder for s in specs)


# -------------------------------------------------------------------------------------------- corruption


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_checksums_catch_a_flipped_byte(bench, tmp_path):
    manifest = fresh(bench, tmp_path)
    manifest.verify()
    rel = manifest.task("t2").shards["train"][1]
    shard = Path(manifest.url(rel))
    flip_byte(shard, 512 * 3 + 128 + 400)  # cls header+data, npy header, .npy header: a pixel of sample 0
    expected = f"shard {shard} is corrupt (sha256 mismatch); {FIX}"
    with pytest.raises(ShardCorruptError) as err:
        manifest.verify()
    assert str(err.value) == expected
    manifest.verify("t1")  # other tasks are fine
    unchecked = make_loader(manifest, "t2", "train", batch_size=64, check_sha256=False)
    assert sum(len(y) for _, y in unchecked) == 300  # tar itself does not notice: only the checksum does
    with pytest.raises(ShardCorruptError) as err:
        for _ in make_loader(manifest, "t2", "train", batch_size=64):
            pass
    assert str(err.value) == expected
    skipping = make_loader(manifest, "t2", "train", batch_size=64, on_corrupt="skip")
    seen = sum(len(y) for _, y in skipping)
    assert seen == 300 - 128 and skipping.skipped == 128 and skipping.skipped_shards == [str(shard)]
    # cheap reuse check (sizes) passes; the full check rewrites
    assert ensure_shards(bench, tmp_path, log=quiet).spec_hash == manifest.spec_hash
    logs: list[str] = []
    repaired = ensure_shards(bench, tmp_path, log=logs.append, verify="sha256")
    assert "sha256 mismatch" in logs[0] and "rewriting task t2" in logs[0]
    assert "2 task(s) reused, writing 1" in logs[1]
    repaired.verify()


def test_missing_shard_names_it_and_the_fix(bench, tmp_path):
    manifest = fresh(bench, tmp_path)
    shard = Path(manifest.url(manifest.task("t1").shards["test"][0]))
    shard.unlink()
    with pytest.raises(ShardCorruptError, match=f"shard {shard} is missing; run `python run_pipeline.py mode=shards`"):
        manifest.verify()
    with pytest.raises(ShardCorruptError, match="is missing"):
        list(make_loader(manifest, "t1", "test"))
    assert ensure_shards(bench, tmp_path, log=quiet).task("t1").counts["test"] == 100  # rewritten
    assert shard.is_file()


def test_pickle_entries_in_a_shard_are_never_unpickled(bench, tmp_path):
    """A shard carrying a .pyd entry whose unpickling would create a file: the loader never reads it."""
    manifest = fresh(bench, tmp_path)
    rel = manifest.task("t1").shards["test"][0]
    shard = Path(manifest.url(rel))
    canary = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (canary,))

    with tarfile.open(shard) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m, data in members:
            dst.addfile(m, io.BytesIO(data))
            if m.name.endswith(".npy"):
                trap = pickle.dumps(Trap())
                info = tarfile.TarInfo(m.name.replace(".npy", ".pyd"))
                info.size = len(trap)
                dst.addfile(info, io.BytesIO(trap))
    from pipeline.data.manifest import sha256_file

    manifest.task("t1").sha256[rel] = sha256_file(shard)
    ys = [y for _, y in make_loader(manifest, "t1", "test", batch_size=50)]
    assert sum(len(y) for y in ys) == 100 and not canary.exists()
    assert os.path.getsize(shard) > manifest.task("t1").sizes[rel]


@pytest.mark.parametrize("size", [32, 16, 28])
def test_batch_transform_equals_resize_pad_crop_flip_step_by_step(tasks, size):
    """The fused matmul transform gives the pixels of interpolate -> pad -> crop -> flip done one by one."""
    from pipeline.data.transforms import BatchTransform

    x = torch.from_numpy(tasks[1].test.x[:24])
    fused = BatchTransform([0.5], [0.25], image_size=size, channels=1, train=True, flip=True)
    out, _ = fused((x, torch.zeros(24, dtype=torch.int64)), torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # same draws, same order: crop rows, crop cols, flips
    oy, ox = torch.randint(0, 9, (24,), generator=g), torch.randint(0, 9, (24,), generator=g)
    flipped = torch.rand(24, generator=g) < 0.5
    ref = x.permute(0, 3, 1, 2).float() / 255
    if size != 28:
        ref = torch.nn.functional.interpolate(
            ref, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 28
        )
    ref = torch.nn.functional.pad(ref, (4, 4, 4, 4))
    ref = torch.stack([ref[i, :, oy[i] : oy[i] + size, ox[i] : ox[i] + size] for i in range(24)])
    ref = torch.where(flipped[:, None, None, None], ref.flip(-1), ref)
    torch.testing.assert_close(out, (ref - 0.5) / 0.25)
    assert 0 < int(flipped.sum()) < 24


@pytest.mark.parametrize("scheme", ["file", pytest.param("pipe", marks=pytest.mark.slow)])  # pipe: runs `cat`
def test_shards_stream_from_any_url_webdataset_opens(manifest, tasks, scheme):
    """A manifest whose root is a URL (object storage later) streams and verifies through webdataset's gopen."""
    root = f"file://{manifest.root}" if scheme == "file" else f"pipe:cat {manifest.root}/{{rel}}"
    remote = Manifest.from_dict(manifest.to_dict(), root=root)
    assert remote.url("t1/test-000000.tar").startswith(f"{scheme}:")
    remote.verify("t1")
    _, xs, ys = zip(*iter_samples(remote, "t1", "test"))
    np.testing.assert_array_equal(np.stack(xs), tasks[1].test.x)
    assert sum(len(y) for _, y in make_loader(remote, "t1", "train", batch_size=100)) == 300


def test_auto_format_picks_png_for_large_images_only():
    from pipeline.data.shards import image_format

    assert image_format("auto", (28, 28, 1)) == "npy" and image_format("auto", (32, 32, 3)) == "npy"
    assert image_format("auto", (64, 64, 3)) == "png" and image_format("png", (8, 8, 1)) == "png"
    assert image_format("jpeg", (8, 8, 1)) == "jpeg" and image_format("webp", (64, 64, 3)) == "webp"
    with pytest.raises(UnknownNameError,
                       match="unknown shard image format 'jpg'; valid: 'npy', 'png', 'jpeg', 'webp', 'auto'"):
        image_format("jpg", (8, 8, 1))  # the format is `jpeg`; `jpg` is only its entries' extension


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]


def _expanded(data: bytes, url: str = "mem.tar") -> list[tuple[str, bytes]]:
    from pipeline.data.tario import tar_expander

    out = list(tar_expander(iter([{"url": url, "stream": io.BytesIO(data)}])))
    assert out[-1] == {} and all(s["__url__"] == url for s in out[:-1])  # webdataset's end-of-shard marker
    return [(s["fname"], s["data"]) for s in out[:-1]]


def test_fast_tar_reader_matches_tarfile_on_real_shards(manifest):
    for split in ("train", "test"):
        for rel in manifest.task("t1").shards[split]:
            data = Path(manifest.url(rel)).read_bytes()
            assert _expanded(data) == _tarfile_members(data)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_fast_tar_reader_falls_back_to_tarfile_for_long_names(fmt):
    buf = io.BytesIO()
    names = ["a" * 150 + ".cls", "short.cls", "dir/x.npy"]
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, n in enumerate(names):
            info = tarfile.TarInfo(n)
            info.size = i + 1
            tf.addfile(info, io.BytesIO(b"x" * (i + 1)))
    data = buf.getvalue()
    assert _expanded(data) == _tarfile_members(data) == [(n, b"x" * (i + 1)) for i, n in enumerate(names)]


def test_fast_tar_reader_rejects_a_damaged_header(manifest):
    from pipeline.data.tario import tar_expander

    data = bytearray(Path(manifest.url(manifest.task("t1").shards["test"][0])).read_bytes())
    data[512 * 2 + 10] ^= 0x01  # a byte of the second member's name: its header checksum no longer matches
    with pytest.raises(ValueError, match="bad tar header checksum at byte 1024"):
        list(tar_expander(iter([{"url": "mem.tar", "stream": io.BytesIO(bytes(data))}])))


_SHARDS_NS_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, "tests")
from data_helpers import small_fashion_benchmark
from pipeline.data import ensure_shards
from pipeline.errors import ShardWriteError
out = {}
for name, root in (("full", sys.argv[1]), ("ro", sys.argv[2])):
    try:
        ensure_shards(small_fashion_benchmark(), root, log=lambda _: None)
        out[name] = None
    except ShardWriteError as e:
        out[name] = {"errno": e.errno, "msg": str(e)}
    tasks = os.path.join(root, "tasks")
    out[name + "_left"] = sorted(os.listdir(tasks)) if os.path.isdir(tasks) else []
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_shards_on_a_full_or_read_only_disk_fail_naming_the_task_path_and_errno(tmp_path):
    """A real 1.6 MiB tmpfs fills while the second task is written (ENOSPC), a real read-only tmpfs refuses the
    first (EROFS): each error names the task, the folder, the errno and the fix; no temp folder is left, and the
    complete first task stays (a rerun with room reuses it)."""
    import errno

    out, full, ro = run_on_full_and_read_only_disks(tmp_path, _SHARDS_NS_SCRIPT, "1600k",
                                                    "no private mount namespace here (unshare -rm + mount tmpfs refused)")
    assert out["full"]["errno"] == errno.ENOSPC and "[ENOSPC] No space left on device" in out["full"]["msg"]
    assert f"under {full}/tasks" in out["full"]["msg"] and "paths.shards" in out["full"]["msg"]
    assert out["full_left"] and not [f for f in out["full_left"] if f.startswith(".")]  # complete tasks only
    assert out["ro"]["errno"] == errno.EROFS and "task 't0'" in out["ro"]["msg"] and out["ro_left"] == []
