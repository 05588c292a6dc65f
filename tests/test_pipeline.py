"""The whole pipeline on real Fashion-MNIST: Hydra config -> shards -> backbone -> Ray jobs -> MLflow -> report.

Ray runs embedded (num_cpus=2) and MLflow on a sqlite file in a temp folder; everything is asserted through the
MLflow API, the way a user browsing the UI would see it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from safetensors.numpy import load_file

import run_pipeline
from ksm_core import KSMNet, load_task, read_metadata
from ksm_core.train import TrainConfig, evaluate
from pipeline.data import Manifest, make_loader
from pipeline.worker import build_backbone
from pipeline.config import ModelCfg
from pipeline.errors import PipelineError

ROOT = Path(run_pipeline.__file__).resolve().parent

# 2 new tasks (t1, t2) of 2 Fashion-MNIST classes each, a 1/16-width VGG: seconds per job on one core
TINY = ["benchmark.num_tasks=3", "benchmark.caps.train=300", "benchmark.caps.test=100",
        "benchmark.initial_caps.train=800", "benchmark.initial_caps.test=200", "train.epochs=2",
        "train.backbone.epochs=2", "model.width=0.0625", "progress=false", "train.lr_mask=1e-3", "train.lr_head=1e-3"]
TASK_PARAMS = {"method", "T", "tau", "k", "lr_mask", "lr_head", "epochs", "batch_size", "backbone_fingerprint",
               "task", "classes", "num_classes", "device"}
TASK_METRICS = {"train_loss", "train_acc", "test_acc", "train_seconds", "artifact_bytes", "mask_ones",
                "mask_soft", "mask_zeros"}


def config(root: Path, *overrides: str):
    """TINY, without registering the served model unless asked (~1-3.5 s a run; tests/test_export.py covers it)."""
    quiet = [] if any(o.startswith("registry.") for o in overrides) else ["registry.export=false"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=[*TINY, *quiet, f"paths.root={root}", *overrides])


def run(root: Path, *overrides: str) -> dict:
    return run_pipeline.main_from_config(config(root, *overrides))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ray_local and crash_dir (the session's one Ray runtime, every worker carrying tests/crash_hook.py) and
# tiny_sequence (TINY's default run, as `make run` makes it, trained once a session): tests/conftest.py
@pytest.fixture(scope="module")
def first(tiny_sequence):
    return tiny_sequence.root, tiny_sequence.out


def _client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")


def _runs(client: MlflowClient, filt: str = "", status: str | None = None):
    exp = client.get_experiment_by_name("ksm")
    runs = client.search_runs([exp.experiment_id], filter_string=filt, max_results=1000)
    return [r for r in runs if status is None or r.info.status == status]


@pytest.mark.slow
def test_end_to_end_runs_artifacts_and_report(first, tmp_path):
    root, out = first
    c = _client(root)
    parents = _runs(c, "tags.ksm_kind = 'sequence'")
    backbones = _runs(c, "tags.ksm_kind = 'backbone'")
    tasks = _runs(c, "tags.ksm_kind = 'task'")
    assert len(parents) == 1 and len(backbones) == 1 and len(tasks) == 2
    parent, bb = parents[0], backbones[0]
    assert parent.info.status == "FINISHED" and bb.info.status == "FINISHED"
    assert sorted(r.data.tags["ksm_task"] for r in tasks) == ["t1", "t2"]
    manifest = Manifest.load(next((root / "data" / "shards").rglob("manifest.json")))

    # the backbone as every job saw it: logged once, fingerprint tag = hash of its tensors
    state = load_file(c.download_artifacts(bb.info.run_id, "backbone/backbone.safetensors", str(tmp_path)))
    backbone = build_backbone(ModelCfg("vgg16_bn_cifar", width=0.0625), manifest.task("t0").num_classes, state)
    fp = bb.data.tags["ksm_fingerprint"]
    assert KSMNet.from_backbone(backbone).fingerprint() == fp == parent.data.tags["ksm_fingerprint"]

    for r in tasks:
        p, m, t = r.data.params, r.data.metrics, r.data.tags
        assert r.info.status == "FINISHED" and t["mlflow.parentRunId"] == parent.info.run_id
        assert TASK_PARAMS <= set(p) and TASK_METRICS <= set(m)
        assert p["method"] == "ksm" and float(p["T"]) == 100.0 and float(p["tau"]) == 5e-3 and p["epochs"] == "2"
        assert p["backbone_fingerprint"] == fp and t["ksm_host"] and t["ksm_node_id"] and t["ksm_device"] == "cpu"
        assert p["classes"] == ", ".join(manifest.task(t["ksm_task"]).class_names)
        assert 0.75 < m["test_acc"] <= 1.0  # chance 0.5; measured 0.90 / 0.98 at 3 epochs
        assert m["train_seconds"] > 0 and 0 < m["mask_ones"] <= 1
        layer_keys = [k for k in m if k.startswith("layer_ones.")]
        assert len(layer_keys) == 13 + 2  # the 13 convs and 2 hidden Linears of VGG16 carry masks
        # one value per epoch for the per-epoch curves
        hist = c.get_metric_history(r.info.run_id, "test_acc")
        assert len(hist) == 3 and sorted(h.step for h in hist) == [0, 1, 2]

        # the artifact: loadable by ksm_core on the logged backbone, and it reproduces the logged accuracy
        path = c.download_artifacts(r.info.run_id, f"task/{t['ksm_task']}.safetensors", str(tmp_path))
        assert os.path.getsize(path) == m["artifact_bytes"]
        assert read_metadata(path)["backbone_fingerprint"] == fp
        net = KSMNet.from_backbone(backbone)
        idx = load_task(net, path)
        loader = make_loader(manifest, t["ksm_task"], "test", batch_size=32)
        acc, _ = evaluate(net.set_task(idx), loader, TrainConfig(device="cpu"))
        assert acc == pytest.approx(m["test_acc"], abs=1e-9)

    # the report: console table returned, markdown/CSV/plots on the parent run
    names = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.csv"} <= names
    assert sum(n.endswith(".png") for n in names) == 3
    md = Path(c.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path))).read_text()
    assert "t1" in md and "t2" in md
    assert [r.task for r in out["results"]] == ["t1", "t2"]


@pytest.mark.slow
@pytest.mark.mutates_tiny_sequence
def test_resume_trains_only_the_missing_task(first):
    root, out = first
    c = _client(root)
    before = {r.data.tags["ksm_task"]: r for r in _runs(c, "tags.ksm_kind = 'task'")}
    c.delete_run(before["t2"].info.run_id)
    again = run(root)
    after = {r.data.tags["ksm_task"]: r for r in _runs(c, "tags.ksm_kind = 'task'")}
    assert len(_runs(c, "tags.ksm_kind = 'sequence'")) == 1  # the same parent run, reopened
    assert len(_runs(c, "tags.ksm_kind = 'backbone'")) == 1  # the backbone was reused, not retrained
    assert after["t1"].info.run_id == before["t1"].info.run_id  # untouched
    assert after["t1"].info.start_time == before["t1"].info.start_time
    assert after["t2"].info.run_id != before["t2"].info.run_id  # retrained, later
    assert after["t2"].info.start_time > before["t2"].info.end_time
    assert {r.task: r.status for r in again["results"]} == {"t1": "reused", "t2": "trained"}
    assert again["parent_run_id"] == out["parent_run_id"]

    # a third run finds everything finished and trains nothing
    third = run(root)
    assert {r.status for r in third["results"]} == {"reused"}
    assert len(_runs(c, "tags.ksm_kind = 'task'", "FINISHED")) == 2


@pytest.mark.slow
@pytest.mark.mutates_tiny_sequence
def test_a_worker_killed_mid_training_is_retried_once(first, crash_dir):
    root, _ = first
    (crash_dir / "armed").touch()  # the first job to finish an epoch kills its own worker (tests/crash_hook.py)
    try:
        out = run(root, "run_name=crash-test", "train.lr_head=1.1e-3")  # another result: train again, not reuse
        assert not (crash_dir / "armed").exists()  # a worker really died (`fired` holds its pid)
    finally:  # the runtime is the session's: no later test's worker may find it armed
        (crash_dir / "armed").unlink(missing_ok=True)
    killed_pid = int((crash_dir / "fired").read_text())
    c = _client(root)
    key = out["sequence_key"]
    runs = _runs(c, f"tags.ksm_kind = 'task' and tags.ksm_sequence = '{key}'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["ksm_task"] for r in finished) == ["t1", "t2"]  # exactly one per task
    dead = [r for r in runs if r.info.status != "FINISHED"]
    assert len(dead) == 1 and dead[0].info.status == "KILLED"  # the dead attempt, closed by the retry
    retried = [r for r in finished if r.data.tags["ksm_task"] == dead[0].data.tags["ksm_task"]][0]
    assert retried.data.tags["ksm_attempt"] == "2"
    # the run closed KILLED is the one the killed worker held (its claim names that pid), and the retry that
    # trained the task held it from another process
    assert dead[0].data.tags["ksm_claim_pid"] == str(killed_pid)
    assert retried.data.tags["ksm_claim_pid"] != str(killed_pid)


@pytest.mark.slow
@pytest.mark.mutates_tiny_sequence
def test_a_backbone_from_a_weights_file(first, tmp_path):
    root, _ = first
    c = _client(root)
    bb = _runs(c, "tags.ksm_kind = 'backbone'")[0]
    state = load_file(c.download_artifacts(bb.info.run_id, "backbone/backbone.safetensors", str(tmp_path)))
    weights = tmp_path / "weights.pt"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, weights)
    out = run(root, "run_name=from-file", f"model.weights_path={weights}", "benchmark.num_tasks=2")
    loaded = c.get_run(out["backbone_run_id"])
    assert loaded.data.params["weights_path"] == str(weights)
    assert out["fingerprint"] == bb.data.tags["ksm_fingerprint"]  # the same tensors, whatever their source
    assert loaded.data.metrics["test_acc"] == pytest.approx(bb.data.metrics["test_acc"])
    assert [r.task for r in out["results"]] == ["t1"]


@pytest.mark.slow
@pytest.mark.mutates_tiny_sequence
def test_a_corrupt_shard_fails_its_task_or_is_skipped_and_counted_in_mlflow(first, tmp_path):
    """data.on_corrupt: 'fail' stops only the task whose shard is bad (the others are saved, the error names the
    shard); 'skip' trains on the rest and the run says how much was lost."""
    root, _ = first
    shards = tmp_path / "shards"
    small = [f"paths.shards={shards}", "benchmark.shard.max_samples=128"]  # t2's train split: 3 shards
    run(root, "mode=shards", *small)
    manifest = Manifest.load(next(shards.rglob("manifest.json")))
    bad = Path(manifest.url(manifest.task("t2").shards["train"][1]))
    data = bytearray(bad.read_bytes())
    data[512 * 3 + 128 + 400] ^= 0x01  # a pixel of the shard's first sample: the tar stays readable
    bad.write_bytes(bytes(data))

    with pytest.raises(PipelineError) as err:
        run(root, "run_name=corrupt-fail", *small)
    assert "1 task(s) failed" in str(err.value) and f"t2: ShardCorruptError: shard {bad} is corrupt" in str(err.value)
    c = _client(root)
    fail_runs = {r.data.tags["ksm_task"]: r.info.status for r in _runs(c, "tags.ksm_kind = 'task'")
                 if r.data.tags.get("mlflow.parentRunId") and
                 c.get_run(r.data.tags["mlflow.parentRunId"]).info.run_name == "corrupt-fail"}
    assert fail_runs == {"t1": "FINISHED", "t2": "FAILED"}

    out = run(root, "run_name=corrupt-skip", "data.on_corrupt=skip", *small)
    res = {r.task: r for r in out["results"]}
    lost = 128 * 3  # the bad shard's samples, in each of the 2 epochs and the head refit's pass (train.head_refit)
    assert res["t1"].skipped_samples == 0 and res["t2"].skipped_samples == lost
    t2 = c.get_run(res["t2"].run_id)
    assert t2.info.status == "FINISHED" and t2.data.metrics["skipped_samples"] == lost
    assert t2.data.tags["ksm_skipped_shards"] == str(bad)
    assert t2.data.params["train_samples"] == "300"  # what the manifest promised; the metric says what was lost
    assert out["report"]["skipped_samples"] == lost
    md = Path(c.download_artifacts(out["parent_run_id"], "report/report.md", str(tmp_path))).read_text()
    assert f"t2: {lost} sample(s) skipped from corrupt shard(s) {bad}" in md


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("override, names", [
    ("method.name=ksm_typo", ["ksm_typo", "piggyback", "ksm_softmax"]),
    ("model.name=vgg99", ["vgg99", "vgg16_bn_cifar", "resnet18"]),
    ("method.T=0", ["T"]),
    ("method.k=-1", ["k"]),
    ("train.batch_size=0", ["train.batch_size"]),
    ("train.backbone.batch_size=0", ["train.backbone.batch_size=0"]),
    ("data.shuffle_buffer=0", ["data.shuffle_buffer=0"]),
    ("cluster.max_retries=-2", ["cluster.max_retries=-2"]),
    ("method.tau=-0.001", ["tau=-0.001", ">= 0"]),
])
def test_bad_values_are_named_before_any_work(tmp_path, override, names):
    with pytest.raises(PipelineError) as e:
        run(tmp_path, override)
    for n in names:
        assert n in str(e.value)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data").exists()  # nothing started


@pytest.mark.parametrize("override, says", [
    ("train.epoch=3", ["Key 'epoch' not in 'TrainCfg'", "full_key: train.epoch"]),               # unknown key
    ("train.epochs=abc", ["'abc'", "could not be converted to Integer", "full_key: train.epochs"]),  # wrong type
    ("cluster.num_cpus=1.5", ["1.5", "full_key: cluster.num_cpus"]),
    ("method.T=hot", ["'hot'", "full_key: method.T"]),
])
def test_the_schema_refuses_unknown_keys_and_wrong_types_while_composing(tmp_path, override, says):
    """Typos and wrong types are Hydra/OmegaConf's own errors (pipeline/config.py's schema), naming the key."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        config(tmp_path, override)
    msg = str(e.value) + str(e.value.__cause__)
    for part in says:
        assert part in msg, msg
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data").exists()


