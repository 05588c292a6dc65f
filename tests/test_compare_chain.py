"""mode=compare with the sequential baselines beside a mask method (issue #28, item 4): KSM fans out, PackNet and
CPG each run as one chain (link 0 = the initial task, then t1, t2) on the same backbone, under the compare's parent
run, on the tiny real Fashion-MNIST stream. The table's rows and the parent's metrics (accuracy, s/task, bytes per
task, a chain's whole time, CPG's growth) are recomputed from the task runs; link 0 is in none of the means; a
rerun trains nothing. Plus the summary's arithmetic and the config's answers, without Ray."""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.compare import check_compare, method_settings
from pipeline.compare_report import label, summarise, time_ratios
from pipeline.config import MethodCfg, resolve
from pipeline.validation import validate
from pipeline.errors import PipelineError
from pipeline.records import TaskResult

from test_compare import ROOT, compare_parent, run  # the same tiny stream and in-process driver as the mask methods' compare
# the run's method is CPG, so the compare trains CPG with these settings and KSM and PackNet with their reference
# ones: one pruning step, not ten, always kept (allow_loss 1: on 100 test images a task that kept every weight would
# leave the next none; tests/test_chain.py checks CPG's own choice)
COMPARE = ["mode=compare", "compare.methods=[ksm,packnet,cpg]", "compare.seeds=[0]", "method=cpg",
           "method.prune=0.5", "method.step=0.5", "method.allow_loss=1.0"]


