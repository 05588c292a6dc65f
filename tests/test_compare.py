"""mode=compare on real Fashion-MNIST: 2 methods x 2 seeds on one backbone, one parent run with the per-method
metrics, normal task runs as children; a second compare trains nothing; 2 backbone seeds give 2 backbones and
paired differences vs KSM that the task runs agree with. Plus its bad input and the paired statistics."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

import run_pipeline
from pipeline.config import resolve
from pipeline.errors import PipelineError
from pipeline.compare import check_compare
from pipeline.compare_report import label, paired, summarise, time_ratios
from pipeline.identity import result_key
from pipeline.records import TaskResult

ROOT = Path(run_pipeline.__file__).resolve().parent
TINY = ["benchmark.num_tasks=3", "benchmark.caps.train=200", "benchmark.caps.test=100",
        "benchmark.initial_caps.train=600", "benchmark.initial_caps.test=200", "train.epochs=1",
        "train.backbone.epochs=2", "model.width=0.0625", "progress=false", "registry.export=false"]
COMPARE = ["mode=compare", "compare.methods=[ksm,piggyback]", "compare.seeds=[0,1]"]


def run(root: Path, *over: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={root}", *TINY, *over])
    return run_pipeline.main_from_config(cfg)


def compare_parent(root: Path, out: dict) -> tuple[MlflowClient, object, object]:
    """The store's client, the experiment and the one compare run, checked FINISHED and the one the run returned."""
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")
    (parent,) = c.search_runs([exp.experiment_id], "tags.ksm_kind = 'compare'")
    assert parent.info.run_id == out["parent_run_id"] and parent.info.status == "FINISHED"
    return c, exp, parent



@pytest.mark.slow
def test_compare_logs_one_parent_with_per_method_metrics_and_reuses_everything(tmp_path, ray_local):
    out = run(tmp_path, *COMPARE)
    c, exp, parent = compare_parent(tmp_path, out)
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


@pytest.mark.slow
def test_backbone_seeds_give_one_backbone_each_and_paired_figures_the_runs_agree_with(tmp_path, ray_local):
    """compare.backbone_seeds=[0,1] x seeds [0,1]: 2 backbone runs, 4 task runs per task and method (each on its
    backbone, by its params), and the parent's figures recomputed from the task runs' test_acc in MLflow."""
    import statistics

    out = run(tmp_path, *COMPARE, "compare.backbone_seeds=[0,1]")
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")
    bbs = c.search_runs([exp.experiment_id], "tags.ksm_kind = 'backbone'")
    assert sorted(r.data.params["seed"] for r in bbs) == ["0", "1"] and {r.info.status for r in bbs} == {"FINISHED"}
    assert len({r.data.tags["ksm_fingerprint"] for r in bbs}) == 2  # two backbones, not one trained twice
    (parent,) = c.search_runs([exp.experiment_id], "tags.ksm_kind = 'compare'")
    assert parent.data.params["backbone_seeds"] == "0,1"
    assert set(parent.data.tags["ksm_backbone_runs"].split(",")) == {r.info.run_id for r in bbs}
    kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(kids) == 2 * 2 * 2 * 2 and {r.info.status for r in kids} == {"FINISHED"}
    seed_of = {r.info.run_id: r.data.params["seed"] for r in bbs}
    acc: dict = {}
    for r in kids:
        p = r.data.params
        acc.setdefault((p["method"], seed_of[p["backbone_run_id"]], p["seed"]), []).append(r.data.metrics["test_acc"])
    for (meth, task) in {(m, t) for m in ("ksm", "piggyback") for t in ("t1", "t2")}:  # 4 runs per task and method
        assert sum(1 for r in kids if r.data.params["method"] == meth and r.data.tags["ksm_task"] == task) == 4
    assert set(acc) == {(m, b, s) for m in ("ksm", "piggyback") for b in "01" for s in "01"}
    cells = {m: [statistics.fmean(acc[(m, b, s)]) for b in "01" for s in "01"] for m in ("ksm", "piggyback")}
    metrics = parent.data.metrics
    for meth, v in cells.items():
        assert metrics[f"mean_test_acc.{meth}"] == pytest.approx(statistics.fmean(v))
        assert metrics[f"std_test_acc.{meth}"] == pytest.approx(statistics.stdev(v))
        per_bb = [statistics.fmean(v[:2]), statistics.fmean(v[2:])]
        assert metrics[f"std_backbone_test_acc.{meth}"] == pytest.approx(statistics.stdev(per_bb))
    d = [p - k for k, p in zip(cells["ksm"], cells["piggyback"])]
    assert metrics["diff_vs_ksm.piggyback"] == pytest.approx(statistics.fmean(d))
    assert metrics["std_diff_vs_ksm.piggyback"] == pytest.approx(statistics.stdev(d))
    assert metrics["above_ksm.piggyback"] == sum(x > 0 for x in d)
    assert metrics["within_spread_vs_ksm.piggyback"] == float(abs(statistics.fmean(d)) <= statistics.stdev(d))
    assert "diff_vs_ksm.ksm" not in metrics and {"backbone_test_acc.0", "backbone_test_acc.1"} <= set(metrics)
    md = Path(c.download_artifacts(parent.info.run_id, "compare/compare.md", str(tmp_path))).read_text()
    assert "2 backbones x 2 seeds" in md and "piggyback - ksm: " in md and "the spread" in md
    # the first backbone (seed 0, the run's own) is the one a plain compare uses: it is reused, nothing retrains
    again = run(tmp_path, *COMPARE)
    assert {r.status for r in again["results"].values()} == {"reused"}
    assert again["backbone_run_id"] == out["backbone_run_ids"][0]
    assert len(c.search_runs([exp.experiment_id], "tags.ksm_kind = 'backbone'")) == 2