def test_an_overrides_file_is_type_checked_like_the_command_line(tmp_path):
    bad = tmp_path / "best.yaml"
    bad.write_text("method: {name: ksm, T: hot}\n")
    with pytest.raises(PipelineError, match=rf"overrides_file {bad}: .*'hot'"):
        run(tmp_path, f"overrides_file={bad}")
    bad.write_text("train: {epoch: 3}\n")
    with pytest.raises(PipelineError, match=r"unknown key\(s\) \['epoch'\] in 'train'; valid: .*'epochs'"):
        run(tmp_path, f"overrides_file={bad}")


@pytest.mark.slow
def test_gpus_requested_on_a_cluster_without_gpus_fails_fast(first):
    root, _ = first
    for share in ("1", "0.5"):  # a fraction of a GPU is still a GPU the cluster does not have
        with pytest.raises(PipelineError, match=rf"gpus_per_task={share}.*no GPU"):
            run(root, "run_name=gpu-test", f"cluster.gpus_per_task={share}")


def test_unreachable_tracking_server_is_named(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PipelineError, match=f"{uri}.*not reachable"):
        run(tmp_path, "tracking=server", f"tracking.uri={uri}")


@pytest.mark.slow
@pytest.mark.own_processes
def test_cli_reports_errors_and_lists_choices(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), f"paths.root={tmp_path}", *args],
                              capture_output=True, text=True, env=env, timeout=120)

    # the README's exit codes, from a real process: 2 for the pipeline's own error, 1 for Hydra's
    bad_method = cli("method.name=nope")
    assert bad_method.returncode == 2 and "valid methods:" in bad_method.stderr and "Traceback" not in bad_method.stderr
    assert "error: " in bad_method.stderr
    # an unknown group option is Hydra's: it lists the options of that group
    bad_bench = cli("benchmark=nope")
    assert bad_bench.returncode == 1
    err = bad_bench.stderr
    assert "benchmark/nope" in err and "split_fashion_mnist" in err and "fashion_to_digits" in err
    # an unknown key, the README's example: Hydra's error too, exit 1 (a wrong type composes the same way:
    # test_the_schema_refuses_unknown_keys_and_wrong_types_while_composing)
    bad_key = cli("train.epoch=3")
    assert bad_key.returncode == 1 and "epoch" in bad_key.stderr and "Traceback" not in bad_key.stderr


