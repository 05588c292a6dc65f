"""Hostile input, the data side (issue #23): a catalogue line, a data file under a root it names, a manifest or a
task.json must never run code or reach a shell, one bad line costs only that line, and a kept trained task is
deleted only on proof that it is bad.

Each test feeds the real exploit input (a crafted pickle, a `;` shard path under a `pipe:` root, the bad lines
a reviewer sent, a kept record that cannot be read) to the real planning and reading functions, in-process: no
Ray, no MLflow, no process (a payload that got through would show as the marker file, or as a process that
tests/conftest.py refuses). Real Fashion-MNIST from the Debian package."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import ensure_shards, load_source, task_specs
from pipeline.data.benchmarks import expand, load_benchmark_config
from pipeline.data.cifar100 import FINE_NAMES, FINE_TO_COARSE, read_cifar100
from pipeline.data.manifest import FORMAT_VERSION, Manifest, join_url
from pipeline.errors import ConfigError, DataError, PipelineError, UnsafeInputError
from pipeline.unlogged import RECORD_FILE, Unlogged  # imported here: importing it runs `uname -p` (platform), once

FM = {"name": "fashion_mnist"}
BASE = {"name": "base", "source": FM, "classes": [0, 1, 2, 3], "caps": {"train": 40, "test": 20}}
TOPS = {"name": "tops", "source": FM, "classes": ["Shirt", "Bag"], "caps": {"train": 20, "test": 10}}
BOOTS = {"name": "boots", "source": FM, "classes": ["Ankle boot", "Trouser"], "caps": {"train": 20, "test": 10}}
KEY = "0123456789abcdef"  # a task folder's key, as the writer makes them (16 hex digits)


def write_lines(path: Path, lines: list) -> Path:
    """One line per item: a dict as JSON, bytes as they are (a bad line may be any bytes)."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


def catalogue(path: Path, **over) -> dict:
    return {**load_benchmark_config("catalogue"), "path": str(path), **over}


def plan(bench: dict) -> tuple[list[str], list[str]]:
    """What planning makes of a stream: its task names (as task_specs plans them) and the problems named."""
    fixed, problems = expand(bench)
    names = [s.name for s in task_specs(bench)]
    assert names == [t["name"] for t in fixed["tasks"]]
    return names, problems


