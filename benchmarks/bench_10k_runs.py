"""Issue #24, 10,000 runs: one experiment holding >= 10,000 task runs, read the way the pipeline reads it, through one
`mlflow server` (cluster/start_mlflow_server.sh), on a sqlite store and on a real PostgreSQL 15.

How the experiment is filled (same rows as the pipeline makes, most of them copied):
1. through the server, with the pipeline's own calls: `Tracker.setup`, per stream a parent run (ksm_kind=sequence,
   its key and run name, as `lineage.open_stream_run` tags it) and a FINISHED backbone run; then ``--template``
   task runs of the first stream, each exactly as a task job makes it (`claims.acquire`, the two dataset inputs,
   the epoch metrics, the artifact through the proxy, the final log_batch with a real task run's keys, the finish:
   `bench_tracking_load.log_task`);
2. in the database, the template runs' rows (runs, tags, params, metrics, latest_metrics, their dataset inputs,
   input tags and dataset rows) copied until every stream has ``--tasks`` task runs, each copy with its own run id,
   task name, result key, task id, stream key, parent run id, backbone run and fingerprint, dataset digest and
   start time; 2% of the copies KILLED (dead claim attempts). A copy read back through the server equals its
   template run but for those values (checked). The copied runs have no artifact files (nothing here reads one).

3. each stream's ledger (`pipeline/ledger.py`), written as the driver writes it: every task run's result as a job
   hands it back (`TaskResult`: the template run's, read through the server, with the copy's run id, task, stream
   and start time), added to a `LedgerBook` and written to the stream's parent run (`LedgerBook.write`).

Then, through the server, timed (median of ``--repeat``, claim look-up p50/p95 over 50 result keys):
- resume: the driver's, from the stream's ledger (`lineage.stream_book` -> `trained_results` -> `supersede`: one
  ledger download, one search for the stream's FINISHED runs not in it, one probe that all its runs still are),
  once with the ledger current and once with it lacking the stream's last 10 runs (a driver killed before its last
  write); its answer is checked equal, run for run and field for field, to the scan's;
- resume scan: `lineage.trained_runs` for one 1000-task stream as it reads without a ledger (the stream's own runs
  first; `supersede` read them all again) and, unless ``--skip-before``, as it scanned before that (every FINISHED
  task run of the experiment);
- claim look-up: the search `claims.acquire` makes after announcing (`Tracker.find(None, ksm_kind, ksm_result)`),
  beside the same search for a key nothing has (no run to return), the search without `tags.ksm_kind = 'task'`
  (which every task run of the experiment matches) and a bare round trip (`get_experiment`);
- `mode=evaluate`'s listing: `lineage.trained_sequence`'s calls (parent by stream key, backbone run, the stream's
  FINISHED task runs);
- `mode=export`'s lookup: the same, plus the registered model's newest version (`export._latest_version`);
- the report: `report.write_report` on the stream's 1000 results (the summary, plots and report.csv, uploaded to
  the parent run through the proxy).

  .venv/bin/python benchmarks/bench_10k_runs.py --skip-before             # both stores, 10 streams x 1000 tasks
  .venv/bin/python benchmarks/bench_10k_runs.py --stores sqlite --streams 2 --tasks 100   # a quick look
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import sys
from collections import defaultdict
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from bench_tracking_load import load_line, log_task, start_server  # noqa: E402

from pipeline.claims import acquire, look_keys  # noqa: E402
from pipeline.ledger import LedgerBook  # noqa: E402
from pipeline.lineage import stream_book, supersede, trained_results, trained_runs  # noqa: E402
from pipeline.records import TaskResult  # noqa: E402
from pipeline.tracking import Tracker  # noqa: E402

EXPERIMENT = "ksm-10k"


def stream_key(s: int) -> str:
    return f"{s:04d}streamkey{s:03d}"[:16]


def result_key(s: int, t: int) -> str:
    return f"r{s:03d}t{t:05d}".ljust(16, "0")


# ---------------------------------------------------------------------------------------------------------- fill
def fill(uri: str, db_uri: str, streams: int, tasks: int, template: int) -> dict[str, Any]:
    tr = Tracker.setup(uri, EXPERIMENT)
    rng = random.Random(0)
    artifact = Path(tempfile.mkdtemp()) / "task.safetensors"
    artifact.write_bytes(os.urandom(25168))
    meta: dict[str, Any] = {"experiment_id": tr.experiment_id, "streams": {}}
    t0 = time.perf_counter()
    for s in range(streams):
        key = stream_key(s)
        parent = tr.start(f"stream-{s}", {"ksm_kind": "sequence", "ksm_sequence": key, "ksm_run_name": f"stream-{s}",
                                          "ksm_initial_task": "base", "ksm_initial_task_id": "b" * 16})
        fp = f"{s:02d}" * 32
        bb = tr.start("backbone", {"ksm_kind": "backbone", "ksm_backbone": f"bb{s:014d}", "ksm_fingerprint": fp},
                      parent=parent)
        tr.finish(bb)
        tr.tags(parent, {"ksm_backbone_run": bb})
        meta["streams"][s] = {"key": key, "parent": parent, "backbone_run": bb, "fingerprint": fp}
    s0 = meta["streams"][0]
    templates = []
    for t in range(template):  # real task jobs' calls
        claim = acquire(tr, {"ksm_kind": "task", "ksm_result": result_key(0, t)}, f"task{t:05d}",
                        {"ksm_sequence": s0["key"], "ksm_task": f"task{t:05d}", "ksm_task_id": f"id{t:014d}",
                         "ksm_host": "bench"}, parent=s0["parent"])
        log_task(tr, claim.run, f"task{t:05d}", 2, rng, artifact)
        templates.append(claim.run_id)
    meta["template_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    meta["copied"], copies = copy_runs(db_uri, tr.experiment_id, templates, meta["streams"], tasks, template)
    meta["copy_s"] = time.perf_counter() - t0
    meta["templates"], meta["copies"] = templates, copies
    return meta


def stream_results(tr: Tracker, meta: dict[str, Any], s: int) -> list[tuple[TaskResult, str]]:
    """Stream ``s``'s FINISHED task runs as its jobs would have handed them to the driver, with their result keys:
    a template run's result read back, each copy's with its own run id, task, stream and start time."""
    if "template_results" not in meta:
        meta["template_results"] = [TaskResult.from_run(tr.client.get_run(t), "trained") for t in meta["templates"]]
    tpl, key = meta["template_results"], meta["streams"][s]["key"]
    out = [(r, result_key(0, t)) for t, r in enumerate(tpl)] if s == 0 else []
    for t, rid, src, start, killed in meta["copies"][s]:
        if not killed:
            out.append((dataclasses.replace(tpl[src], run_id=rid, task=f"task{t:05d}", start_time=start,
                                            sequence=key), result_key(s, t)))
    return out


def write_ledger(tr: Tracker, meta: dict[str, Any], s: int, lacking: int = 0) -> tuple[float, int]:
    """Stream ``s``'s ledger as the driver writes it (each result added to its LedgerBook, then written), less its
    last ``lacking`` runs. Returns the seconds the write took and the ledger's size in bytes."""
    info = meta["streams"][s]
    book = LedgerBook(tr, info["key"], info["parent"], [], dirty=False, source="bench", log=print)
    res = stream_results(tr, meta, s)
    for r, k in res[:len(res) - lacking]:
        book.add(r, k)
    t0 = time.perf_counter()
    book.write(force=True)
    assert not book.dirty, "the ledger was not written"
    return time.perf_counter() - t0, len(book.ledger().to_json())