def test_an_unknown_group_option_lists_the_groups_options(tmp_path):
    """Hydra's error for `method=nope`, as the CLI prints it (exit 1: test_cli_reports_errors_and_lists_choices)."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        config(tmp_path, "method=nope")
    assert "method/nope" in str(e.value) and "ksm" in str(e.value) and "piggyback" in str(e.value), str(e.value)


def test_runs_log_only_the_hyperparameters_their_method_uses():
    from pipeline.config import MethodCfg, TrainCfg
    from pipeline.params import method_params

    train = TrainCfg(lr_mask=1e-3, lr_head=2e-3, lr_finetune=3e-4)
    hp = {"tau": 5e-3, "k": 1200.0, "T": 100.0, "init": 1e-2}
    assert method_params(MethodCfg("ksm", **hp), train) == {
        "method": "ksm", "tau": 5e-3, "init": 1e-2, "k": 1200.0, "T": 100.0, "lr_mask": 1e-3, "lr_head": 2e-3}
    assert method_params(MethodCfg("piggyback", **hp), train) == {  # a threshold, no softmax trick: no T, no k
        "method": "piggyback", "tau": 5e-3, "init": 1e-2, "lr_mask": 1e-3, "lr_head": 2e-3}
    assert method_params(MethodCfg("finetune"), train) == {"method": "finetune", "lr_finetune": 3e-4, "lr_head": 2e-3}


def test_local_tracking_uris_are_made_absolute(tmp_path, monkeypatch):
    from pipeline.config import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path}/runs/m.db"
    assert absolute_tracking_uri("file:./mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_tracking_uri("mlruns") == str(tmp_path / "mlruns")
    for kept in ("sqlite:////abs/m.db", "file:///abs/mlruns", "/abs/mlruns", "http://127.0.0.1:5000", "databricks",
                 "postgresql://u@h/db"):
        assert absolute_tracking_uri(kept) == kept


@pytest.mark.slow
@pytest.mark.mutates_tiny_sequence
def test_evaluate_serves_every_task_from_one_network_unchanged(first):
    """mode=evaluate: backbone + every task artifact into ONE network; each task, the backbone's own included,
    scores exactly what it scored when trained, and the backbone's tensors still hash to its fingerprint."""
    root, out = first
    ev = run(root, "mode=evaluate")
    rows = {r["task"]: r for r in ev["rows"]}
    assert sorted(rows) == ["t0", "t1", "t2"] and rows["t0"]["index"] == 0
    assert ev["backbone_unchanged"] and ev["max_abs_delta"] == 0.0 and ev["missing"] == []
    # max_abs_delta leaves out a row without a logged accuracy: every row, t0 included, must have one and match it
    assert {t: (r["logged_acc"] is not None, r["delta"]) for t, r in rows.items()} == {
        t: (True, 0.0) for t in ("t0", "t1", "t2")}
    c = _client(root)
    assert rows["t0"]["acc"] == c.get_run(out["backbone_run_id"]).data.metrics["test_acc"]  # the backbone's own
    for name in ("t1", "t2"):
        trained = [r for r in _runs(c, f"tags.ksm_kind = 'task' and tags.ksm_task = '{name}'", "FINISHED")
                   if r.data.tags["ksm_sequence"] == out["sequence_key"]][0]
        assert rows[name]["acc"] == trained.data.metrics["test_acc"]
    run_ = c.get_run(ev["run_id"])
    assert run_.data.tags["mlflow.parentRunId"] == out["parent_run_id"] == ev["parent_run_id"]
    assert run_.data.tags["ksm_kind"] == "evaluation" and run_.info.status == "FINISHED"
    assert run_.data.metrics["max_abs_delta"] == 0.0 and run_.data.metrics["backbone_unchanged"] == 1.0
    assert run_.data.metrics["test_acc.t1"] == rows["t1"]["acc"]
    assert {run_.data.metrics.get(f"delta.{t}") for t in ("t0", "t1", "t2")} == {0.0}
    assert [a.path for a in c.list_artifacts(ev["run_id"], "report")] == ["report/evaluation.md"]


