"""mode=compare on real Fashion-MNIST: 2 methods x 2 seeds on one backbone, one parent run with the per-method
metrics, normal task runs as children; a second compare trains nothing. Plus its bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

import run_pipeline
from pipeline.config import resolve
from pipeline.errors import PipelineError
from pipeline.compare import time_ratios
from pipeline.identity import result_key

ROOT = Path(run_pipeline.__file__).resolve().parent
TINY = ["benchmark.num_tasks=3", "benchmark.caps.train=200", "benchmark.caps.test=100",
        "benchmark.initial_caps.train=600", "benchmark.initial_caps.test=200", "train.epochs=1",
        "train.backbone.epochs=2", "model.width=0.0625", "progress=false", "registry.export=false"]
COMPARE = ["mode=compare", "compare.methods=[ksm,piggyback]", "compare.seeds=[0,1]"]


def run(root: Path, *over: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={root}", *TINY, *over])
    return run_pipeline.main_from_config(cfg)



@pytest.mark.slow
def test_compare_logs_one_parent_with_per_method_metrics_and_reuses_everything(tmp_path, ray_local):
    out = run(tmp_path, *COMPARE)
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")
    (parent,) = c.search_runs([exp.experiment_id], "tags.ksm_kind = 'compare'")
    assert parent.info.run_id == out["parent_run_id"] and parent.info.status == "FINISHED"
    metrics = parent.data.metrics
    for meth in ("ksm", "piggyback"):
        for k in ("mean_test_acc", "std_test_acc", "task_seconds", "artifact_bytes", "at_chance"):
            assert f"{k}.{meth}" in metrics, k
        row = next(r for r in out["rows"] if r["method"] == meth)
        assert metrics[f"mean_test_acc.{meth}"] == pytest.approx(sum(row["per_seed"]) / 2)
        assert 0.3 < metrics[f"mean_test_acc.{meth}"] <= 1 and metrics[f"task_seconds.{meth}"] > 0
        # the per-method count of task runs at chance is the count of its children tagged so (#22)
        assert metrics[f"at_chance.{meth}"] == row["at_chance"] == sum(
            1 for label, r in out["results"].items() if label.startswith(f"{meth}/") and r.warning == "chance_level")
    # the children are ordinary task runs: one per method x seed x task, each with its method's own params
    kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(kids) == 2 * 2 * 2 and {r.info.status for r in kids} == {"FINISHED"}
    assert {(r.data.params["method"], r.data.params["seed"], r.data.tags["ksm_task"]) for r in kids} == {
        (m, s, t) for m in ("ksm", "piggyback") for s in ("0", "1") for t in ("t1", "t2")}
    assert all(("T" in r.data.params) == (r.data.params["method"] == "ksm") for r in kids)
    assert len(c.search_runs([exp.experiment_id], "tags.ksm_kind = 'backbone'")) == 1  # one shared backbone
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "compare")}
    assert arts == {"compare/compare.md", "compare/compare.csv", "compare/compare.png"}
    md = Path(c.download_artifacts(parent.info.run_id, "compare/compare.md", str(tmp_path))).read_text()
    assert "ksm" in md and "piggyback" in md and "± " in md and "| at chance |" in md
    assert "s/task ksm / piggyback: " in md and metrics["time_ratio.ksm_vs_piggyback"] > 0

    again = run(tmp_path, *COMPARE)  # the same compare: every result is reused, nothing trains
    assert {r.status for r in again["results"].values()} == {"reused"}
    assert again["parent_run_id"] == out["parent_run_id"]
    assert len(c.search_runs([exp.experiment_id], "tags.ksm_kind = 'task'")) == 8
    assert [r["mean_test_acc"] for r in again["rows"]] == [r["mean_test_acc"] for r in out["rows"]]


@pytest.mark.parametrize("over, says", [
    ("compare.methods=[ksm,ksm_typo]", ["'ksm_typo' is not a method", "valid methods:", "piggyback"]),
    ("compare.seeds=[]", ["compare.seeds is empty"]),
    ("compare.methods=[]", ["compare.methods is empty"]),
])
def test_bad_compare_input_is_refused_before_any_work(tmp_path, over, says):
    with pytest.raises(PipelineError) as e:
        run(tmp_path, "mode=compare", over)
    for part in says:
        assert part in str(e.value)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data").exists()  # nothing started


def test_new_train_settings_at_their_defaults_keep_every_result_key():
    """train.compile=false and train.backbone.workers=1 are left out of the identity, so the results made before
    those settings existed are found again; turning one on is another result. train.pin_memory changes when a
    batch is copied, never a number: left out either way."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        base = resolve(compose("config", overrides=["paths.root=/tmp/ksm-identity"]))
        on = resolve(compose("config", overrides=["paths.root=/tmp/ksm-identity", "train.compile=true"]))
        unpinned = resolve(compose("config", overrides=["paths.root=/tmp/ksm-identity", "train.pin_memory=false"]))
    assert "compile" not in base.train_identity() and "workers" not in base.train_identity()["backbone"]
    assert on.train_identity()["compile"] is True
    assert result_key(base, "fp", "task") != result_key(on, "fp", "task")
    assert base.train.pin_memory is True and unpinned.train.to_core().pin_memory is False
    assert "pin_memory" not in base.train_identity() and result_key(base, "fp", "task") == result_key(unpinned, "fp", "task")