def write_ledgers(tr: Tracker, meta: dict[str, Any]) -> None:
    ts, sizes = zip(*(write_ledger(tr, meta, s) for s in meta["streams"]))
    meta["ledger_write_s"], meta["ledger_bytes"] = statistics.median(ts), statistics.median(sizes)


def copy_runs(db_uri: str, exp_id: str, templates: list[str], streams: dict[int, dict], tasks: int,
              template: int) -> tuple[int, dict[int, list[tuple[int, str, int, int, bool]]]]:
    """Copy the template task runs' rows until every stream has ``tasks`` task runs (see the module doc). Returns
    how many, and per stream each copy's (task number, run id, template index, start time, KILLED)."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_uri)
    md = sa.MetaData()
    names = ["runs", "tags", "params", "metrics", "latest_metrics", "inputs", "input_tags", "datasets"]
    md.reflect(engine, only=names)
    T = {n: md.tables[n] for n in names}
    with engine.connect() as con:
        rows = {n: [dict(r._mapping) for r in con.execute(sa.select(T[n]).where(T[n].c.run_uuid.in_(templates)))]
                for n in ("runs", "tags", "params", "metrics", "latest_metrics")}
        inputs = [dict(r._mapping) for r in con.execute(sa.select(T["inputs"]).where(
            T["inputs"].c.destination_id.in_(templates)))]
        input_tags = [dict(r._mapping) for r in con.execute(sa.select(T["input_tags"]).where(
            T["input_tags"].c.input_uuid.in_([i["input_uuid"] for i in inputs])))]
        datasets = [dict(r._mapping) for r in con.execute(sa.select(T["datasets"]).where(
            T["datasets"].c.dataset_uuid.in_([i["source_id"] for i in inputs])))]
    by_run = {n: {} for n in rows}
    for n, rs in rows.items():
        for r in rs:
            by_run[n].setdefault(r["run_uuid"], []).append(r)
    in_by_run: dict[str, list] = {}
    for i in inputs:
        in_by_run.setdefault(i["destination_id"], []).append(i)
    tags_by_input: dict[str, list] = {}
    for it in input_tags:
        tags_by_input.setdefault(it["input_uuid"], []).append(it)
    ds_by_id = {d["dataset_uuid"]: d for d in datasets}
    rng = random.Random(1)
    base_time = by_run["runs"][templates[0]][0]["start_time"]
    n_copied = 0
    copies: dict[int, list[tuple[int, str, int, int, bool]]] = {s: [] for s in streams}
    batch: dict[str, list] = {n: [] for n in names}

    def flush(con) -> None:
        for n in names:
            if batch[n]:
                con.execute(T[n].insert(), batch[n])
                batch[n].clear()

    with engine.begin() as con:
        for s, info in streams.items():
            for t in range(tasks):
                if s == 0 and t < template:
                    continue
                src = templates[t % template]
                rid = f"{s:04d}{t:06d}" + os.urandom(11).hex()[:22]
                task, res, tid = f"task{t:05d}", result_key(s, t), f"id{s:04d}{t:010d}"
                subst_tags = {"ksm_task": task, "ksm_result": res, "ksm_task_id": tid, "ksm_sequence": info["key"],
                              "mlflow.parentRunId": info["parent"], "mlflow.runName": task}
                subst_params = {"task": task, "backbone_run_id": info["backbone_run"],
                                "backbone_fingerprint": info["fingerprint"]}
                killed = rng.random() < 0.02
                copies[s].append((t, rid, t % template, base_time + 1000 * (s * tasks + t), killed))
                for r in by_run["runs"][src]:
                    batch["runs"].append({**r, "run_uuid": rid, "name": task,
                                          "status": "KILLED" if killed else r["status"],
                                          "start_time": base_time + 1000 * (s * tasks + t),
                                          "end_time": base_time + 1000 * (s * tasks + t) + 900,
                                          "artifact_uri": r["artifact_uri"].replace(src, rid)})
                for r in by_run["tags"][src]:
                    batch["tags"].append({**r, "run_uuid": rid, "value": subst_tags.get(r["key"], r["value"])})
                for r in by_run["params"][src]:
                    batch["params"].append({**r, "run_uuid": rid, "value": subst_params.get(r["key"], r["value"])})
                for n in ("metrics", "latest_metrics"):
                    batch[n] += [{**r, "run_uuid": rid} for r in by_run[n].get(src, [])]
                for i in in_by_run.get(src, []):
                    ds = ds_by_id[i["source_id"]]
                    new_ds = {**ds, "dataset_uuid": os.urandom(16).hex(), "name": task,
                              "digest": (tid + ds["digest"][-2:])[:36]}
                    new_in = {**i, "input_uuid": os.urandom(16).hex(), "source_id": new_ds["dataset_uuid"],
                              "destination_id": rid}
                    batch["datasets"].append(new_ds)
                    batch["inputs"].append(new_in)
                    batch["input_tags"] += [{**it, "input_uuid": new_in["input_uuid"]}
                                            for it in tags_by_input.get(i["input_uuid"], [])]
                n_copied += 1
                if n_copied % 500 == 0:
                    flush(con)
        flush(con)
    # the planner's statistics as autovacuum keeps them for a store that grew run by run: right after a bulk copy
    # they are stale until its own ANALYZE comes round, and PostgreSQL then planned some look-ups badly (a claim
    # look-up's p95 12.7 s in one run, 11-19 ms in a by-hand probe of the same store minutes later)
    with engine.begin() as con:
        con.execute(sa.text("ANALYZE"))
    engine.dispose()
    return n_copied, copies


def count_task_runs(db_uri: str, exp_id: str) -> int:
    """The experiment's task runs, counted in the database (through the server it is a 10,000-run scan)."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_uri)
    with engine.connect() as con:
        n = con.execute(sa.text("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE "
                                "r.experiment_id = :e AND t.key = 'ksm_kind' AND t.value = 'task'"),
                        {"e": int(exp_id)}).scalar()
    engine.dispose()
    return int(n)