class Payload:
    """What a crafted CIFAR-100 file holds: unpickling it calls exec, which creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def crafted_cifar_root(root: Path, marker: Path) -> Path:
    (root / "cifar-100-python").mkdir(parents=True)
    with open(root / "cifar-100-python" / "test", "wb") as f:
        pickle.dump(Payload(marker), f)
    return root


# ------------------------------------------------------------------------------ finding 1: data becomes code


def test_a_crafted_cifar_pickle_under_a_line_s_root_runs_nothing_and_costs_only_its_line(tmp_path):
    marker = tmp_path / "pwned"
    root = crafted_cifar_root(tmp_path / "evil", marker)
    evil = {"name": "evil", "source": {"name": "cifar100", "root": str(root)}, "classes": ["apple"]}
    cat = write_lines(tmp_path / "tasks.jsonl", [BASE, evil, TOPS])

    names, problems = plan(catalogue(cat))

    assert not marker.exists()  # the payload never ran
    assert names == ["base", "tops"]  # the other lines plan
    [problem] = problems
    assert f"{cat} line 2 is malformed" in problem
    assert f"{root / 'cifar-100-python' / 'test'} asks to call builtins.exec" in problem and "refused" in problem
    with pytest.raises(UnsafeInputError, match=r"cifar-100-python/test asks to call builtins\.exec"):
        load_source({"name": "cifar100", "root": str(root)}, "test")
    with pytest.raises(UnsafeInputError, match="builtins.exec"):
        read_cifar100(root, "test")
    assert not marker.exists()

    # a cut-off file is named too, not a raw traceback
    good = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]})
    (root / "cifar-100-python" / "test").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cifar-100-python/test is not a readable CIFAR-100 file"):
        read_cifar100(root, "test")

    # the release's own shape still reads, pickled the ways the release and Python 3 write it (2: Python 2's
    # protocol, with numpy's _reconstruct and _codecs.encode; 4: _reconstruct; 5: _frombuffer)
    fine = np.arange(100) % 100
    entry = {"data": np.arange(100 * 3072, dtype=np.int64).astype(np.uint8).reshape(100, 3072),
             "fine_labels": fine.tolist(), "coarse_labels": FINE_TO_COARSE[fine].tolist(),
             "filenames": [f"{i}.png" for i in range(100)], "batch_label": "testing batch 1 of 1"}
    for protocol in (2, 4, 5):
        (root / "cifar-100-python" / "test").write_bytes(pickle.dumps(entry, protocol=protocol))
        (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"fine_label_names": list(FINE_NAMES)},
                                                                      protocol=protocol))
        split = read_cifar100(root, "test")
        assert split.x.shape == (100, 32, 32, 3) and split.y.tolist() == fine.tolist()
        assert np.array_equal(split.x[1].transpose(2, 0, 1).reshape(-1), entry["data"][1])


def test_a_download_in_a_catalogue_line_needs_the_config_s_consent(tmp_path):
    fetch = {**TOPS, "name": "fetched", "source": {**FM, "download": True}}
    cat = write_lines(tmp_path / "tasks.jsonl", [BASE, fetch, TOPS])

    names, problems = plan(catalogue(cat))

    assert names == ["base", "tops"]
    [problem] = problems
    assert f"{cat} line 2 is malformed" in problem and "benchmark.allow_download=true" in problem
    # with the config's consent the line plans (Fashion-MNIST is on disk here: nothing is fetched)
    assert plan(catalogue(cat, allow_download=True)) == (["base", "fetched", "tops"], [])


# ------------------------------------------------------------------ finding 2: shard paths never reach a shell


def manifest_with(shard: str) -> dict:
    """A stream's manifest (the writer's layout) whose one shard path is ``shard``."""
    task = {"name": "t1", "class_names": ["a", "b"], "num_classes": 2, "counts": {"train": 1, "test": 0},
            "image_shape": [28, 28, 1], "mean": [0.5] * 3, "std": [0.2] * 3,
            "shards": {"train": [shard], "test": []}, "sha256": {shard: "0" * 64}, "sizes": {shard: 10240}}
    return {"format_version": FORMAT_VERSION, "benchmark": "s", "spec_hash": "x", "tasks": [task]}


def test_a_manifest_shard_path_with_shell_characters_is_refused_before_any_command_runs(tmp_path):
    marker = tmp_path / "pwned"
    root = f"pipe:cat {tmp_path}/s/{{rel}}"  # a pipe: root, as the config may give it
    evil = f"../tasks/t1-{KEY}/train-000000.tar; touch {marker} #"

    with pytest.raises(UnsafeInputError, match=rf"manifest under pipe:cat .*task 't1' lists the train shard "
                                               rf"'\.\./tasks/t1-{KEY}/train-000000\.tar; touch "):
        Manifest.from_dict(manifest_with(evil), root=root).verify()
    with pytest.raises(UnsafeInputError, match="refusing to read"):
        join_url(root, evil)
    assert not marker.exists()

    # `..` folds against the stream's folder, never above the shard root: not into another host or bucket
    with pytest.raises(UnsafeInputError):
        join_url("http://127.0.0.1:9/shards/s", "../../../evil.example/x.tar")
    with pytest.raises(UnsafeInputError):
        join_url("pipe:aws s3 cp s3://bucket/shards/s/{rel} -", "../../other-bucket/x.tar")
    with pytest.raises(UnsafeInputError, match="climb above the shard root"):
        join_url("http://127.0.0.1:9", "../tasks/x.tar")
    with pytest.raises(UnsafeInputError):  # not the writer's shape, though harmless-looking
        Manifest.from_dict(manifest_with(f"../tasks/t1-{KEY}/../../../etc/train-000000.tar"), root=str(tmp_path))
    with pytest.raises(UnsafeInputError):  # a task name with a newline in a manifest
        Manifest.from_dict({**manifest_with(f"../tasks/t1-{KEY}/train-000000.tar"),
                            "tasks": [{**manifest_with("")["tasks"][0], "name": "t1\n"}]}, root=str(tmp_path))

    # what the writer makes still joins as before
    rel = f"../tasks/t1-{KEY}/train-000000.tar"
    assert join_url("pipe:aws s3 cp s3://bucket/shards/s/{rel} -", rel) == \
        f"pipe:aws s3 cp s3://bucket/shards/tasks/t1-{KEY}/train-000000.tar -"
    assert join_url("http://127.0.0.1:9/shards/s", rel) == f"http://127.0.0.1:9/shards/tasks/t1-{KEY}/train-000000.tar"
    assert Manifest.from_dict(manifest_with(rel), root=root).url(rel) == \
        f"pipe:cat {tmp_path}/tasks/t1-{KEY}/train-000000.tar"


def test_a_task_json_that_lists_a_shard_outside_its_folder_is_rewritten_not_reused(tmp_path):
    bench = {"name": "one", "kind": "sequence", "tasks": [BASE], "task_caps": {"base": BASE["caps"]},
             "channels": 3, "seed": 0, "shard": {"max_samples": 2000, "format": "npy"}}
    shards = tmp_path / "shards"
    m = ensure_shards(bench, shards, log=lambda _: None)
    [folder] = (shards / "tasks").iterdir()
    task_json = json.loads((folder / "task.json").read_text())
    # a tampered task.json: its train shard is a file outside the task folder, with the recorded size
    outside = tmp_path / "outside.tar"
    outside.write_bytes(b"\0" * 10240)
    info = task_json["info"]
    info["shards"]["train"] = ["../../../outside.tar"]
    info["sizes"]["../../../outside.tar"] = 10240
    info["sha256"]["../../../outside.tar"] = hashlib.sha256(outside.read_bytes()).hexdigest()
    (folder / "task.json").write_text(json.dumps(task_json))

    logged: list[str] = []
    again = ensure_shards(bench, shards, log=logged.append)

    assert again.task("base").shards == m.task("base").shards == {"train": [f"../tasks/{folder.name}/train-000000.tar"],
                                                                  "test": [f"../tasks/{folder.name}/test-000000.tar"]}
    assert any(f"{folder / 'task.json'}" in line and "'../../../outside.tar'" in line and "rewriting" in line
               for line in logged), logged
    assert outside.read_bytes() == b"\0" * 10240  # never touched


# ----------------------------------------------------------- findings 6 and 7a: one bad line costs that line only

BAD_LINES = {
    "unknown class": ({**TOPS, "name": "odd", "classes": ["Shirt", "Spaceship"]}, "unknown class 'Spaceship'"),
    "caps not a mapping": ({**TOPS, "name": "odd", "caps": 5}, "`caps` must be a mapping"),
    "caps.train a string": ({**TOPS, "name": "odd", "caps": {"train": "abc"}},
                            "`caps.train` must be a positive whole number of samples or null (no cap), got 'abc'"),
    "caps.train a fraction": ({**TOPS, "name": "odd", "caps": {"train": 1.5}},
                              "`caps.train` must be a positive whole number of samples or null (no cap), got 1.5"),
    "caps.train zero": ({**TOPS, "name": "odd", "caps": {"train": 0}}, "`caps.train` must be a positive"),
    "classes empty": ({**TOPS, "name": "odd", "classes": []}, "`classes` must be a non-empty list"),
    "not UTF-8": (b'{"name": "odd\xff", "source": {"name": "fashion_mnist"}}', "byte 0xff at column 14 is not UTF-8"),
    "name with a trailing newline": ({**TOPS, "name": "odd\n"}, "`name` 'odd\\n' must be a string matching"),
    "unknown source": ({**TOPS, "name": "odd", "source": {"name": "nope"}}, "unknown source 'nope'"),
    "a pipe: root": ({**TOPS, "name": "odd", "source": {**FM, "root": "pipe:sh -c id"}}, "`pipe:` command"),
}


@pytest.mark.parametrize("bad", BAD_LINES.values(), ids=list(BAD_LINES))
def test_a_bad_line_is_named_by_its_number_and_left_out_and_the_others_plan(tmp_path, bad):
    line, what = bad
    cat = write_lines(tmp_path / "tasks.jsonl", [BASE, line, TOPS])

    names, problems = plan(catalogue(cat))

    assert names == ["base", "tops"]
    [problem] = problems
    assert problem.startswith(f"catalogue {cat} line 2 is malformed (") and what in problem, problem
    assert "left out, the other lines run" in problem


def test_a_bad_first_line_is_fatal_and_named(tmp_path):
    """The first line trains the backbone: the stream cannot go on without it (README, catalogue paragraph)."""
    cat = write_lines(tmp_path / "tasks.jsonl", [{**BASE, "classes": ["Spaceship"]}, TOPS])
    with pytest.raises(ConfigError, match=r"line 1 \(the initial task: it trains the backbone\) is malformed: "
                                          r"unknown class 'Spaceship'"):
        expand(catalogue(cat))


def test_a_bad_line_does_not_hold_up_the_lines_after_it_as_the_stream_grows(tmp_path):
    """What `mode=follow` does on each change of the file (`follow._replan` -> ensure_shards, here in-process):
    the bad line is named and left out each time, the lines after it, appended later too, are written."""
    cat = write_lines(tmp_path / "tasks.jsonl", [BASE, {**TOPS, "name": "odd", "classes": ["Spaceship"]}, TOPS])
    logged: list[str] = []
    m = ensure_shards(catalogue(cat), tmp_path / "shards", log=logged.append)
    assert m.task_names == ["base", "tops"]
    assert [x for x in logged if "line 2 is malformed" in x and "unknown class 'Spaceship'" in x]

    write_lines(cat, [BASE, {**TOPS, "name": "odd", "classes": ["Spaceship"]}, TOPS, {**BOOTS, "caps": 5}, BOOTS])
    logged.clear()
    m = ensure_shards(catalogue(cat), tmp_path / "shards", log=logged.append)
    assert m.task_names == ["base", "tops", "boots"]
    assert len([x for x in logged if "is malformed" in x and ("line 2" in x or "line 4" in x)]) == 2, logged


# ----------------------------------------------------------- finding 7d: finished work is lost only on proof


def kept_task(folder: Path) -> Path:
    """A trained task kept under paths.output/unlogged/ the way task_job keeps it: artifact + run.json."""
    folder.mkdir(parents=True)
    artifact = folder / "tops.safetensors"
    artifact.write_bytes(b"trained weights " * 64)
    Unlogged(artifact=str(artifact), sha256=hashlib.sha256(artifact.read_bytes()).hexdigest(), params={"task": "tops"},
             metrics={"test_acc": 0.9}, tags={}, step=1, run_id="r1", epochs=[(0, {"loss": 1.0})]).keep()
    return folder


def test_a_kept_trained_task_is_deleted_only_when_its_artifact_fails_its_sha256(tmp_path):
    # a partial run.json (a read cut short): kept, and the error names the folder
    partial = kept_task(tmp_path / "unlogged" / "tops-partial")
    record = (partial / RECORD_FILE).read_text()
    (partial / RECORD_FILE).write_text(record[: len(record) // 2])
    with pytest.raises(PipelineError, match=rf"trained task kept at {partial} cannot be read .*kept, not deleted"):
        Unlogged.load(partial)
    assert (partial / RECORD_FILE).read_text() == record[: len(record) // 2]
    assert (partial / "tops.safetensors").is_file()

    # an artifact that cannot be read (EISDIR: tests run as root, so a chmod would not stop a read): kept
    unreadable = kept_task(tmp_path / "unlogged" / "tops-eisdir")
    (unreadable / "tops.safetensors").unlink()
    (unreadable / "tops.safetensors").mkdir()
    with pytest.raises(PipelineError, match=rf"kept at {unreadable} cannot be read \(\[EISDIR\]"):
        Unlogged.load(unreadable)
    assert (unreadable / RECORD_FILE).is_file()

    # a record that tries to send a file from elsewhere: kept, refused, the file never read as the artifact
    elsewhere = kept_task(tmp_path / "unlogged" / "tops-elsewhere")
    rec = json.loads((elsewhere / RECORD_FILE).read_text())
    (elsewhere / RECORD_FILE).write_text(json.dumps({**rec, "artifact": "/etc/passwd"}))
    with pytest.raises(PipelineError, match="does not name a .safetensors artifact"):
        Unlogged.load(elsewhere)
    assert elsewhere.is_dir()

    # a readable record: loaded, artifact read from its own folder
    good = kept_task(tmp_path / "unlogged" / "tops-good")
    loaded = Unlogged.load(good)
    assert loaded is not None and loaded.artifact == str(good / "tops.safetensors")
    assert loaded.epochs == [(0, {"loss": 1.0})]

    # proof that it is bad (the bytes are not the ones trained): removed, the task trains again
    (good / "tops.safetensors").write_bytes(b"other bytes")
    assert Unlogged.load(good) is None
    assert not good.exists()