@pytest.mark.parametrize("over, says", [
    ("compare.methods=[ksm,ksm_typo]", ["'ksm_typo' is not a method", "valid methods:", "piggyback"]),
    ("compare.seeds=[]", ["compare.seeds is empty"]),
    ("compare.methods=[]", ["compare.methods is empty"]),
    ("compare.backbone_seeds=[]", ["compare.backbone_seeds is empty"]),
    ("compare.backbone_seeds=[1,1]", ["compare.backbone_seeds=[1, 1] names a seed twice"]),
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


def test_paired_differences_and_the_within_spread_rule():
    """other - ref pair by pair: mean, sample std, pairs above, paired t; within = |mean| <= std (None: one pair)."""
    got = paired([0.70, 0.72, 0.74], [0.68, 0.71, 0.69])  # diffs -0.02, -0.01, -0.05
    assert got["diff"] == pytest.approx(-0.08 / 3) and got["pairs"] == 3 and got["above"] == 0 and got["below"] == 3
    sd = (((0.02 - 0.08 / 3) ** 2 + (0.01 - 0.08 / 3) ** 2 + (0.05 - 0.08 / 3) ** 2) / 2) ** 0.5
    assert got["diff_std"] == pytest.approx(sd) and got["t"] == pytest.approx(-0.08 / 3 / (sd / 3 ** 0.5))
    assert got["within"] is False  # |mean| 0.0267 > std 0.0208
    mixed = paired([0.70, 0.70, 0.70, 0.70], [0.71, 0.69, 0.72, 0.68])  # diffs +-: mean 0, std 0.018
    assert mixed["diff"] == pytest.approx(0) and mixed["within"] is True and mixed["above"] == 2
    one = paired([0.7], [0.75])
    assert one["diff"] == pytest.approx(0.05) and one["diff_std"] == 0 and one["within"] is None and one["t"] is None
    assert paired([0.7, 0.8], [0.7, 0.8])["t"] is None  # no spread: no t
    with pytest.raises(ValueError):
        paired([0.7], [0.7, 0.8])


def test_summarise_pairs_each_method_with_ksm_on_the_same_backbone_and_seed():
    """2 backbones x 2 seeds x 2 tasks: the per-cell means, their mean and std over the 4 cells, the std over
    backbones, and the paired differences vs KSM cell by cell (a backbone effect shared by both cancels)."""
    def res(acc):
        return TaskResult(task="t", run_id="r", status="trained", test_acc=acc, train_seconds=1.0, artifact_bytes=10.0)
    bb_effect = {0: 0.0, 1: 0.10}  # backbone 1 lifts every method by 10 points
    results = {}
    for b in (0, 1):
        for s in (0, 1):
            for t, jitter in (("t1", 0.01 * s), ("t2", -0.01 * s)):
                results[label("ksm", s, t, b)] = res(0.70 + bb_effect[b] + jitter)
                results[label("piggyback", s, t, b)] = res(0.68 + bb_effect[b] + jitter + 0.002 * s)
    rows = {r["method"]: r for r in summarise(results, ["ksm", "piggyback"], [0, 1], ["t1", "t2"], [0, 1])}
    ksm, pb = rows["ksm"], rows["piggyback"]
    assert ksm["per_seed"] == pytest.approx([0.70, 0.70, 0.80, 0.80]) and ksm["jobs"] == 8
    assert ksm["mean_test_acc"] == pytest.approx(0.75) and ksm["std_test_acc"] == pytest.approx(0.0577, abs=1e-4)
    assert ksm["std_backbone_test_acc"] == pytest.approx(0.1 / 2 ** 0.5)
    assert "diff_vs_ksm" not in ksm
    # unpaired, the 10-point backbone effect swamps a 2-point gap; paired, it cancels
    assert pb["diff_vs_ksm"] == pytest.approx(-0.019) and pb["std_diff_vs_ksm"] == pytest.approx(0.001155, abs=1e-5)
    assert pb["within_spread_vs_ksm"] == 0.0 and pb["above_ksm"] == 0 and pb["pairs"] == 4
    assert pb["std_test_acc"] > abs(pb["diff_vs_ksm"])
    # one backbone: the labels and figures a compare had before backbone seeds existed
    old = {label(m, s, t): results[label(m, s, t, 0)] for m in ("ksm", "piggyback") for s in (0, 1) for t in ("t1", "t2")}
    (k1, p1) = summarise(old, ["ksm", "piggyback"], [0, 1], ["t1", "t2"])
    assert k1["per_seed"] == pytest.approx([0.70, 0.70]) and k1["std_backbone_test_acc"] is None
    assert p1["diff_vs_ksm"] == pytest.approx(-0.019)


def test_backbone_seeds_default_to_the_runs_own_and_keep_the_compare_key():
    """compare.backbone_seeds is [${seed}] by default: one backbone, the run's own; several need trained backbones."""
    def rc(*over):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return resolve(compose("config", overrides=["paths.root=/tmp/ksm-identity", "mode=compare", *over]))
    assert rc().compare.backbone_seeds == [0] and rc("seed=3").compare.backbone_seeds == [3]
    check_compare(rc("compare.backbone_seeds=[0,1,2]"))
    weights = Path(__file__)  # any existing file: the check is about a weights file giving every seed one backbone
    with pytest.raises(PipelineError, match="loads one"):
        check_compare(rc("compare.backbone_seeds=[0,1]", f"model.weights_path={weights}"))
