"""The end-of-run report: the per-task table up to SUMMARY_ABOVE tasks, a summary (counts, quantiles, worst
tasks, one figure) beyond, on the console, in report.md and on the parent run."""
import csv
import dataclasses
import io
import random
import re
import types
from pathlib import Path

import numpy as np
import pytest

from pipeline.records import TaskResult
from pipeline.report import QUANTILES, SUMMARY_ABOVE, WORST, at_chance_lines, format_table, summarise, write_report


def records(n, seed=0):
    """Per-task records as the driver has them (TaskResult.from_run)."""
    rnd = random.Random(seed)
    return [TaskResult(task=f"t{i}", run_id=f"run{i}", status="trained" if i % 5 else "reused", classes="a, b",
                       test_acc=rnd.random(), train_seconds=rnd.uniform(1, 9), artifact_bytes=26000 + i,
                       mask_ones=0.5, mask_soft=0.1, layers={f"l{j}": rnd.random() for j in range(15)},
                       node="127.0.0.1", device="cpu", skipped_samples=0, skipped_shards="") for i in range(n)]


def test_summary_counts_quantiles_and_worst_tasks():
    rs = records(1000)
    rs[3] = dataclasses.replace(rs[3], test_acc=None)  # a task without an accuracy is counted, not ranked
    s = summarise(rs, failures={"x1": "boom", "x2": "bang"}, wall_seconds=12.0)
    assert (s["tasks"], s["trained"], s["reused"], s["failed"]) == (1000, 800, 200, 2)
    accs = [r.test_acc for r in rs if r.test_acc is not None]
    for name, q in QUANTILES:
        assert s["accuracy"][name] == pytest.approx(float(np.quantile(accs, q)), abs=1e-12)
    assert s["accuracy"]["mean"] == pytest.approx(float(np.mean(accs)))
    assert s["seconds"]["median"] == pytest.approx(float(np.median([r.train_seconds for r in rs])))
    assert [r.task for r in s["worst"]] == [r.task for r in sorted(
        (r for r in rs if r.test_acc is not None), key=lambda r: r.test_acc)[:WORST]]
    assert s["total_artifact_bytes"] == sum(r.artifact_bytes for r in rs) and s["fanout_wall_seconds"] == 12.0


def _rc(name="stream"):
    return types.SimpleNamespace(run_name=name, benchmark={"name": "fashion_stream"},
                                 method=types.SimpleNamespace(name="ksm"), model=types.SimpleNamespace(name="vgg"),
                                 train=types.SimpleNamespace(chance_margin=0.05))


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    from pipeline.tracking import Tracker

    d = tmp_path_factory.mktemp("report-store")
    return Tracker.setup(f"sqlite:///{d}/mlflow.db", "ksm", str(d / "artifacts"))


