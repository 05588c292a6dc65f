"""Encoded images end to end (#21): a stream whose tasks come from a folder of JPEGs and from a WebDataset corpus,
and the paper's 224-px protocol (`benchmark=fine_grained data.transform=imagenet`) on small real-image folders.

Every image is a real Fashion-MNIST test image written as a JPEG by the test (tests/data_helpers.py). Each run goes
through the documented command's path (Hydra config -> shards -> backbone -> Ray jobs -> MLflow -> registered model),
then `mode=evaluate` and the served model must agree with what the runs logged.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from data_helpers import fashion_jpegs, write_jpeg_corpus, write_jpeg_folder
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

import run_pipeline
from pipeline.data import Manifest, iter_samples

ROOT = Path(run_pipeline.__file__).resolve().parent
FINE_GRAINED = ("imagenet", "cubs", "cars", "flowers", "wikiart", "sketch")


def _finished(client: MlflowClient, kind: str) -> dict[str, mlflow.entities.Run]:
    exp = client.get_experiment_by_name("ksm").experiment_id
    runs = client.search_runs([exp], f"tags.ksm_kind = '{kind}' and attributes.status = 'FINISHED'")
    return {r.data.tags["ksm_task"]: r for r in runs}


def _served_accuracy(model_uri: str, uri: str, manifest: Manifest, task: str) -> float:
    """The registered model's accuracy on the task's stored test images, as raw uint8 arrays (one request per image
    size: one request's images are one array)."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        by_shape: dict[tuple, list[tuple[np.ndarray, int]]] = {}
        for _, image, label in iter_samples(manifest, task, "test"):
            by_shape.setdefault(image.shape, []).append((image, label))
        right = total = 0
        for rows in by_shape.values():
            images = np.stack([r[0] for r in rows])
            pred = model.predict({"task": np.array([task] * len(rows)), "image": images})
            right += int((np.asarray(pred) == np.array([r[1] for r in rows])).sum())
            total += len(rows)
        return right / total
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


# ---------------------------------------------------------------------- a catalogue of JPEG folders and a corpus
@pytest.mark.slow
def test_a_catalogue_of_a_jpeg_folder_and_a_webdataset_corpus_trains_evaluates_and_serves(tmp_path, ray_local):
    folder = write_jpeg_folder(tmp_path / "photos", [0, 2, 3, 4, 6, 9], per_class=40)
    corpus = write_jpeg_corpus(tmp_path / "corpus", [1, 5, 8], per_class=40, shards=2, json_label=True)
    urls = str(tmp_path / "corpus" / "corpus-{000000..000001}.tar")
    assert [p.name for p in corpus] == ["corpus-000000.tar", "corpus-000001.tar"]
    lines = [{"name": "base", "source": {"name": "image_folder", "root": str(folder)},
              "classes": ["c0", "c2", "c3", "c4"]},
             {"name": "shoes", "source": {"name": "webdataset", "urls": urls, "image_key": "jpg",
                                          "label_key": "json.label"}},
             {"name": "tops", "source": {"name": "image_folder", "root": str(folder)}, "classes": ["c6", "c9"]}]
    cat = tmp_path / "tasks.jsonl"
    cat.write_text("".join(json.dumps(x) + "\n" for x in lines))
    overrides = ["benchmark=catalogue", f"benchmark.path={cat}", "benchmark.caps.train=null",
                 "benchmark.caps.test=null", "model.width=0.0625", "train.epochs=2", "train.backbone.epochs=2",
                 "progress=false", f"paths.root={tmp_path}", "run_name=jpegs"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        out = run_pipeline.main_from_config(compose("config", overrides=overrides))
        ev = run_pipeline.main_from_config(compose("config", overrides=[*overrides, "mode=evaluate"]))

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    tasks = _finished(client, "task")
    assert sorted(tasks) == ["shoes", "tops"] and "base" in _finished(client, "backbone")
    manifest = Manifest.load(next((tmp_path / "data" / "shards").rglob("manifest.json")))
    # the JPEGs were stored as they are: the stored format says so, and the corpus task holds its 3 json labels
    assert {manifest.task(t).image_format for t in ("base", "shoes", "tops")} == {"source"}
    assert manifest.task("shoes").class_names == ["c1", "c5", "c8"]
    assert sum(manifest.task("shoes").counts.values()) == 120
    # mode=evaluate: every task out of one network scores what it logged, the backbone untouched
    rows = {r["task"]: r for r in ev["rows"]}
    assert sorted(rows) == ["base", "shoes", "tops"] and ev["backbone_unchanged"] and ev["max_abs_delta"] == 0.0
    for t in ("shoes", "tops"):
        assert rows[t]["acc"] == tasks[t].data.metrics["test_acc"], t
        chance = 1 / len(manifest.task(t).class_names)  # trousers, sandals, bags; shirts, boots: learnt (0.62, 0.75)
        assert tasks[t].data.metrics["test_acc"] > chance + 0.1, t
    # the registered model answers raw uint8 images of the stored size with the logged accuracy
    for t in ("shoes", "tops"):
        assert _served_accuracy("models:/jpegs/1", uri, manifest, t) == tasks[t].data.metrics["test_acc"], t
    assert out["parent_run_id"] == ev["parent_run_id"]


# ----------------------------------------------------------------------- the paper's protocol on small folders
def _mixed_size_folder(root: Path, classes: list[int], per_class: int, *, own_split: bool) -> Path:
    """Real Fashion-MNIST JPEGs whose sizes differ within a class (56-120 px), as <root>/<class>/ or, with
    ``own_split``, <root>/{train,test}/<class>/ (the layout Piggyback's and CPG's datasets come in)."""
    for label in classes:
        images = [data for size in (56, 88, 120) for _, data in fashion_jpegs([label], per_class // 3, size,
                                                                                offset=size)]
        for n, data in enumerate(images):
            split = ("test" if n % 3 == 0 else "train") if own_split else ""
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{n:04d}.jpg").write_bytes(data)
    return root


@pytest.mark.slow
@pytest.mark.own_processes
def test_the_fine_grained_protocol_runs_at_224_px_from_the_documented_command(tmp_path):
    """`benchmark=fine_grained data.transform=imagenet model=... model.weights_path=... train=paper` as the README
    gives it, the roots pointing at small real-image folders of mixed sizes; resnet18 and one short epoch stand in
    for resnet50 and the paper's schedule. Real driver processes (run, then mode=evaluate), one CPU each: one Ray
    worker to boot (it imports torch, MLflow and the pipeline), and a 2-core machine has no core to spare anyway."""
    import torchvision

    roots = {name: _mixed_size_folder(tmp_path / name, [2 * i % 10, (2 * i + 1) % 10], per_class=9,
                                      own_split=name == "cubs") for i, name in enumerate(FINE_GRAINED)}
    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)  # a 1000-class state_dict
    argv = [sys.executable, str(ROOT / "run_pipeline.py"), "benchmark=fine_grained", "data.transform=imagenet",
            "model=resnet18", f"model.weights_path={weights}", "train=paper", "train.epochs=1",
            "train.batch_size=8", "progress=false", "cluster.num_cpus=1", f"paths.root={tmp_path}",
            *(f"benchmark.roots.{k}={v}" for k, v in roots.items())]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    for extra in ([], ["mode=evaluate"]):
        proc = subprocess.Popen([*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        print(log[-2500:])  # shown when the test fails: the driver's table and timings
        assert proc.returncode == 0, log[-4000:]

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    tasks = _finished(client, "task")
    assert sorted(tasks) == sorted(FINE_GRAINED[1:])
    assert "imagenet" in _finished(client, "backbone")
    for t, run in tasks.items():
        assert run.data.params["method"] == "ksm" and run.data.params["epochs"] == "1", t
        assert run.data.params["transform"] == "imagenet", t
    manifest = Manifest.load(next((tmp_path / "data" / "shards").rglob("manifest.json")))
    cubs = manifest.task("cubs")
    assert cubs.image_format == "source" and not cubs.uniform_shape  # JPEGs kept, of several sizes
    assert cubs.counts == {"train": 12, "test": 6}  # its own train/test folders (every 3rd image), not a re-split
    # mode=evaluate logged one evaluation: every task out of one network, as it scored when trained
    exp = client.get_experiment_by_name("ksm").experiment_id
    evaluation = client.search_runs([exp], "tags.ksm_kind = 'evaluation'")[0]
    assert evaluation.data.metrics["max_abs_delta"] == 0.0 and evaluation.data.metrics["backbone_unchanged"] == 1.0
    for t, run in tasks.items():
        assert evaluation.data.metrics[f"test_acc.{t}"] == run.data.metrics["test_acc"], t
    # the served model resizes and centre-crops raw images of any size as the loader's test transform did
    for t in ("cubs", "sketch"):
        assert _served_accuracy("models:/fine_grained-ksm/1", uri, manifest, t) == tasks[t].data.metrics["test_acc"]
