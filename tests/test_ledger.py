"""A stream's ledger (pipeline/ledger.py): the JSON artifact on the stream's parent run that a long stream's resume
reads instead of paging through its runs. It round-trips; a resume from it answers exactly what the scan answers
(the same runs, the same TaskResults, the same runs tagged superseded) after runs finished since it was written, one
was deleted and one superseded; one that is malformed, another version or stream's, too large, or not confirmed by
the store is not used (one log line) and the stream is scanned; a write that fails fails nothing.

The store tests run MLflow on a sqlite file in this process (no server, no Ray): one store for the module, one
experiment per test."""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest

from pipeline import ledger
from pipeline.ledger import Entry, Ledger, LedgerBook, LedgerError
from pipeline.records import TaskResult

STREAM, FP = "streamkey0000001", "fp" * 32

#: what a task job logs at its end (jobs.task_job), enough for every TaskResult field
PARAMS = {"classes": "T-shirt/top, Trouser", "backbone_fingerprint": FP}


def result(i: int, **over) -> TaskResult:
    return TaskResult(**{"task": f"t{i:03d}", "run_id": f"{i:032x}", "status": "reused", "classes": "a, b",
                         "test_acc": 0.5 + i / 1000, "train_seconds": 1.25, "compile_seconds": None,
                         "artifact_bytes": 26411.0, "mask_ones": 0.62, "mask_soft": 0.05,
                         "layers": {"features.0": 0.5, "classifier.1": 0.9}, "node": "10.0.0.7", "device": "cpu",
                         "skipped_samples": 3, "skipped_shards": "", "warning": "", "retrained": False,
                         "start_time": 1_700_000_000_000 + i, "sequence": STREAM, **over})


# -------------------------------------------------------------------------------------------------- the format
def test_a_ledger_round_trips_through_its_json():
    entries = (Entry("r0", result(0)), Entry("r1", result(1, node=None, warning="chance_level", retrained=True,
                                                             test_acc=None, layers={}, start_time=None), True))
    led = Ledger(STREAM, "p" * 32, 1764676000.5, entries)
    back = Ledger.from_json(led.to_json(), STREAM, "p" * 32)
    assert back == led and list(back.entries[0].result.layers) == ["features.0", "classifier.1"]
    assert back.entries[1].superseded and back.entries[1].result.status == "reused"


def test_every_task_result_field_is_in_the_ledger():
    """A field added to TaskResult must be added to the ledger's format (and its version raised)."""
    assert set(ledger._FIELDS) == {f.name for f in dataclasses.fields(TaskResult)} - {"status"}


def _doc(**over) -> dict:
    d = json.loads(Ledger(STREAM, "p" * 32, 1.0, (Entry("r0", result(0)),)).to_json())
    d.update(over)
    return d


@pytest.mark.parametrize("text, says", [
    (b"\x80\x04not json", "not JSON"),
    (pickle.dumps({"format": "ksm-stream-ledger"}), "not JSON"),  # never unpickled
    (b"[" * 100_000, "not JSON"),                                   # nested past the parser's depth
    (json.dumps(["a list"]), "not a ksm-stream-ledger"),
    (json.dumps(_doc(format="other")), "not a ksm-stream-ledger"),
    (json.dumps(_doc(version=2)), "version 2"),
    (json.dumps(_doc(stream="another0stream00")), "it is stream 'another0stream00'"),
    (json.dumps(_doc(parent_run_id="q" * 32)), "parent run"),
    (json.dumps(_doc(extra=1)), "unexpected keys"),
    (json.dumps(_doc(written_at="yesterday")), "written_at"),
    (json.dumps(_doc(entries={})), "entries is not a list"),
    (json.dumps(_doc(entries=[{"result_key": "r0", "superseded": False}])), "entry 0: not an object"),
    (json.dumps(_doc(entries=[{**_doc()["entries"][0], "superseded": "no"}])), "entry 0: field 'superseded'"),
    (json.dumps(_doc(entries=[{**_doc()["entries"][0], "result": {**_doc()["entries"][0]["result"],
                                                                   "test_acc": "0.9"}}])), "field 'test_acc'"),
    (json.dumps(_doc(entries=[{**_doc()["entries"][0], "result": {**_doc()["entries"][0]["result"],
                                                                   "run_id": "x' or '1"}}])), "is not one MLflow"),
    (json.dumps(_doc(entries=[{**_doc()["entries"][0], "result": {**_doc()["entries"][0]["result"],
                                                                   "sequence": "other"}}])), "is stream 'other'"),
    (json.dumps(_doc(entries=_doc()["entries"] * 2)), "twice"),
])
def test_a_malformed_or_foreign_ledger_is_refused_naming_what_is_wrong(text, says):
    with pytest.raises(LedgerError, match=None) as e:
        Ledger.from_json(text, STREAM, "p" * 32)
    assert says in str(e.value)