@pytest.mark.slow
def test_evaluate_without_a_trained_sequence_says_what_to_run(first):
    root, _ = first
    with pytest.raises(PipelineError, match=r"no trained sequence matches this config \(run_name='never-trained'.*"
                                            r"without mode=evaluate first"):
        run(root, "mode=evaluate", "run_name=never-trained")


# A task job whose paths.output is a real full disk: a 64 KiB tmpfs, filled, in a private mount namespace
# (`unshare -rm`: needs no root and leaves the machine's mounts alone). The job runs for real in that process.
_FULL_DISK_JOB = r"""
import json, os, pickle, sys
full, args = sys.argv[1], sys.argv[2]
fd = os.open(os.path.join(full, "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"\0" * 1024)
except OSError:
    pass
os.close(fd)
from pipeline.jobs import task_job
rc, ctx, task, result, state = pickle.load(open(args, "rb"))
try:
    task_job(rc, ctx, task, result, state)
    err = None
except Exception as e:
    err = {"type": type(e).__name__, "msg": str(e)}
files = sorted(os.path.relpath(os.path.join(d, f), full) for d, _, fs in os.walk(full) for f in fs)
print("RESULT " + json.dumps({"err": err, "files": files}))
"""


@pytest.mark.slow
@pytest.mark.mutates_tiny_sequence
def test_task_job_on_a_full_disk_fails_its_run_naming_path_and_errno(first, tmp_path):
    """Issue 15 item 4: the artifact write hits ENOSPC; the job fails with the path, the errno and the fix, its
    MLflow run ends FAILED (not RUNNING), and no artifact file is left in paths.output."""
    import json
    import pickle
    import shutil

    from pipeline.config import resolve
    from pipeline.jobs import JobContext
    from pipeline.identity import result_key

    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=8k tmpfs $d"],
            capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm + mount tmpfs refused): no full disk to test on")
    root, out = first
    full = tmp_path / "full"
    full.mkdir()
    rc = resolve(config(root, f"paths.output={full}", "train.epochs=1"))  # a new result key: it trains
    c = _client(root)
    manifest = Manifest.load(next((root / "data" / "shards").rglob("manifest.json")))
    task = manifest.new_tasks[0]
    result = result_key(rc, out["fingerprint"], manifest.task(task).identity)
    ctx = JobContext(manifest=str(manifest.path), experiment_id=out["experiment_id"],
                     parent_run_id=out["parent_run_id"], sequence_key=out["sequence_key"],
                     backbone_fingerprint=out["fingerprint"], backbone_run_id=out["backbone_run_id"])
    state = load_file(c.download_artifacts(out["backbone_run_id"], "backbone/backbone.safetensors", str(tmp_path)))
    args = tmp_path / "args.pkl"
    args.write_bytes(pickle.dumps((rc, ctx, task, result, state)))
    script = tmp_path / "job.py"
    script.write_text(_FULL_DISK_JOB)
    cmd = f"mount -t tmpfs -o size=64k tmpfs {full} && exec {sys.executable} {script} {full} {args}"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "RESULT " in r.stdout, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert res["err"] is not None and res["err"]["type"] == "PipelineError", res
    msg = res["err"]["msg"]
    assert f"task {task}: " in msg and str(full) in msg and "[ENOSPC] No space left on device" in msg, msg
    assert "paths.output" in msg and "marked FAILED" in msg
    assert res["files"] == ["filler"]  # no artifact, no temporary, no scratch file left behind
    runs = _runs(c, f"tags.ksm_result = '{result}'")
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.slow
@pytest.mark.mutates_tiny_sequence
def test_a_task_at_chance_is_tagged_retrained_once_and_flagged_in_the_report(first, tmp_path, capsys):
    """Issue #22's detector, forced: an absurd mask learning rate (1e6, on masks and BN) and no head refit leave
    KSM's tasks at chance. Each such run is trained once more with another seed (train.retrain_at_chance), is
    tagged ksm_warning=chance_level when the retry fails too, and the report and its parent run count it."""
    root, _ = first  # its own sequence (run name, result keys) on the shared store: shards and backbone reused
    out = run(root, "run_name=chance-test", "train.lr_mask=1e6", "train.head_refit=false",
              "train.retrain_at_chance=true")
    c = _client(root)
    key = out["sequence_key"]
    tasks = {r.data.tags["ksm_task"]: r for r in _runs(c, f"tags.ksm_kind = 'task' and tags.ksm_sequence = '{key}'")}
    assert sorted(tasks) == ["t1", "t2"] and all(r.info.status == "FINISHED" for r in tasks.values())
    flagged = {n for n, r in tasks.items() if r.data.tags.get("ksm_warning") == "chance_level"}
    assert flagged, {n: r.data.metrics["test_acc"] for n, r in tasks.items()}
    for name, r in tasks.items():
        acc, tags, params, m = r.data.metrics["test_acc"], r.data.tags, r.data.params, r.data.metrics
        assert (name in flagged) == (acc <= 0.5 + 0.05), (name, acc)  # the tag is exactly the detector's rule
        if "first_test_acc" in m:  # retrained: the first attempt was at chance; both logged
            assert m["first_test_acc"] <= 0.55 and tags["ksm_retrained"] == "chance_level"
            assert int(params["retrain_seed"]) != int(params["seed"])
            hist = c.get_metric_history(r.info.run_id, "test_acc")
            assert sorted(h.step for h in hist) == [0, 1, 2, 3, 4]  # 2 epochs, 2 more for the retry, the final
    assert all("first_test_acc" in tasks[n].data.metrics for n in flagged)  # nothing flagged without its retry
    parent = c.get_run(out["parent_run_id"])
    assert parent.data.tags["ksm_kind"] == "sequence" and parent.data.tags["ksm_sequence"] == key
    assert parent.data.metrics["tasks_at_chance"] == len(flagged)
    printed = capsys.readouterr().out
    assert f"warning: {len(flagged)} task(s) ended at chance level" in printed
    assert all(f"  {n}: test acc" in printed for n in flagged)
    assert {r.task: r.warning for r in out["results"]} == {n: "chance_level" if n in flagged else ""
                                                                  for n in tasks}
    md = Path(c.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path / "dl"))).read_text()
    assert "chance level" in md and "| warning |" in md