def check_copy(tr: Tracker, template_id: str, copy_task: str, stream: int) -> None:
    """A copy read back through the server is its template but for the substituted values."""
    src = tr.client.get_run(template_id)
    (dst,) = tr.find(None, ksm_kind="task", ksm_result=result_key(stream, int(copy_task[4:])))
    assert set(dst.data.params) == set(src.data.params) and set(dst.data.tags) == set(src.data.tags)
    assert dst.data.metrics == src.data.metrics
    assert [i.dataset.name for i in dst.inputs.dataset_inputs] == [copy_task] * len(src.inputs.dataset_inputs)
    same = {k for k in src.data.params if k not in ("task", "backbone_run_id", "backbone_fingerprint")}
    assert {k: dst.data.params[k] for k in same} == {k: src.data.params[k] for k in same}


# -------------------------------------------------------------------------------------------------------- timing
def timed(fn, repeat: int) -> tuple[float, Any]:
    ts, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def listing(tr: Tracker, key: str, wanted: dict[str, str], fp: str) -> tuple[Any, Any, dict[str, Any]]:
    """lineage.trained_sequence's store calls, given the keys it computes from the config."""
    parent = tr.find_one(None, ksm_kind="sequence", ksm_sequence=key)
    bb_run = tr.client.get_run(parent.data.tags["ksm_backbone_run"])
    return parent, bb_run, trained_runs(tr, wanted, stream=key,
                                        backbone_fingerprint=bb_run.data.tags.get("ksm_fingerprint"))


