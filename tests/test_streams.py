"""Task streams on real Fashion-MNIST: a JSONL catalogue that grows, a task that changes, bad lines, a generated
stream. Embedded Ray, MLflow on a sqlite file; every claim is read back from MLflow (runs, tags, start times)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

import run_pipeline
from pipeline.data.benchmarks import expand, load_benchmark_config, task_names
from pipeline.errors import ConfigError, PipelineError

ROOT = Path(run_pipeline.__file__).resolve().parent
# registry.export=false: registering the served model (~3.5 s a run; tests/test_export.py covers it) is not what
# these tests are about. One CPU: a launch's own Ray boots one worker (each imports torch, MLflow and the pipeline,
# ~4 CPU-s), and the race under test is between launches, not within one
TINY = ["train.epochs=1", "train.backbone.epochs=1", "model.width=0.0625", "progress=false", "cluster.num_cpus=1",
        "registry.export=false"]
FM = {"name": "fashion_mnist"}
LINES = [
    {"name": "base", "source": FM, "classes": [0, 1, 2, 3], "caps": {"train": 400, "test": 100}},
    {"name": "shoes", "source": FM, "classes": ["Sandal", "Sneaker"], "caps": {"train": 120, "test": 40}},
    {"name": "tops", "source": FM, "classes": ["Shirt", "Bag"], "caps": {"train": 120, "test": 40}},
]
NEW = {"name": "boots", "source": FM, "classes": ["Ankle boot", "Trouser"], "caps": {"train": 120, "test": 40}}


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def run(root: Path, catalogue: Path, *over: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["benchmark=catalogue", f"benchmark.path={catalogue}",
                                            f"paths.root={root}", *TINY, *over])
    return run_pipeline.main_from_config(cfg)


def task_runs(root: Path) -> list:
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")
    return c.search_runs([exp.experiment_id], "tags.ksm_kind = 'task'", max_results=1000)



@pytest.mark.slow
def test_a_catalogue_grows_and_changes_and_only_new_work_is_done(tmp_path, ray_local, capsys):
    cat = write(tmp_path / "tasks.jsonl", LINES)
    first = run(tmp_path, cat)
    assert [r.status for r in first["results"]] == ["trained", "trained"]
    before = {r.data.tags["ksm_task"]: r for r in task_runs(tmp_path)}
    shards = tmp_path / "data" / "shards" / "tasks"
    written = {str(p.relative_to(shards)): p.stat().st_mtime_ns for p in shards.glob("*/*.tar")}

    # a 4th line: only it trains; the backbone and the parent run are the same
    write(cat, [*LINES, NEW])
    second = run(tmp_path, cat)
    assert {r.task: r.status for r in second["results"]} == {"shoes": "reused", "tops": "reused",
                                                                    "boots": "trained"}
    assert second["backbone_run_id"] == first["backbone_run_id"]
    assert second["parent_run_id"] == first["parent_run_id"]
    # only the new task's shards were written; the others' files are untouched
    assert {k: (shards / k).stat().st_mtime_ns for k in written} == written
    assert sorted(p.name.rsplit("-", 1)[0] for p in shards.iterdir()) == ["base", "boots", "shoes", "tops"]
    runs = task_runs(tmp_path)
    finished = sorted(r.data.tags["ksm_task"] for r in runs if r.info.status == "FINISHED")
    assert finished == ["boots", "shoes", "tops"]  # exactly one FINISHED run per task
    now = {r.data.tags["ksm_task"]: r for r in runs}
    for t in ("shoes", "tops"):  # untouched: the same runs, started before the second launch
        assert now[t].info.run_id == before[t].info.run_id and now[t].info.start_time == before[t].info.start_time
    assert now["boots"].info.start_time > max(r.info.end_time for r in before.values())
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")
    assert len(c.search_runs([exp.experiment_id], "tags.ksm_kind = 'backbone'")) == 1

    # one line changed: only that task trains again; its old run stays, tagged superseded
    changed = {**LINES[2], "caps": {"train": 100, "test": 40}}
    write(cat, [LINES[0], LINES[1], changed, NEW])
    third = run(tmp_path, cat)
    assert {r.task: r.status for r in third["results"]} == {"shoes": "reused", "tops": "trained",
                                                                   "boots": "reused"}
    tops = [r for r in task_runs(tmp_path) if r.data.tags["ksm_task"] == "tops"]
    old = [r for r in tops if r.info.run_id == before["tops"].info.run_id][0]
    assert old.data.tags.get("ksm_superseded") == "true" and old.info.status == "FINISHED"
    assert [r.data.tags.get("ksm_superseded") for r in tops if r is not old] == [None]
    assert third["results"][1].run_id != old.info.run_id

    # a malformed line is named by its number and left out; the others run (nothing to train: all reused)
    write(cat, [LINES[0], LINES[1], changed, NEW, "{not json"])
    capsys.readouterr()
    fourth = run(tmp_path, cat)
    assert f"[shards] warning: catalogue {cat} line 5 is malformed" in capsys.readouterr().out
    assert {r.status for r in fourth["results"]} == {"reused"} and len(fourth["results"]) == 3

    # the first line changed: that is another backbone, so the stream needs a new name
    write(cat, [{**LINES[0], "caps": {"train": 300, "test": 100}}, LINES[1]])
    with pytest.raises(PipelineError, match=r"initial task of stream 'catalogue-ksm' changed.*run_name=<a new name>"):
        run(tmp_path, cat)
    assert len(c.search_runs([exp.experiment_id], "tags.ksm_kind = 'backbone'")) == 1  # refused before training


def test_duplicate_task_names_with_different_specs_are_refused_naming_both_lines(tmp_path):
    cat = write(tmp_path / "tasks.jsonl", [*LINES, {**LINES[1], "classes": [7, 9]}])
    bench = {**load_benchmark_config("catalogue"), "path": str(cat)}
    with pytest.raises(ConfigError, match=r"task 'shoes' is on line 2 and line 4 with different specs"):
        expand(bench)


def test_a_malformed_first_line_is_an_error_not_a_skip(tmp_path):
    cat = write(tmp_path / "tasks.jsonl", ['{"name": "base"}', LINES[1]])
    with pytest.raises(ConfigError, match=r"line 1 \(the initial task: it trains the backbone\) is malformed"):
        expand({**load_benchmark_config("catalogue"), "path": str(cat)})


def test_a_generated_stream_appends_tasks_as_it_grows():
    bench = load_benchmark_config("fashion_stream")
    small, _ = expand({**bench, "num_tasks": 5})
    big, _ = expand({**bench, "num_tasks": 1000})
    assert big["class_lists"][:6] == small["class_lists"]  # the first tasks do not change as the stream grows
    assert len(task_names({**bench, "num_tasks": 1000})) == 1001
    assert all(len(c) == 2 and len(set(c)) == 2 and all(0 <= x < 10 for x in c) for c in big["class_lists"][1:])
    assert len({tuple(c) for c in big["class_lists"][1:]}) == 45  # every pair of 10 classes turns up


@pytest.mark.slow
@pytest.mark.own_processes
def test_two_launches_at_the_same_moment_train_everything_once(tmp_path):
    """Two drivers (two terminals, two `ray job submit`s) start the same stream on a fresh store together: the
    backbone and each task are trained exactly once; the other launch waits for and reuses those runs."""
    import os
    import signal
    import subprocess
    import sys

    cat = write(tmp_path / "tasks.jsonl", LINES)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    argv = [sys.executable, str(ROOT / "run_pipeline.py"), "benchmark=catalogue", f"benchmark.path={cat}",
            f"paths.root={tmp_path}", *[o for o in TINY if not o.startswith("cluster.num_cpus")], "cluster.num_cpus=1"]
    # both write into one shard folder too: each task lands atomically, the slower writer keeps the first copy.
    # Each driver leads a session of its own, with its embedded Ray's processes in its group: on a timeout or a
    # failed assertion the whole group is killed, by its id, so no Ray process outlives the test
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # what is left of the group (after a normal exit: Ray's agents)
            except ProcessLookupError:
                pass
            p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("ksm")
    runs = [r for kind in ("backbone", "task")
            for r in c.search_runs([exp.experiment_id], f"tags.ksm_kind = '{kind}'", max_results=1000)]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = sorted((r.data.tags["ksm_kind"], r.data.tags["ksm_task"]) for r in runs if r.info.status == "FINISHED")
    assert finished == [("backbone", "base"), ("task", "shoes"), ("task", "tops")], [
        (r.data.tags.get("ksm_task"), r.info.status, r.data.tags.get("ksm_result"), r.data.tags.get("ksm_claim_pid"),
         r.info.start_time, r.info.end_time) for r in runs] + [out[-2500:] for out in outs]
    assert any("[backbone] reusing run" in out for out in outs)  # one launch waited for the other's backbone
    tasks = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "data" / "shards" / "tasks").iterdir())
    assert tasks == ["base", "shoes", "tops"]  # one folder per task, no temp folder left by the slower writer


@pytest.mark.slow
def test_trained_runs_of_a_long_stream_come_from_one_paged_scan_and_match_the_one_by_one_lookups(tmp_path):
    """Above 20 keys the driver scans the FINISHED task runs a page at a time instead of one query per task:
    same answer (only FINISHED runs with a wanted result key; a key two tasks share maps both)."""
    from pipeline.lineage import trained_runs
    from pipeline.tracking import Tracker

    tr = Tracker.setup(f"sqlite:///{tmp_path}/mlflow.db", "ksm", None)
    for i in range(30):
        run_id = tr.start(f"t{i}", {"ksm_kind": "task", "ksm_result": f"r{i}", "ksm_task": f"t{i}"})
        tr.finish(run_id, "FINISHED" if i % 3 else "KILLED")
    wanted = {f"t{i}": f"r{i}" for i in range(40)} | {"again": "r4"}
    scanned = {t: r.info.run_id for t, r in trained_runs(tr, wanted).items()}
    one_by_one = {t: r.info.run_id for t, k in wanted.items()
                  if (r := tr.find_one("FINISHED", ksm_kind="task", ksm_result=k)) is not None}
    assert scanned == one_by_one and len(scanned) == 21 and scanned["again"] == scanned["t4"]
    assert [r.data.tags["ksm_result"] for r in tr.scan("FINISHED", page=7, ksm_kind="task")].count("r1") == 1