@pytest.mark.slow
@pytest.mark.parametrize("n", [SUMMARY_ABOVE + 1, 1000])
def test_large_stream_report_summarises_on_console_in_markdown_and_on_the_run(tracker, tmp_path, n):
    rs = records(n)
    rs[7:10] = [dataclasses.replace(r, warning="chance_level") for r in rs[7:10]]  # three ended at chance
    parent = tracker.start("stream", {"ksm_kind": "sequence"})
    logs: list[str] = []
    summary = write_report(tracker, parent, rs, _rc(), log=logs.append, wall_seconds=30.0,
                           failures={"t_bad": "task t_bad: cannot write artifact ...\ntraceback"})
    text = "\n".join(logs)
    reused = (n + 4) // 5
    assert f"{n} tasks, summarised" in text and f"{n} reported ({n - reused} trained, {reused} reused)" in text
    assert "1 failed" in text and "t_bad: task t_bad: cannot write artifact ..." in text
    assert "test accuracy: mean" in text and "p90" in text and "training seconds per task: mean" in text
    worst = sorted(rs, key=lambda r: r.test_acc)[:WORST]
    assert format_table(worst) in text  # the worst tasks, in the table's own format
    assert "warning: 3 task(s) ended at chance level" in text and all(f"  t{i}: test acc" in text for i in (7, 8, 9))
    assert len(logs) < 45  # not one line per task
    listed = {r.task for r in rs if f"\n{r.task} " in text}
    assert listed == {r.task for r in worst}

    assert summary["tasks"] == n and summary["tasks_failed"] == 1 and summary["tasks_reused"] == (n + 4) // 5
    c = tracker.client
    names = sorted(a.path for a in c.list_artifacts(parent, "report"))
    assert names == ["report/report.csv", "report/report.md", "report/report.png"]
    md = Path(c.download_artifacts(parent, "report/report.md", str(tmp_path))).read_text()
    assert format_table(worst, markdown=True) in md and "| t" in md and len(re.findall(r"\n\| t\d+ ", md)) == WORST
    csv = Path(c.download_artifacts(parent, "report/report.csv", str(tmp_path))).read_text().splitlines()
    assert len(csv) == n + 1 and csv[0].startswith("task,classes,test_acc")  # every task is still in the CSV
    png = Path(c.download_artifacts(parent, "report/report.png", str(tmp_path))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    m = c.get_run(parent).data.metrics
    assert m["tasks"] == n and m["test_acc_median"] == pytest.approx(summary["test_acc_median"])
    assert m["tasks_at_chance"] == 3 and "chance level" in md
    assert sum(line.split(",")[-2] == "chance_level" for line in csv[1:]) == 3  # the CSV's warning column


@pytest.mark.slow
def test_report_up_to_the_threshold_is_the_per_task_table(tracker, tmp_path):
    rs = records(SUMMARY_ABOVE)
    parent = tracker.start("stream50", {"ksm_kind": "sequence"})
    logs: list[str] = []
    summary = write_report(tracker, parent, rs, _rc(), log=logs.append)
    assert format_table(rs) in logs and "summarised" not in "\n".join(logs)
    assert set(summary) == {"mean_test_acc", "total_train_seconds", "total_artifact_bytes", "tasks", "tasks_at_chance"}
    assert summary["tasks_at_chance"] == 0 and "warning" not in format_table(rs)  # no column while no task has one
    names = sorted(a.path for a in tracker.client.list_artifacts(parent, "report"))
    assert names == ["report/accuracy_per_task.png", "report/mask_ratio_per_layer.png", "report/report.csv",
                     "report/report.md", "report/training_time_per_task.png"]
    md = Path(tracker.client.download_artifacts(parent, "report/report.md", str(tmp_path))).read_text()
    assert md == "# stream\n\n" + format_table(rs, markdown=True) + "\n"
    # report.csv: the table's columns unformatted, then the warning and the run
    lines = Path(tracker.client.download_artifacts(parent, "report/report.csv", str(tmp_path))).read_text()
    rows = list(csv.reader(io.StringIO(lines)))
    assert rows[0] == ["task", "classes", "test_acc", "train_seconds", "artifact_kb", "mask_ones", "mask_soft", "node",
                       "status", "warning", "run_id"]
    r = rs[1]
    assert rows[2] == ["t1", "a, b", str(r.test_acc), str(r.train_seconds), str(26001 / 1024), "0.5", "0.1",
                       "127.0.0.1", "trained", "", "run1"] and len(rows) == SUMMARY_ABOVE + 1


def test_a_task_at_chance_gets_a_warning_column_and_a_named_warning():
    rs = records(3)
    rs[1] = dataclasses.replace(rs[1], warning="chance_level", test_acc=0.5)
    table = format_table(rs).splitlines()
    rows = table[-3:]  # below the header (and its rule)
    assert table[0].split()[-1] == "warning" and rows[1].rstrip().endswith("chance_level")
    assert not rows[0].rstrip().endswith("chance_level") and not rows[2].rstrip().endswith("chance_level")
    lines = at_chance_lines(rs, _rc())
    assert lines[0].startswith("warning: 1 task(s) ended at chance level") and "train.chance_margin=0.05" in lines[0]
    assert lines[1:] == ["  t1: test acc 0.500"] and at_chance_lines(records(3), _rc()) == []