def resume(tr: Tracker, info: dict[str, Any], wanted: dict[str, str], log: Any = print) -> dict[str, TaskResult]:
    """The driver's resume of a long stream (sequence.run_sequence, then fan_out): the stream's ledger, proven,
    then supersede and the trained results from it."""
    book = stream_book(tr, info["key"], info["parent"], len(wanted), log)
    supersede(tr, info["key"], wanted, book)
    return trained_results(tr, wanted, book=book, stream=info["key"], backbone_fingerprint=info["fingerprint"])


def quantiles_ms(ts: list[float]) -> tuple[float, float]:
    return 1000 * statistics.median(ts), 1000 * statistics.quantiles(ts, n=20)[-1]


def measure(uri: str, meta: dict[str, Any], tasks: int, repeat: int, before: bool = True) -> dict[str, Any]:
    from bench_tracking_load import Timed

    from pipeline.export import _latest_version
    from pipeline.report import write_report

    tr = Tracker(uri, meta["experiment_id"])
    s = len(meta["streams"]) // 2  # a stream in the middle: neither the first nor the last written
    info = meta["streams"][s]
    wanted = {f"task{t:05d}": result_key(s, t) for t in range(tasks)}
    out: dict[str, Any] = {"ledger_write_s": meta["ledger_write_s"], "ledger_bytes": meta["ledger_bytes"]}
    out["resume_scan_s"], found = timed(lambda: trained_runs(tr, wanted, stream=info["key"],
                                                             backbone_fingerprint=info["fingerprint"]), repeat)
    out["resume_found"] = len(found)
    scanned = {t: TaskResult.from_run(r, "reused") for t, r in found.items()}
    lines: list[str] = []
    out["resume_ledger_s"], got = timed(lambda: resume(tr, info, wanted, lines.append), max(repeat, 5))
    assert got == scanned, "the resume from the ledger differs from the scan"
    out["resume_ledger_log"] = lines[-1]
    times: dict[str, list[float]] = defaultdict(list)  # the resume's store calls, once more, each timed
    timed_tr = Tracker(uri, meta["experiment_id"])
    timed_tr.client = Timed(timed_tr.client, times)
    resume(timed_tr, info, wanted, lambda _: None)
    out["resume_ledger_calls"] = {k: [len(v), round(sum(v), 3)] for k, v in times.items()}
    write_ledger(tr, meta, s, lacking=10)  # as a driver killed 10 results before its next write leaves it
    lines.clear()
    out["resume_ledger_stale10_s"], got = timed(lambda: resume(tr, info, wanted, lines.append), max(repeat, 5))
    assert got == scanned, "the resume from a stale ledger differs from the scan"
    out["resume_ledger_stale10_log"] = lines[-1]
    write_ledger(tr, meta, s)
    if before:
        out["resume_scan_whole_experiment_s"], found_all = timed(lambda: _scan_everything(tr, wanted), 1)
        assert {t: r.info.run_id for t, r in found.items()} == {t: r.info.run_id for t, r in found_all.items()}
    else:
        out["resume_scan_whole_experiment_s"] = float("nan")
    print(f"[10k] {out}", flush=True)
    keys = random.Random(2).sample(sorted(wanted.values()), 50)
    look, none, only, trip = [], [], [], []
    for k in keys:
        t0 = time.perf_counter()
        tr.find(None, **look_keys({"ksm_kind": "task", "ksm_result": k}))  # exactly claims.acquire's search
        look.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tr.find(None, **look_keys({"ksm_kind": "task", "ksm_result": k[::-1]}))  # no such result: no run returned
        none.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tr.find(None, ksm_kind="task", ksm_result=k)  # as claims searched before: with tags.ksm_kind = 'task'
        only.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tr.client.get_experiment(meta["experiment_id"])
        trip.append(time.perf_counter() - t0)
    out["claim_lookup_p50_ms"], out["claim_lookup_p95_ms"] = quantiles_ms(look)
    out["lookup_no_run_p50_ms"], out["lookup_no_run_p95_ms"] = quantiles_ms(none)
    out["lookup_with_kind_p50_ms"], out["lookup_with_kind_p95_ms"] = quantiles_ms(only)
    out["round_trip_p50_ms"], out["round_trip_p95_ms"] = quantiles_ms(trip)
    out["evaluate_listing_s"], _ = timed(lambda: listing(tr, info["key"], wanted, info["fingerprint"]), repeat)
    out["export_lookup_s"], _ = timed(lambda: (listing(tr, info["key"], wanted, info["fingerprint"]),
                                               _latest_version(tr.client, f"stream-{s}")), repeat)
    results = list(scanned.values())
    print(f"[10k] {out}", flush=True)
    try:  # the config is composed from the working tree: a config mid-edit must not lose the numbers above
        rc = _run_config(f"stream-{s}")
    except Exception as e:  # noqa: BLE001
        out["report_s"], out["report_error"] = float("nan"), str(e).splitlines()[0][:200]
        return out
    out["report_s"], _ = timed(lambda: write_report(tr, info["parent"], results, rc, log=lambda _: None,
                                                    wall_seconds=1.0, failures={}), 1)
    return out


