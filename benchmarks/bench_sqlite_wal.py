"""One MLflow write (`MlflowClient.set_tag`) on a sqlite store in WAL mode (what `pipeline.store` creates) vs the
same store in sqlite's default rollback-journal mode (ARCHITECTURE.md, "sqlite stores": 7.2 -> 2.7 ms).

Two stores made by `pipeline.store.ensure_store` in one folder, one switched back to `journal_mode=DELETE`; one
run in each; `--calls` set_tag calls per round on each, the two stores alternating round by round (so a busy
moment of the machine hits both), `--rounds` rounds. Prints the median time per call in each mode, each round's
medians, and the ratio.

    .venv/bin/python benchmarks/bench_sqlite_wal.py                   # 5 rounds of 200 calls each
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")


def store(folder: Path, mode: str):
    from mlflow import MlflowClient

    from pipeline.store import ensure_store

    db = folder / f"{mode}.db"
    uri = f"sqlite:///{db}"
    ensure_store(uri)  # created in WAL mode
    if mode == "delete":
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
        conn.close()
    with sqlite3.connect(db) as conn:
        got = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert got == mode, (db, got)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("bench")).info.run_id
    return client, run_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ksm-wal-"))
    stores = {mode: store(folder, mode) for mode in ("delete", "wal")}
    per_round: dict[str, list[float]] = {mode: [] for mode in stores}
    every: dict[str, list[float]] = {mode: [] for mode in stores}
    for r in range(args.rounds):
        for mode, (client, run_id) in stores.items():
            times = []
            for i in range(args.calls):
                t0 = time.perf_counter()
                client.set_tag(run_id, "beat", f"{r}.{i}")
                times.append(time.perf_counter() - t0)
            per_round[mode].append(statistics.median(times) * 1000)
            every[mode] += times
    med = {mode: statistics.median(t) * 1000 for mode, t in every.items()}
    print(f"{folder}: {args.rounds} rounds x {args.calls} set_tag calls per store; load {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    print("| journal mode | median ms per set_tag | round medians (ms) |")
    print("|---|---:|---|")
    for mode in stores:
        print(f"| {mode} | {med[mode]:.2f} | {', '.join(f'{x:.2f}' for x in per_round[mode])} |")
    print(f"rollback journal / WAL: {med['delete'] / med['wal']:.2f}x")


if __name__ == "__main__":
    main()
