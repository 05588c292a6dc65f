"""method=packnet / method=cpg through the real entry point (issue #28, phase 2): the stream as one chain of Ray
jobs (pipeline/chain.py), on real Fashion-MNIST (the tiny stream: t0 trains the backbone, t1 and t2 are new).

Per method: one FINISHED task run per link (t0 = the backbone pruned and retrained, then t1, t2), each with the chain
after it as an artifact whose size is the logged one, each trained on the chain the link before it left;
``mode=evaluate`` re-checks every task on the LAST link's chain and finds the logged accuracies (no forgetting); a
rerun trains nothing. The two methods share one folder: the shards and the backbone are made once."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

import run_pipeline
from ksm_core.cpg import CPG
from ksm_core.packnet import PackNet

ROOT = Path(run_pipeline.__file__).resolve().parent
TINY = ["benchmark.num_tasks=3", "benchmark.caps.train=300", "benchmark.caps.test=100",
        "benchmark.initial_caps.train=800", "benchmark.initial_caps.test=200", "train.epochs=2",
        "train.backbone.epochs=2", "model.width=0.0625", "progress=false", "registry.export=false"]
# CPG: two gradual steps instead of ten (theirs: 0.1 .. 0.95), and allow_loss as tests/test_cpg.py has it: on 100
# test images a pruned task rarely matches its own unpruned accuracy, and one that prunes nothing starves the next
METHODS = {"packnet": ["method=packnet"],
           "cpg": ["method=cpg", "method.prune=0.5", "method.step=0.25", "method.allow_loss=0.05"]}
CLASSES = {"packnet": PackNet, "cpg": CPG}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("chain")


def run(root: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"paths.root={root}", *overrides])
    return run_pipeline.main_from_config(cfg)


def task_runs(c: MlflowClient, key: str) -> list:
    exp = c.get_experiment_by_name("ksm")
    return c.search_runs([exp.experiment_id], f"tags.ksm_kind = 'task' and tags.ksm_sequence = '{key}'",
                         max_results=100)


@pytest.mark.parametrize("method", ["packnet", "cpg"])
def test_chain_runs_evaluates_without_forgetting_and_resumes(method, root, ray_local, tmp_path):
    out = run(root, *METHODS[method])
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = {r.data.tags["ksm_task"]: r for r in task_runs(c, out["sequence_key"])}
    assert sorted(runs) == ["t0", "t1", "t2"] and [r.task for r in out["results"]] == ["t0", "t1", "t2"]
    assert all(r.status == "trained" for r in out["results"])
    parent = c.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["chain_wall_seconds"] > 0

    before = out["fingerprint"]  # link 0 trains on the backbone itself
    keys = set()
    for i, t in enumerate(["t0", "t1", "t2"]):
        r = runs[t]
        tags, m = r.data.tags, r.data.metrics
        assert r.info.status == "FINISHED" and tags["mlflow.parentRunId"] == out["parent_run_id"]
        assert tags["ksm_chain_link"] == str(i) and tags["ksm_chain_parent"] == before and r.data.params["method"] == method
        before = tags["ksm_chain_fingerprint"]
        keys.add(tags["ksm_result"])
        path = c.download_artifacts(r.info.run_id, "chain/chain.safetensors", str(tmp_path / t))
        assert os.path.getsize(path) == m["artifact_bytes"]
        meta = CLASSES[method].read_chain_metadata(path)
        assert [x["task_name"] for x in meta["tasks"]] == ["t0", "t1", "t2"][:i + 1]
        assert meta["fingerprint"] == tags["ksm_chain_fingerprint"]
        # the papers' count: ownership (and CPG's pick) bits + BN + head, far below the chain file
        assert 0 < m["task_bytes"] == meta["tasks"][i]["task_bytes"] < m["artifact_bytes"]
        assert m["train_seconds"] > 0 and 0.6 <= m["test_acc"] <= 1.0  # 2 classes: chance 0.5
        if method == "cpg":
            assert m["model_growth"] == 0.0
    assert len(keys) == 3

    ev = run(root, *METHODS[method], "mode=evaluate")
    assert [r["task"] for r in ev["rows"]] == ["t0", "t1", "t2"]
    for row in ev["rows"]:  # every task on the last link's chain: as accurate as when it was trained
        assert row["logged_acc"] == runs[row["task"]].data.metrics["test_acc"]
        assert row["acc"] == pytest.approx(row["logged_acc"], abs=1e-9)
    assert ev["max_abs_delta"] == pytest.approx(0.0, abs=1e-9)

    again = run(root, *METHODS[method])
    assert [r.status for r in again["results"]] == ["reused"] * 3
    assert [r.run_id for r in again["results"]] == [runs[t].info.run_id for t in ("t0", "t1", "t2")]
    assert len(task_runs(c, out["sequence_key"])) == 3


@pytest.mark.parametrize("method", ["packnet", "cpg"])
def test_the_chain_is_served_as_one_registered_model_with_its_logged_accuracies(method, root, ray_local):
    """registry.export at the end of a chain registers its tasks as ONE model (the last link's chain file, which
    holds them all, plus the backbone: safetensors and JSON, nothing pickled); loaded through the Model Registry
    it answers every real test image of every link, rows of different tasks mixed, with the accuracy the link's
    run logged. mode=export registers the same chain again as the next version."""
    import mlflow
    import numpy as np

    from pipeline.data import Manifest, iter_samples

    out = run(root, *METHODS[method], "registry.export=true")  # the chain of the test above, reused (or trained)
    name, uri = f"split_fashion_mnist-{method}", f"sqlite:///{root}/mlflow.db"
    c = MlflowClient(uri, registry_uri=uri)  # no process-wide URI is set: the next test's client sees its own store
    assert [str(v.version) for v in c.search_model_versions(f"name = '{name}'")] == ["1"]
    m = next(x for x in map(Manifest.load, (root / "data" / "shards").rglob("manifest.json"))
             if x.new_tasks == ["t1", "t2"])
    names, images, labels = [], [], []
    for t in ["t0", "t1", "t2"]:
        for _, image, label in iter_samples(m, t, "test"):
            names.append(t), images.append(image), labels.append(label)
    order = np.random.default_rng(0).permutation(len(names))
    names, images, labels = np.array(names)[order], np.stack(images)[order], np.array(labels)[order]
    # the version's files, found through the registry, loaded as MLflow loads any pyfunc model
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=c.get_model_version_download_uri(name, "1"),
                                                     tracking_uri=uri))
    model = mlflow.pyfunc.load_model(str(local))
    pred = model.predict({"task": names, "image": images[..., 0]})
    for r in out["results"]:  # link 0 too: the backbone as the chain pruned and retrained it
        rows = names == r.task
        assert (pred[rows] == labels[rows]).mean() == c.get_run(r.run_id).data.metrics["test_acc"], r.task
    ours = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {f for f in ours if f.startswith("artifacts/")} == {
        "artifacts/ksm/backbone.safetensors", "artifacts/ksm/ksm_model.json", "artifacts/ksm/chain.safetensors"}
    assert not [f for f in ours if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".cloudpickle"))]
    again = run(root, *METHODS[method], "mode=export")
    assert again["version"] == 2 and again["tasks"] == ["t0", "t1", "t2"]

def test_appending_continues_the_chain_and_a_changed_task_invalidates_the_later_ones(root, ray_local, capsys):
    """A fourth task appended trains one link. A link trained again keeps its result key, and the links after it
    are reused only if it comes out bit for bit the same (their parent chain's fingerprint). A changed task (t1
    capped lower) changes its key and every later one: said in one line, trained again in order, the old runs
    tagged superseded."""
    run(root, "method=packnet")  # the 3-task chain (reused when the test above made it)
    out = run(root, "method=packnet", "benchmark.num_tasks=4")
    assert [r.status for r in out["results"]] == ["reused"] * 3 + ["trained"]
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")

    def on_its_parent(results) -> None:  # every link's run was trained on the chain the run before it left
        runs = [c.get_run(r.run_id).data.tags for r in results]
        assert all(b["ksm_chain_parent"] == a["ksm_chain_fingerprint"] for a, b in zip(runs, runs[1:]))

    c.delete_run(out["results"][1].run_id)
    again = run(root, "method=packnet", "benchmark.num_tasks=4")
    assert [r.status for r in again["results"]][:2] == ["reused", "trained"]
    on_its_parent(again["results"])

    capsys.readouterr()
    changed = ["method=packnet", "benchmark.num_tasks=4", "benchmark.task_caps={t1: {train: 250}}"]
    out = run(root, *changed)
    said = capsys.readouterr().out
    assert [r.status for r in out["results"]] == ["reused", "trained", "trained", "trained"]
    on_its_parent(out["results"])
    assert ("1 of 4 link(s) reused; t1 (changed since its last run)" in said
            and "invalidates 2 later task(s) trained before: t2, t3" in said), said
    for r in again["results"][1:]:
        assert c.get_run(r.run_id).data.tags["ksm_superseded"] == "true"
    ev = run(root, *changed, "mode=evaluate")
    assert [r["task"] for r in ev["rows"]] == ["t0", "t1", "t2", "t3"]
    assert ev["max_abs_delta"] == pytest.approx(0.0, abs=1e-9)


def test_a_link_at_chance_is_named_and_with_retrain_at_chance_trained_once_more(root, ray_local, capsys):
    """A link that ends at chance is tagged as a mask task is (ksm_warning) and named by the stream's report, never
    averaged away; train.retrain_at_chance trains it once more from the same chain with the mask tasks' other seed
    (tag ksm_retrained, param retrain_seed, metric first_test_acc), and the chain stays whole. No step can learn at
    these rates and the head is not refit, so the new tasks end near chance: 0.5 for 2 classes, flagged up to 0.95."""
    frozen = ["method=packnet", "train.lr_finetune=1e-12", "train.lr_mask=1e-12", "train.lr_head=1e-12",
              "train.head_refit=false", "train.chance_margin=0.45"]
    capsys.readouterr()
    out = run(root, *frozen, "train.retrain_at_chance=true")
    said = capsys.readouterr().out
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = [c.get_run(r.run_id) for r in out["results"]]
    assert [r.data.tags["ksm_task"] for r in runs] == ["t0", "t1", "t2"]
    assert all(b.data.tags["ksm_chain_parent"] == a.data.tags["ksm_chain_fingerprint"] for a, b in zip(runs, runs[1:]))
    for r in runs[1:]:
        tags, m = r.data.tags, r.data.metrics
        assert m["test_acc"] <= 0.95 and 0.0 <= m["first_test_acc"] <= 0.95
        assert tags["ksm_warning"] == tags["ksm_retrained"] == "chance_level"
        assert r.data.params["retrain_seed"] == "7919"  # jobs.retrain_seed(0): the same as a mask task's
        assert f"  {tags['ksm_task']}: test acc {m['test_acc']:.3f} (after a retrain)" in said, said
    assert "task(s) ended at chance level" in said
    ev = run(root, *frozen, "mode=evaluate")  # the retrained links are the chain's: nothing forgotten
    assert ev["max_abs_delta"] == pytest.approx(0.0, abs=1e-9)


def config(*overrides: str):
    from pipeline.config import resolve

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return resolve(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("overrides, says", [
    (["method=packnet", "method.tau=0.1"], "method.tau=0.1: method=packnet does not use it"),
    (["method=packnet", "method.step=0.2"], "method.step=0.2: method=packnet does not use it"),
    (["method=ksm", "method.prune=0.3"], "method.prune=0.3 is a setting of the sequential methods"),
    (["method=packnet", "method.prune=1.0"], "method.prune=1.0 must be a number in (0, 1)"),
    (["method=cpg", "method.step=0.99"], "method.step=0.99 must be a number in (0, method.prune=0.95]"),
    (["method=cpg", "method.allow_loss=-1"], "method.allow_loss=-1.0 must be a number in [0, 1]"),
    (["method=cpg", "method.retrain_epochs=-1"], "method.retrain_epochs=-1 must be an int >= 0"),
    (["method=cpg", "train.weight_decay=1e-4"], "train.weight_decay=0.0001: method=cpg needs 0"),
    (["method=packnet", "mode=tune"], "mode=tune does not take method=packnet yet"),
    (["method=cpg", "mode=follow"], "mode=follow does not take method=cpg yet"),
    (["method.name=pack"], "finetune, packnet, cpg (e.g. method=ksm)"),
])
def test_config_names_the_key_and_the_fix(overrides, says):
    from pipeline.validation import validate
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError) as e:
        validate(config(*overrides))
    assert says in str(e.value)


def test_sequential_settings_stay_out_of_a_mask_methods_keys_and_are_logged():
    """MethodCfg's sequential settings are null for a mask method and then left out of the hashed section: the
    result and stream keys of every mask method are the ones they were before these settings existed."""
    from pipeline.params import method_params

    ksm = config()
    assert ksm.section("method") == {"name": "ksm", "tau": 5e-3, "k": 1200.0, "T": 100.0, "init": 1e-2}
    pn, cpg = config("method=packnet"), config("method=cpg")
    assert pn.section("method")["prune"] == 0.5 and "step" not in pn.section("method")
    assert method_params(pn.method, pn.train) == {"method": "packnet", "prune": 0.5, "retrain_epochs": "default",
                                                  "lr_finetune": 1e-3, "lr_mask": 1e-3, "lr_head": 1e-3}
    assert method_params(cpg.method, cpg.train)["step"] == 0.1 and cpg.method.chain_settings()["allow_loss"] == 0.0
