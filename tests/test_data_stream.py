"""Streamed sources and the streaming task writer (#21): an ImageFolder of real JPEGs, a WebDataset corpus written
with webdataset's own TarWriter, encoded shards, and bad input. Real Fashion-MNIST images, written as JPEG here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_helpers import fashion_jpegs, write_jpeg_corpus, write_jpeg_folder
from PIL import Image

from pipeline.data import ConfigError, Manifest, TaskInfo, UnknownNameError, build_task, ensure_shards, task_specs
from pipeline.data.catalogue import _check_line
from pipeline.data.corpus import ensure_index
from pipeline.data.members import MemberError
from pipeline.data.sources import list_members
from pipeline.errors import UnsafeInputError


def quiet(_msg: str) -> None:
    pass


# every file this process opens while RECORDING is on: the real open() calls, seen through Python's audit hooks
OPENED: list[str] = []
RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if RECORDING[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bench_of(source: dict, classes: list | None, **overrides) -> dict:
    bench = {"name": "stream", "kind": "sequence", "caps": {"train": None, "test": None, "seed": 0}, "channels": 3,
             "seed": 0, "shard": {"max_samples": 16, "format": "npy"},
             "tasks": [{"name": "t", "source": source, "classes": classes}]}
    bench.update(overrides)
    return bench


def samples(manifest: Manifest, task: str, split: str) -> list[tuple[str, str, bytes, int]]:
    """(key, image extension, image bytes, label) of every sample of a split, read straight from its tars."""
    out = []
    for rel in manifest.task(task).shards[split]:
        entries: dict[str, dict[str, bytes]] = {}
        with tarfile.open(manifest.url(rel)) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                entries.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key, e in entries.items():
            (ext,) = [x for x in e if x != "cls"]
            out.append((key, ext, e[ext], int(e["cls"])))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_jpeg_folder(tmp_path_factory.mktemp("folder"), [0, 1, 7], per_class=30)


# --------------------------------------------------------------------------------------------- image folder


def test_an_image_folder_task_opens_only_its_classes_files_and_stores_their_bytes(folder, tmp_path):
    source = {"name": "image_folder", "root": str(folder)}
    OPENED.clear()
    RECORDING[0] = True
    try:
        m = ensure_shards(bench_of(source, ["c7", "c0"]), tmp_path, log=quiet)
    finally:
        RECORDING[0] = False
    images = [p for p in OPENED if p.startswith(str(folder))]
    assert images and not [p for p in images if "/c1/" in p]  # class c1 is listed, never opened
    assert {Path(p).parent.name for p in images} == {"c0", "c7"} and len(set(images)) == len(images) == 60
    info = m.task("t")
    assert info.class_names == ["c7", "c0"] and info.image_format == "source" and info.uniform_shape
    assert info.counts == {"train": 48, "test": 12} and info.image_shape == (64, 64, 3) and info.skipped == []
    source_bytes = {sha((folder / c / f).read_bytes()): label for label, c in enumerate(["c7", "c0"])
                    for f in os.listdir(folder / c)}
    stored = samples(m, "t", "train") + samples(m, "t", "test")
    assert len(stored) == 60 and all(ext == "jpg" for _, ext, _, _ in stored)
    assert {sha(data): label for _, _, data, label in stored} == source_bytes  # each file's bytes, unchanged
    assert [k for k, *_ in samples(m, "t", "train")] == [f"{i:07d}" for i in range(48)]
    assert [len(m.task("t").shards[s]) for s in ("train", "test")] == [3, 1]  # 16 per shard
    # the same members, in the same order, as the task built in memory (same select/cap/shuffle functions)
    task = build_task(task_specs(bench_of(source, ["c7", "c0"]))[0])
    assert [lab for *_, lab in samples(m, "t", "train")] == task.train.y.tolist()
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for _, _, d, _ in samples(m, "t", "test")])
    np.testing.assert_array_equal(decoded, task.test.x)
    np.testing.assert_allclose(info.mean, (task.train.x / 255.0).mean(axis=(0, 1, 2)), rtol=1e-9)


def test_caps_pick_the_same_members_streamed_as_in_memory(folder, tmp_path):
    bench = bench_of({"name": "image_folder", "root": str(folder), "test_fraction": 0.25, "split_seed": 3},
                     ["c1", "c7"], caps={"train": 20, "test": 6, "seed": 5})
    m = ensure_shards(bench, tmp_path, log=quiet)
    task = build_task(task_specs(bench)[0])
    assert m.task("t").counts == {"train": 20, "test": 6}
    for split in ("train", "test"):
        assert [lab for *_, lab in samples(m, "t", split)] == task.split(split).y.tolist()
        assert sorted(np.bincount(task.split(split).y).tolist()) == ([10, 10] if split == "train" else [3, 3])


def test_images_of_different_sizes_pass_through_and_say_so(tmp_path):
    root = tmp_path / "mixed"
    for n, (label, data) in enumerate(fashion_jpegs([2, 3], 6)):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        if n % 3 == 0:  # a third of them 48 px PNGs: PNG stays PNG
            im = Image.open(io.BytesIO(data)).resize((48, 48))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            data = buf.getvalue()
        (root / f"c{label}" / f"{n}.img.{'png' if n % 3 == 0 else 'jpg'}").write_bytes(data)
    # one BMP: re-encoded to PNG, lossless
    Image.open(io.BytesIO(fashion_jpegs([2], 1, offset=50)[0][1])).save(root / "c2" / "z.bmp")
    m = ensure_shards(bench_of({"name": "image_folder", "root": str(root), "test_fraction": 0.25}, None), tmp_path / "s",
                      log=quiet)
    info = m.task("t")
    assert info.image_format == "source" and not info.uniform_shape and info.counts == {"train": 10, "test": 3}
    stored = samples(m, "t", "train") + samples(m, "t", "test")
    assert sorted(ext for _, ext, _, _ in stored) == ["jpg"] * 8 + ["png"] * 5
    bmp = np.asarray(Image.open(root / "c2" / "z.bmp").convert("RGB"))
    pngs = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for _, ext, d, _ in stored if ext == "png"]
    assert any(p.shape == bmp.shape and np.array_equal(p, bmp) for p in pngs)


@pytest.mark.parametrize("fmt,ext", [("jpeg", "jpg"), ("webp", "webp"), ("png", "png")])
def test_a_resized_task_is_stored_in_the_configured_format(folder, tmp_path, fmt, ext):
    source = {"name": "image_folder", "root": str(folder), "size": [32, 32]}
    bench = bench_of(source, ["c0", "c1"], shard={"max_samples": 64, "format": fmt, "quality": 80})
    m = ensure_shards(bench, tmp_path, log=quiet)
    info = m.task("t")
    assert info.image_format == fmt and info.image_shape == (32, 32, 3) and info.uniform_shape
    task = build_task(task_specs(bench)[0])
    stored = samples(m, "t", "test")
    assert {e for _, e, _, _ in stored} == {ext}
    x = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for _, _, d, _ in stored])
    assert x.shape == task.test.x.shape
    if fmt == "png":
        np.testing.assert_array_equal(x, task.test.x)  # lossless
    else:
        assert np.abs(x.astype(int) - task.test.x).mean() < 8  # lossy at quality 80, yet the same images
    # format and quality are the task's identity: another quality is another task folder
    other = task_specs({**bench, "shard": {"max_samples": 64, "format": fmt, "quality": 60}})[0]
    assert (other.key != task_specs(bench)[0].key) == (fmt != "png")


# --------------------------------------------------------------------------------------------- bad input


def test_a_corrupt_image_file_is_named_or_skipped(tmp_path):
    root = write_jpeg_folder(tmp_path / "f", [0, 1], per_class=10)
    bad = sorted((root / "c1").iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: the header parses, the pixels do not
    source = {"name": "image_folder", "root": str(root)}
    with pytest.raises(MemberError, match=rf"task 't', (train|test) split: {bad}: not a decodable image .*"
                                          "on_corrupt: skip"):
        ensure_shards(bench_of(source, None), tmp_path / "s", log=quiet)
    assert not [p for p in (tmp_path / "s" / "tasks").iterdir()]  # nothing half-written
    logs: list[str] = []
    m = ensure_shards(bench_of({**source, "on_corrupt": "skip"}, None), tmp_path / "s", log=logs.append)
    info = m.task("t")
    assert sum(info.counts.values()) == 19 and len(info.skipped) == 1 and str(bad) in info.skipped[0]
    assert any("1 unusable member(s) left out" in line and str(bad) in line for line in logs)
    with pytest.raises(UnknownNameError, match="unknown source.on_corrupt 'ignore'; valid: 'fail', 'skip'"):
        list_members({**source, "on_corrupt": "ignore"}, "train")


def test_a_class_with_no_members_is_refused_before_any_work(tmp_path):
    root = write_jpeg_folder(tmp_path / "f", [0, 1], per_class=5)
    (root / "empty").mkdir()
    bench = bench_of({"name": "image_folder", "root": str(root)}, ["c0", "empty"])
    OPENED.clear()
    RECORDING[0] = True
    try:
        with pytest.raises(ConfigError, match=r"class 'empty' has no members .*classes with members: \['c0', 'c1'\]"):
            ensure_shards(bench, tmp_path / "s", log=quiet)
    finally:
        RECORDING[0] = False
    assert not [p for p in OPENED if p.startswith(str(root))]  # no image was opened
    assert not (tmp_path / "s" / "tasks").exists() or not list((tmp_path / "s" / "tasks").iterdir())


def test_a_catalogue_line_may_not_hide_a_pipe_in_a_corpus_urls():
    for urls in ("pipe:curl -s http://x/{0..3}.tar", ["/data/a.tar", "pipe:sh -c id"], {"train": "/a.tar",
                                                                                            "test": " pipe:id"}):
        line = json.dumps({"name": "t", "source": {"name": "webdataset", "urls": urls}}).encode()
        with pytest.raises(UnsafeInputError, match=r"`source\.urls.*` is a `pipe:` command"):
            _check_line(line, False)


def test_an_old_manifest_entry_reads_as_uniform_with_nothing_skipped():
    d = {"name": "t", "class_names": ["a"], "num_classes": 1, "counts": {"train": 1, "test": 1},
         "image_shape": [8, 8, 1], "mean": [0.5], "std": [0.2], "shards": {}, "sha256": {}}
    info = TaskInfo.from_dict(d)
    assert info.uniform_shape is True and info.skipped == [] and info.image_format == "npy"


# ------------------------------------------------------------------------------------------ webdataset corpus


def corpus_source(shards: list[Path], **extra) -> dict:
    return {"name": "webdataset", "urls": str(shards[0].parent / ("corpus-{000000..%06d}.tar" % (len(shards) - 1))),
            "image_key": "jpg", "label_key": "cls", **extra}


def corpus_bytes(shards: list[Path]) -> dict[str, tuple[bytes, bytes]]:
    """key -> (image bytes, label entry) of every sample of the corpus, read with webdataset's own reader."""
    ds = wds.WebDataset([str(p) for p in shards], shardshuffle=False)
    return {s["__key__"]: (s["jpg"], s.get("cls", s.get("json"))) for s in ds}