# ----------------------------------------------------------------------------------------------- on a real store
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("ledger")
    return f"sqlite:///{root}/mlflow.db", str(root / "artifacts")


@pytest.fixture
def tr(store, request):
    from pipeline.tracking import Tracker

    uri, artifacts = store
    return Tracker.setup(uri, request.node.name[:200], artifacts)


def task_run(tr, i: int, stream: str = STREAM, status: str = "FINISHED", result_key: str | None = None) -> TaskResult:
    """A task run as a task job makes it (claim tags at creation, one final batch, the finish), and the result the
    job hands the driver (built from what it logged, not read back)."""
    run = tr.create(f"t{i:03d}", {"ksm_kind": "task", "ksm_result": result_key or f"r{i}", "ksm_task": f"t{i:03d}",
                                  "ksm_sequence": stream, "ksm_task_id": f"id{i}", "ksm_node_ip": "10.0.0.7"})
    metrics = {"test_acc": 0.5 + i / 1000, "train_seconds": 1.5, "compile_seconds": None, "artifact_bytes": 26411,
               "mask_ones": 0.62, "mask_soft": 0.05, "skipped_samples": 0, "layer_ones.01.classifier.1": 0.9,
               "layer_ones.00.features.0": 0.5}
    end_tags = {"ksm_device": "cpu", **({"ksm_warning": "chance_level"} if i % 7 == 0 else {})}
    tr.log(run.info.run_id, params={**PARAMS, "task": f"t{i:03d}"}, metrics=metrics, tags=end_tags, step=2,
           history=[(0, {"train_loss": 0.9})])
    tr.finish(run.info.run_id, status)
    return TaskResult.from_logged(run.info, "trained", {k: str(v) for k, v in PARAMS.items()}, metrics,
                                  {**run.data.tags, **end_tags})


def parent_run(tr) -> str:
    return tr.start("stream", {"ksm_kind": "sequence", "ksm_sequence": STREAM})


def by_scan(tr, wanted: dict[str, str]) -> dict[str, TaskResult]:
    """What the resume answered before the ledger: the stream's runs, paged, each read whole."""
    from pipeline.lineage import trained_runs

    return {t: TaskResult.from_run(r, "reused")
            for t, r in trained_runs(tr, wanted, stream=STREAM, backbone_fingerprint=FP).items()}


def superseded(tr) -> dict[str, str | None]:
    return {r.info.run_id: r.data.tags.get("ksm_superseded") for r in tr.scan(None, ksm_kind="task")}


