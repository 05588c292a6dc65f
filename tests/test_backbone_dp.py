"""The backbone trained data-parallel with Ray Train (train.backbone.workers=2: DDP over gloo on this CPU), on real
Fashion-MNIST, then the tasks on top of it as usual; read back from MLflow."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

import run_pipeline
from pipeline.data import ensure_shards, load_benchmark_config, make_loader

ROOT = Path(run_pipeline.__file__).resolve().parent
TINY = ["train.epochs=1", "train.backbone.epochs=2", "model.width=0.0625", "progress=false", "cluster.num_cpus=2",
        "benchmark.num_tasks=2", "benchmark.caps.train=200", "benchmark.caps.test=100",
        "benchmark.initial_caps.train=601", "benchmark.initial_caps.test=200", "registry.export=false"]


def test_each_rank_reads_its_own_rows_and_every_rank_the_same_count(tmp_path):
    bench = {**load_benchmark_config("split_fashion_mnist"), "num_tasks": 2, "caps": {"train": 101, "test": 20}}
    m = ensure_shards(bench, tmp_path, log=lambda _: None)
    ranks = [make_loader(m, "t1", "train", batch_size=16, rank=r, world=3, train=False) for r in range(3)]
    ys = [[int(v) for _, y in loader for v in y] for loader in ranks]
    assert [len(y) for y in ys] == [33, 33, 33] == [loader.num_samples for loader in ranks]
    everything = [int(v) for _, y in make_loader(m, "t1", "train", batch_size=16, train=False) for v in y]
    assert sorted(sum(ys, [])) == sorted(everything[:99])  # rows 0..98 once each; row 100 (the remainder) on none


@pytest.mark.slow
def test_a_backbone_trained_by_two_ray_train_workers_carries_the_sequence(tmp_path, ray_local):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={tmp_path}", *TINY, "train.backbone.workers=2"])
    out = run_pipeline.main_from_config(cfg)
    assert [r.status for r in out["results"]] == ["trained"]
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")
    (bb,) = c.search_runs([exp.experiment_id], "tags.ksm_kind = 'backbone'")
    assert bb.info.status == "FINISHED" and bb.data.params["workers"] == "2"
    assert bb.data.tags["ksm_fingerprint"] == out["fingerprint"]
    assert bb.data.metrics["test_acc"] > 0.8  # T-shirt/top vs Trouser after 2 epochs: it did learn
    assert (tmp_path / "outputs" / "ray_train").is_dir()  # the checkpoint went through Ray Train's storage

    # the same stream with one worker is another backbone (the data-parallel batches differ): its own key
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={tmp_path}", *TINY, "run_name=one-worker"])
    single = run_pipeline.main_from_config(cfg)
    assert single["backbone_run_id"] != out["backbone_run_id"]
    one = c.get_run(single["backbone_run_id"])
    assert one.data.params["workers"] == "1"
    assert abs(one.data.metrics["test_acc"] - bb.data.metrics["test_acc"]) <= 0.02  # the bound: 2 points