def test_a_corpus_task_reads_its_members_by_offset_and_keeps_their_bytes(tmp_path):
    shards = write_jpeg_corpus(tmp_path / "corpus", [0, 1, 2, 3], per_class=20, shards=3)
    source = corpus_source(shards)
    bench = bench_of(source, [3, 1], caps={"train": 24, "test": None, "seed": 0})
    logs: list[str] = []
    m = ensure_shards(bench, tmp_path / "s", log=logs.append)
    assert any("indexing 3 of 3 corpus shard(s)" in line for line in logs)
    info = m.task("t")
    assert info.class_names == ["3", "1"] and info.image_format == "source" and info.source == "webdataset"
    assert info.counts == {"train": 24, "test": 8}  # 40 members, a 20% hold-out, then the train cap
    want = {sha(img): int(cls) for img, cls in corpus_bytes(shards).values() if int(cls) in (1, 3)}
    stored = samples(m, "t", "train") + samples(m, "t", "test")
    assert all(ext == "jpg" for _, ext, _, _ in stored)
    assert all(want[sha(d)] == [3, 1][lab] for _, _, d, lab in stored)  # the corpus's bytes, with their label
    assert len({sha(d) for _, _, d, _ in stored}) == 32
    task = build_task(task_specs(bench)[0])
    assert [lab for *_, lab in samples(m, "t", "train")] == task.train.y.tolist()
    assert len(list((tmp_path / "s" / "index").glob("*.json"))) == 3