@pytest.mark.slow
def test_a_resume_from_the_ledger_answers_exactly_what_the_scan_answers(tr):
    from pipeline.lineage import stream_book, supersede, trained_results

    parent = parent_run(tr)
    wanted = {f"t{i:03d}": f"r{i}" for i in range(40)}
    first = {f"t{i:03d}": task_run(tr, i) for i in range(10)}  # trained by an earlier launch
    task_run(tr, 30, status="KILLED")  # a dead attempt: never a result
    for i in (31, 32):
        task_run(tr, i, stream="other0stream0000")  # another stream's results on the same backbone
    logs: list[str] = []
    book = stream_book(tr, STREAM, parent, len(wanted), logs.append)  # the first launch with the ledger: a scan
    assert book.source == "scan" and len(book.entries) == 10 and len(logs) == 1 and "no ledger" in logs[0]
    for i in range(10, 30):  # the results this launch's jobs hand back, built from what they logged
        res = first[f"t{i:03d}"] = task_run(tr, i)
        book.add(res, wanted[res.task])
    assert len(book.entries) == 30
    book.write(force=True)
    assert not book.dirty

    # after the ledger: three runs finish (one a second run of t005's result, newer), one is deleted to retrain it,
    # one task changes (its old run is superseded), one of the ledger's results is no longer wanted
    for i in (33, 34):
        task_run(tr, i)
    task_run(tr, 5)
    tr.client.delete_run(first["t007"].run_id)
    wanted["t009"] = "r9-changed"
    del wanted["t011"]

    logs.clear()
    book = stream_book(tr, STREAM, parent, len(wanted), logs.append)
    assert book.source == "ledger", logs
    assert logs == ["[resume] ledger: 29 FINISHED task run(s) confirmed, 3 finished since, 1 deleted"]
    supersede(tr, STREAM, wanted, book)
    tagged = superseded(tr)
    assert [run for run, v in tagged.items() if v == "true"] == [first["t009"].run_id]
    supersede(tr, STREAM, wanted)  # the scan finds nothing more to tag
    assert superseded(tr) == tagged

    got = trained_results(tr, wanted, book=book, stream=STREAM, backbone_fingerprint=FP)
    assert got == by_scan(tr, wanted)
    assert sorted(got) == sorted(set(wanted) - {"t007", "t009", "t030", "t035", "t036", "t037", "t038", "t039"})
    assert got["t005"].run_id != first["t005"].run_id  # the newer run, as the scan takes it
    assert got["t031"].sequence == "other0stream0000"
    assert all(r.status == "reused" for r in got.values())

    # the book written back holds the stream's runs as they are now: the next resume proves it with nothing new
    book.write(force=True)
    logs.clear()
    again = stream_book(tr, STREAM, parent, len(wanted), logs.append)
    assert logs == ["[resume] ledger: 32 FINISHED task run(s) confirmed, 0 finished since, 0 deleted"]
    assert trained_results(tr, wanted, book=again, stream=STREAM, backbone_fingerprint=FP) == got


def _put(tr, parent: str, data: bytes, tmp_path: Path) -> None:
    path = tmp_path / ledger.ARTIFACT_NAME
    path.write_bytes(data)
    tr.artifact(parent, path, ledger.ARTIFACT_DIR)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["garbage", "pickle", "version", "other stream", "oversized", "run changed"])
def test_a_ledger_that_cannot_be_trusted_is_not_used_and_the_stream_is_scanned(tr, tmp_path, monkeypatch, case):
    from pipeline.lineage import stream_book, trained_results

    parent = parent_run(tr)
    wanted = {f"t{i:03d}": f"r{i}" for i in range(25)}
    results = [task_run(tr, i) for i in range(25)]
    good = Ledger(STREAM, parent, 1.0, tuple(Entry(f"r{i}", r) for i, r in enumerate(results)))
    data = {"garbage": b"{\"format\": \"ksm-stream-ledger\", \"entr", "pickle": pickle.dumps(good),
            "version": good.to_json().replace('"version":1', '"version":0').encode(),
            "other stream": dataclasses.replace(good, stream="another0stream00").to_json().encode(),
            "oversized": good.to_json().encode(), "run changed": good.to_json().encode()}[case]
    if case == "oversized":
        monkeypatch.setattr(ledger, "MAX_BYTES", len(data) - 1)
    if case == "run changed":  # a FINISHED run set FAILED by hand: the store no longer confirms the ledger
        tr.client.update_run(results[3].run_id, status="FAILED")
    _put(tr, parent, data, tmp_path)
    logs: list[str] = []
    book = stream_book(tr, STREAM, parent, len(wanted), logs.append)
    assert book.source == "scan" and len(logs) == 1, logs
    assert {"garbage": "not JSON", "pickle": "not JSON", "version": "version 0", "other stream": "another0stream00",
            "oversized": "more than", "run changed": "not all FINISHED task runs"}[case] in logs[0]
    assert "scanning" in logs[0]
    got = trained_results(tr, wanted, book=book, stream=STREAM, backbone_fingerprint=FP)
    assert got == by_scan(tr, wanted) and len(got) == 25 - (case == "run changed")