def config(*over: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return resolve(compose("config", overrides=["paths.root=/tmp/ksm-identity", *over]))


@pytest.mark.slow
def test_compare_runs_each_chain_beside_the_fan_out_and_reuses_it(tmp_path, ray_local):
    out = run(tmp_path, *COMPARE)
    c, exp, parent = compare_parent(tmp_path, out)
    kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # KSM: t1, t2; each chain: t0 (link 0), t1, t2; all on the one backbone
    assert sorted((r.data.params["method"], r.data.tags["ksm_task"]) for r in kids) == sorted(
        [("ksm", "t1"), ("ksm", "t2")] + [(m, t) for m in ("packnet", "cpg") for t in ("t0", "t1", "t2")])
    assert {r.info.status for r in kids} == {"FINISHED"}
    assert len({r.data.params["backbone_run_id"] for r in kids}) == 1
    seqs = {r.data.params["method"]: r.data.tags["ksm_sequence"] for r in kids}
    assert len(set(seqs.values())) == 3  # each chain under a sequence key of its own, apart from the fan-out's
    runs = {(r.data.params["method"], r.data.tags["ksm_task"]): r for r in kids}
    assert out["results"][label("packnet", 0, "t0")].run_id == runs[("packnet", "t0")].info.run_id

    metrics, rows = parent.data.metrics, {r["method"]: r for r in out["rows"]}
    new = ("t1", "t2")
    for meth in ("ksm", "packnet", "cpg"):
        m = {t: runs[(meth, t)].data.metrics for t in new}
        # accuracy and s/task over the NEW tasks only: a chain's link 0 (t0) is in neither
        assert metrics[f"mean_test_acc.{meth}"] == pytest.approx(statistics.fmean(m[t]["test_acc"] for t in new))
        assert metrics[f"task_seconds.{meth}"] == pytest.approx(statistics.fmean(m[t]["train_seconds"] for t in new))
        assert rows[meth]["jobs"] == 2 and 0.5 <= metrics[f"mean_test_acc.{meth}"] <= 1
        # bytes per task: the mask method's artifact, a chain's task_bytes (the papers' count, not its chain file)
        want = "artifact_bytes" if meth == "ksm" else "task_bytes"
        assert metrics[f"bytes_per_task.{meth}"] == pytest.approx(statistics.fmean(m[t][want] for t in new))
    for meth in ("packnet", "cpg"):
        chain = {t: runs[(meth, t)].data.metrics for t in ("t0", *new)}
        assert metrics[f"bytes_per_task.{meth}"] < metrics[f"artifact_bytes.{meth}"]
        # a chain's whole time: its links' job seconds added up, link 0 included; link 0's training on its own
        assert metrics[f"chain_wall_seconds.{meth}"] == pytest.approx(sum(x["job_seconds"] for x in chain.values()))
        assert metrics[f"initial_task_seconds.{meth}"] == pytest.approx(chain["t0"]["train_seconds"])
        assert metrics[f"time_ratio.{meth}_vs_ksm"] > 0 and rows[meth]["runs_as"] == "chain"
    assert metrics["model_growth.cpg"] == 0 and "model_growth.packnet" not in metrics
    assert "chain_wall_seconds.ksm" not in metrics and rows["ksm"]["runs_as"] == "fan-out"
    md = Path(c.download_artifacts(parent.info.run_id, "compare/compare.md", str(tmp_path))).read_text()
    assert "chain (serial)" in md and "fan-out (parallel)" in md and "| model growth |" in md
    assert "link 0" in md and "s/task cpg / ksm: " in md

    again = run(tmp_path, *COMPARE)  # the same compare: the fan-out's results and both chains are reused
    assert {r.status for r in again["results"].values()} == {"reused"} and len(again["results"]) == 8
    assert again["parent_run_id"] == out["parent_run_id"]
    assert len(c.search_runs([exp.experiment_id], "tags.ksm_kind = 'task'")) == 8
    assert [r["mean_test_acc"] for r in again["rows"]] == [r["mean_test_acc"] for r in out["rows"]]
    assert c.get_run(parent.info.run_id).data.metrics["chain_wall_seconds.cpg"] == metrics["chain_wall_seconds.cpg"]


def test_summarise_leaves_link_0_out_of_a_chains_means_and_counts_its_bytes_and_time():
    """Link 0 (the initial task t0) at accuracy 0 and 100 s would move every mean it joined: it joins only the
    chain's whole time. A chain's bytes are its links' task_bytes; CPG's growth is the links' mean."""
    def res(acc, secs, art):
        return TaskResult(task="t", run_id="r", status="trained", test_acc=acc, train_seconds=secs,
                          artifact_bytes=art)
    results, links = {}, {}
    for t, acc in (("t1", 0.8), ("t2", 0.9)):
        results[label("ksm", 0, t)] = res(acc, 2.0, 100.0)
        results[label("cpg", 0, t)] = res(acc - 0.1, 10.0, 5000.0)
        links[label("cpg", 0, t)] = {"task_bytes": 40.0, "job_seconds": 12.0, "model_growth": 0.0}
    results[label("cpg", 0, "t0")] = res(0.0, 100.0, 4000.0)
    links[label("cpg", 0, "t0")] = {"task_bytes": 999.0, "job_seconds": 101.0, "model_growth": 0.0}
    ksm, cpg = summarise(results, ["ksm", "cpg"], [0], ["t1", "t2"], links=links, initial="t0")
    assert cpg["mean_test_acc"] == pytest.approx(0.75) and cpg["task_seconds"] == 10.0 and cpg["jobs"] == 2
    assert cpg["bytes_per_task"] == 40.0 and cpg["artifact_bytes"] == 5000.0 and cpg["runs_as"] == "chain"
    assert cpg["chain_wall_seconds"] == 125.0 and cpg["initial_task_seconds"] == 100.0 and cpg["model_growth"] == 0
    assert cpg["diff_vs_ksm"] == pytest.approx(-0.1)
    assert ksm["bytes_per_task"] == 100.0 and ksm["runs_as"] == "fan-out" and ksm["chain_wall_seconds"] is None
    assert list(time_ratios([ksm, cpg])) == ["cpg / ksm"] and time_ratios([ksm, cpg])["cpg / ksm"][0] == 5.0


def test_compare_takes_packnet_and_cpg_at_the_settings_method_composes():
    """In compare.methods they are checked like the mask methods; a sequential method not the run's own is trained
    at configs/method/<name>.yaml's settings (the same result keys as `method=<name>` in mode=sequence), and the
    run's own at its settings."""
    rc = config("mode=compare", "compare.methods=[ksm,packnet,cpg]")
    check_compare(rc)
    validate(rc)
    assert method_settings(rc, "packnet") == config("method=packnet").method == MethodCfg.reference("packnet")
    assert method_settings(rc, "cpg") == config("method=cpg").method
    own = config("mode=compare", "compare.methods=[ksm,cpg]", "method=cpg", "method.allow_loss=0.01")
    validate(own)
    assert method_settings(own, "cpg").allow_loss == 0.01
    with pytest.raises(PipelineError, match=r"compare.methods: 'pnet' is not a method; valid methods: .*packnet, cpg"):
        check_compare(config("mode=compare", "compare.methods=[ksm,pnet]"))
    with pytest.raises(PipelineError) as e:
        check_compare(config("mode=compare", "compare.methods=[ksm,packnet]", "train.weight_decay=1e-4"))
    assert "train.weight_decay=0.0001: compare.methods has packnet" in str(e.value)
    assert "set train.weight_decay=0" in str(e.value)


@pytest.mark.parametrize("mode", ["tune", "follow"])
def test_the_modes_that_still_build_ksmnet_tasks_refuse_a_sequential_method(mode):
    with pytest.raises(PipelineError) as e:
        validate(config("method=packnet", f"mode={mode}"))
    assert f"mode={mode} does not take method=packnet yet" in str(e.value) and "use mode=sequence" in str(e.value)