def test_a_json_label_corpus_with_a_classes_file(tmp_path):
    shards = write_jpeg_corpus(tmp_path / "corpus", [4, 5, 6], per_class=10, shards=2, json_label=True)
    classes = tmp_path / "classes.txt"
    classes.write_text("c4\nc5\nc6\nc9\n")
    source = corpus_source(shards, label_key="json.label", classes_file=str(classes), test_fraction=0.5)
    m = ensure_shards(bench_of(source, ["c6", "c4"]), tmp_path / "s", log=quiet)
    info = m.task("t")
    assert info.class_names == ["c6", "c4"] and info.counts == {"train": 10, "test": 10}
    want = {sha(img): json.loads(lab)["label"] for img, lab in corpus_bytes(shards).values()}
    assert all(want[sha(d)] == ["c6", "c4"][lab] for _, _, d, lab in samples(m, "t", "train") + samples(m, "t", "test"))
    with pytest.raises(ConfigError, match=r"class 'c9' has no members .*classes with members: \['c4', 'c5', 'c6'\]"):
        ensure_shards(bench_of(source, ["c9"]), tmp_path / "s", log=quiet)


def test_a_corpus_index_is_reused_and_rebuilt_when_a_shard_changes(tmp_path):
    shards = write_jpeg_corpus(tmp_path / "corpus", [0, 1], per_class=10, shards=2)
    source = corpus_source(shards)
    index = tmp_path / "index"
    built: list[str] = []

    def counting(fn, items):  # the map_fn a driver passes (Ray's there): here in-process, counting the jobs
        built.extend(url for url, *_ in items)
        return (fn(*args) for args in items)

    first = ensure_index(source, index, map_fn=counting)
    assert sorted(built) == [str(p) for p in shards] and len(list(index.glob("*.json"))) == 2
    built.clear()
    assert ensure_index(source, index, map_fn=counting) == first and built == []  # reused
    # the corpus changes: a sample is put in front of shard 1 (every offset in it moves)
    extra = fashion_jpegs([1], 1, offset=40)[0][1]
    old = list(wds.WebDataset(str(shards[1]), shardshuffle=False))
    with wds.TarWriter(str(shards[1]), encoder=False) as w:
        w.write({"__key__": "a-new", "jpg": extra, "cls": b"1"})
        for s in old:
            w.write({"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]})
    second = ensure_index(source, index, map_fn=counting)
    assert built == [str(shards[1])] and len(list(index.glob("*.json"))) == 2  # only that shard; old index gone
    assert second[0] == first[0] and second[1]["keys"][0] == "a-new" and len(second[1]["keys"]) == 11
    # a task written now reads the new offsets: every stored image is a corpus image
    m = ensure_shards(bench_of(source, [1], shard={"max_samples": 8, "format": "npy"}), tmp_path / "s", log=quiet)
    want = {sha(img) for img, _ in corpus_bytes(shards).values()}
    stored = samples(m, "t", "train") + samples(m, "t", "test")
    assert len(stored) == 11 and all(sha(d) in want for _, _, d, _ in stored)


def test_a_stale_offset_is_never_read(tmp_path):
    """A shard rewritten with its size and mtime kept (a copy with `touch -r`): the index looks current, but the
    member's tar header at its offset no longer names it, so the read stops, naming it, and the index is dropped."""
    shards = write_jpeg_corpus(tmp_path / "corpus", [0, 1], per_class=6, shards=1)
    source = corpus_source(shards)
    members = list_members(source, "train", tmp_path / "index")
    st = shards[0].stat()
    old = list(wds.WebDataset(str(shards[0]), shardshuffle=False))
    with wds.TarWriter(str(shards[0]), encoder=False) as w:  # same samples, keys renamed: same sizes, other names
        for s in old:
            w.write({"__key__": "x" + s["__key__"][1:], "jpg": s["jpg"], "cls": s["cls"]})
    assert shards[0].stat().st_size == st.st_size
    os.utime(shards[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(Exception, match=r"member s\d+\.jpg is not where the corpus index says: the shard changed"):
        list(members.read([0]))
    assert not list((tmp_path / "index").glob("*.json"))  # dropped: the next run indexes it again
    again = list_members(source, "train", tmp_path / "index")
    assert again.name(0).endswith(".jpg") and " member x" in again.name(0)


def test_corpus_samples_without_a_label_or_with_a_corrupt_image_are_named(tmp_path):
    shards = write_jpeg_corpus(tmp_path / "corpus", [0, 1], per_class=8, shards=2)
    jpg = fashion_jpegs([0], 1, offset=30)[0][1]
    old = list(wds.WebDataset(str(shards[0]), shardshuffle=False))
    with wds.TarWriter(str(shards[0]), encoder=False) as w:
        for s in old:
            w.write({"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]})
        w.write({"__key__": "nolabel", "jpg": jpg})
    source = corpus_source(shards)
    with pytest.raises(MemberError, match=rf"corpus shard {shards[0]} sample nolabel: no 'cls' entry \(label_key\)"):
        ensure_shards(bench_of(source, None), tmp_path / "s", log=quiet)
    m = ensure_shards(bench_of({**source, "on_corrupt": "skip"}, None), tmp_path / "s", log=quiet)
    assert sum(m.task("t").counts.values()) == 16 and "sample nolabel: no 'cls' entry" in m.task("t").skipped[0]
    # a member whose image bytes are damaged: named by shard and key
    old = list(wds.WebDataset(str(shards[1]), shardshuffle=False))
    with wds.TarWriter(str(shards[1]), encoder=False) as w:
        for s in old:
            w.write({"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]})
        w.write({"__key__": "broken", "jpg": jpg[:200], "cls": b"0"})
    with pytest.raises(MemberError, match=rf"corpus shard {shards[1]} member broken\.jpg: not a decodable image"):
        ensure_shards(bench_of({**source, "urls": str(shards[1])}, None), tmp_path / "s", log=quiet)