def _scan_everything(tr: Tracker, wanted: dict[str, str]) -> dict[str, Any]:
    """The resume scan as it was: every FINISHED task run of the experiment, a page at a time."""
    by_key = {k: t for t, k in wanted.items()}
    out = {}
    for r in tr.scan("FINISHED", ksm_kind="task"):
        t = by_key.get(r.data.tags.get("ksm_result", ""))
        if t:
            out.setdefault(t, r)
    return out


def _run_config(run_name: str):
    import run_pipeline  # noqa: F401  (its resolvers)
    from hydra import compose, initialize_config_dir

    from pipeline.config import resolve

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        # train.compile=false: the report reads no training setting; pins it while that option's type changes (#26)
        cfg = compose("config", overrides=[f"run_name={run_name}", f"paths.root={tempfile.mkdtemp()}",
                                           "train.compile=false"])
    return resolve(cfg)


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=1000, help="task runs per stream")
    ap.add_argument("--template", type=int, default=20, help="task runs made through the server, then copied")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="leave the server up (prints its URI) until Enter")
    ap.add_argument("--skip-before", action="store_true", help="skip the scan of every FINISHED task run (minutes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = []
    for store in args.stores.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"ksm-10k-{store}-"))
        pg = server = None
        try:
            if store == "postgres":
                from pg_helpers import Postgres

                pg = Postgres.start(fast=False)
                db_uri = pg.uri
            else:
                db_uri = f"sqlite:///{work}/store/mlflow.db"
            server, uri, _log = start_server(store, work, args.workers, None, None, pg)
            meta = fill(uri, db_uri, args.streams, args.tasks, args.template)
            tr = Tracker(uri, meta["experiment_id"])
            copy = args.template + 3  # stream 1's task copied from template run (copy % template)
            check_copy(tr, tr.find_one(None, ksm_kind="task", ksm_result=result_key(0, copy % args.template)).info.run_id,
                       f"task{copy:05d}", 1)
            t0 = time.perf_counter()
            write_ledgers(tr, meta)
            print(f"[10k] {store}: {len(meta['streams'])} ledgers written in {time.perf_counter() - t0:.1f}s "
                  f"(median {meta['ledger_write_s']:.2f}s, {meta['ledger_bytes'] / 1e6:.2f} MB each)", flush=True)
            total = count_task_runs(db_uri, meta["experiment_id"])
            print(f"[10k] {store}: {total} task runs ({args.template} made through the server in "
                  f"{meta['template_s']:.1f}s, {meta['copied']} copied in {meta['copy_s']:.1f}s); {load_line()}",
                  flush=True)
            r = measure(uri, meta, args.tasks, args.repeat, before=not args.skip_before)
            r.update(store=store, task_runs=total, load=load_line())
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.keep:
                input(f"[10k] {uri} (experiment {EXPERIMENT}) is up; Enter to stop it ")
        finally:
            if server is not None:
                server.stop()
            if pg is not None:
                pg.stop()
            shutil.rmtree(work, ignore_errors=True)  # the server's store: 0.5 GB at 20,000 runs
    print("\n| store | task runs | resume from the ledger, current / lacking 10 runs (s) | resume scan, 1000-task stream "
          "(s) | ... before: whole experiment (s) | claim look-up p50 / p95 (ms) | no-run look-up p50 / p95 (ms) | "
          "look-up as before, with ksm_kind p50 / p95 (ms) | round trip p50 / p95 (ms) | evaluate listing (s) | "
          "export lookup (s) | report (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['store']} | {r['task_runs']} | {r['resume_ledger_s']:.2f} / {r['resume_ledger_stale10_s']:.2f} | "
              f"{r['resume_scan_s']:.2f} | {r['resume_scan_whole_experiment_s']:.2f} | "
              f"{r['claim_lookup_p50_ms']:.0f} / {r['claim_lookup_p95_ms']:.0f} | "
              f"{r['lookup_no_run_p50_ms']:.0f} / {r['lookup_no_run_p95_ms']:.0f} | "
              f"{r['lookup_with_kind_p50_ms']:.0f} / {r['lookup_with_kind_p95_ms']:.0f} | "
              f"{r['round_trip_p50_ms']:.0f} / {r['round_trip_p95_ms']:.0f} | {r['evaluate_listing_s']:.2f} | "
              f"{r['export_lookup_s']:.2f} | {r['report_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