@pytest.mark.slow
def test_a_ledger_write_that_fails_fails_nothing(tr):
    """The parent run is not there (its store refuses the upload): one log line; the fan-out still answers."""
    from pipeline.fanout import Job, fan_out
    from pipeline.jobs import JobContext
    from pipeline.lineage import stream_book

    parent = parent_run(tr)
    results = [task_run(tr, i) for i in range(25)]
    logs: list[str] = []
    book = stream_book(tr, STREAM, parent, 25, logs.append)
    book.parent_run_id = "f" * 32  # no such run
    book.write(force=True)
    assert book.dirty and len(logs) == 2 and logs[1].startswith("[ledger] not written on run ffff")

    # fan_out with every job trained already (no Ray needed): its last write fails, it returns its results
    logs.clear()
    ctx = JobContext(manifest="-", experiment_id=tr.experiment_id, parent_run_id="f" * 32, sequence_key=STREAM,
                     backbone_fingerprint=FP, backbone_run_id="b" * 32)
    jobs = [Job(r.task, r.task, None, f"r{i}") for i, r in enumerate(results)]
    got, failures, wall = fan_out(jobs, ctx, {}, tr, False, logs.append)
    assert len(got) == 25 and not failures and wall == 0.0
    assert [line for line in logs if line.startswith("[ledger] not written")] != []


@pytest.mark.slow
def test_the_book_writes_when_due_and_only_the_streams_own_results(tr):
    from pipeline.lineage import stream_book

    parent = parent_run(tr)
    results = [task_run(tr, i) for i in range(22)]
    book = stream_book(tr, STREAM, parent, 22, lambda _: None)
    book.write()  # not due yet: nothing written
    assert book.dirty and not tr.client.list_artifacts(parent, ledger.ARTIFACT_DIR)
    book.every_s = 0.0
    book.write()
    assert not book.dirty and tr.client.list_artifacts(parent, ledger.ARTIFACT_DIR)
    book.add(dataclasses.replace(results[0], run_id="e" * 32, sequence="other0stream0000"), "r0")  # not ours
    book.add(results[1], "r1")  # known already
    assert not book.dirty and len(book.entries) == 22


@pytest.mark.slow
def test_the_driver_writes_its_ledger_and_the_next_launch_resumes_from_it(tmp_path, ray_local, monkeypatch, capsys):
    """The real driver (embedded Ray, Fashion-MNIST), its stream counted as long: the first launch scans and writes
    the ledger; the next one reuses everything from it; deleting a run retrains that task only."""
    from mlflow import MlflowClient
    from test_streams import LINES, run, write

    from pipeline import lineage

    monkeypatch.setattr(lineage, "ONE_BY_ONE", 1)  # 2 tasks count as a long stream here
    cat = write(tmp_path / "tasks.jsonl", LINES)
    first = run(tmp_path, cat)
    assert [r.status for r in first["results"]] == ["trained", "trained"]
    assert "no ledger" in capsys.readouterr().out
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [a.path for a in c.list_artifacts(first["parent_run_id"], ledger.ARTIFACT_DIR)] == [
        f"{ledger.ARTIFACT_DIR}/{ledger.ARTIFACT_NAME}"]

    second = run(tmp_path, cat)
    assert "[resume] ledger: 2 FINISHED task run(s) confirmed, 0 finished since, 0 deleted" in capsys.readouterr().out
    assert [r.status for r in second["results"]] == ["reused", "reused"]
    # the ledger holds what the jobs built from what they logged: the same as each run read back
    assert second["results"] == [TaskResult.from_run(c.get_run(r.run_id), "reused") for r in first["results"]]

    c.delete_run(first["results"][0].run_id)  # "delete that run to retrain"
    third = run(tmp_path, cat)
    assert "[resume] ledger: 1 FINISHED task run(s) confirmed, 0 finished since, 1 deleted" in capsys.readouterr().out
    assert [r.status for r in third["results"]] == ["trained", "reused"]