def test_the_head_refit_is_a_result_but_the_chance_detector_is_not():
    """train.head_refit changes the trained head, so it is part of a result's key (train=paper leaves it out at
    false, so results made before it existed keep their keys); train.chance_margin and train.retrain_at_chance
    only flag or retry a result, so they leave its key alone."""
    def rc(*over):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return resolve(compose("config", overrides=["paths.root=/tmp/ksm-identity", *over]))
    base, paper = rc(), rc("train=paper")
    assert base.train.head_refit is True and base.train.to_core().head_refit is True
    assert paper.train.head_refit is False and "head_refit" not in paper.train_identity()
    assert result_key(base, "fp", "t") != result_key(rc("train.head_refit=false"), "fp", "t")
    assert result_key(base, "fp", "t") == result_key(rc("train.chance_margin=0.2", "train.retrain_at_chance=true"),
                                                     "fp", "t")


def test_the_data_transform_at_its_default_keeps_every_result_key():
    """data.transform=cifar (the default) is left out of the identity: a result made before the imagenet protocol
    existed keeps its key (the hash of the old data section, written out here); imagenet is another result."""
    from pipeline.config import stable_hash

    def rc(*over):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return resolve(compose("config", overrides=["paths.root=/tmp/ksm-identity", *over]))
    base, imagenet = rc(), rc("data.transform=imagenet", "model=resnet18")
    old = stable_hash({"backbone": "fp", "task": "t", "method": base.section("method"), "train": base.train_identity(),
                       "data_opts": {"holdout": 0.0, "on_corrupt": "fail", "shuffle_buffer": 1000}, "seed": 0})
    assert base.data.transform == "cifar" and result_key(base, "fp", "t") == old
    assert imagenet.data_identity()["transform"] == "imagenet"
    assert result_key(rc("data.transform=imagenet"), "fp", "t") != old


def test_time_ratios_compare_like_with_like_per_seed():
    """KSM vs Piggyback and each method vs fine-tune, as the mean of the per-seed ratios with their range."""
    rows = [{"method": "ksm", "per_seed_seconds": [11.0, 12.0]}, {"method": "piggyback", "per_seed_seconds": [10.0, 12.0]},
            {"method": "finetune", "per_seed_seconds": [10.0, 10.0]}]
    got = time_ratios(rows)
    assert list(got) == ["ksm / piggyback", "ksm / finetune", "piggyback / finetune"]
    assert got["ksm / piggyback"] == pytest.approx((1.05, 1.0, 1.1))
    assert got["ksm / finetune"] == pytest.approx((1.15, 1.1, 1.2))
    assert time_ratios([rows[0]]) == {}
