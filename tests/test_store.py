"""pipeline.store.ensure_store: a fresh sqlite MLflow store appears complete or not at all (real MLflow, real
sqlite files, real processes; nothing mocked)."""
from __future__ import annotations

import fcntl
import os
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.errors import PipelineError
from pipeline.store import ensure_store
from pipeline.tracking import Tracker

# every test here waits on store files and child processes of its own, never on Ray in this process
pytestmark = pytest.mark.own_processes

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 180  # bound on every wait for a child process (generous: two CPUs shared with other work)

# Opens the store the moment its file appears, as `mlflow ui` or a notebook started beside a first run would.
POLLER = r"""
import os, sys, time
from mlflow import MlflowClient
path, uri = sys.argv[1], sys.argv[2]
print("READY", flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(path):
    if time.monotonic() > deadline:
        print("NEVER-APPEARED", flush=True)
        sys.exit(3)
    time.sleep(0.002)
names = sorted(e.name for e in MlflowClient(tracking_uri=uri).search_experiments())
print("SAW", names, flush=True)
"""

# A second driver: sets up the same experiment on the same fresh store once the go file appears.
CREATOR = r"""
import os, sys, time
from pipeline.tracking import Tracker
uri, go = sys.argv[1], sys.argv[2]
print("READY", flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.001)
print("EXP", Tracker.setup(uri, "ksm").experiment_id, flush=True)
"""


def _start(tmp_path: Path, script: str, *args: str, name: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(tmp_path / f"{name}.stderr", "w") as err:
        return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=err,
                                text=True, cwd=tmp_path, env=env)


def _await_ready(proc: subprocess.Popen) -> None:
    """Block until the child has imported MLflow and says READY (so the race below is a real one)."""
    ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
    assert ready, "child never became ready"
    line = proc.stdout.readline()
    assert line.strip() == "READY", f"child said {line!r} (rc {proc.poll()})"


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()  # this process's own child, by its pid
        proc.wait()


def _stderr(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.stderr").read_text()[-3000:]


def _experiments(uri: str) -> list[str]:
    return sorted(e.name for e in MlflowClient(tracking_uri=uri).search_experiments())



def beside(folder) -> list[str]:
    """The files in a store's folder, less sqlite's own write-ahead log and shared-memory index (-wal, -shm), which
    exist while any process has the store open: the store is created in WAL mode."""
    return sorted(f for f in os.listdir(folder) if not f.endswith(("-wal", "-shm")))

# -- races --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_store_opened_while_created_four_times(tmp_path, monkeypatch):
    """An MlflowClient in another process opens the file the moment it appears, 4 fresh stores in a row: with an
    in-place migration that collided 4 times out of 4 (alembic CommandError / 'table runs already exists').
    The four pollers start (and import MLflow) together, each watching its own store's path; the stores are then
    created one after another, each raced by its own poller. (Ten rounds passed 10/10 when this fix landed; four
    keep the suite's time and still catch the old collision every time.)"""
    monkeypatch.chdir(tmp_path)
    rounds = []
    for i in range(4):
        folder = tmp_path / f"race{i}"
        folder.mkdir()
        db = folder / "mlflow.db"
        uri = f"sqlite:///{db}"
        rounds.append((folder, uri, f"poller{i}", _start(tmp_path, POLLER, str(db), uri, name=f"poller{i}")))
    try:
        for *_, proc in rounds:
            _await_ready(proc)
        for i, (folder, uri, name, proc) in enumerate(rounds):
            tracker = Tracker.setup(uri, "ksm")
            out, _ = proc.communicate(timeout=WAIT_S)
            assert proc.returncode == 0, f"round {i}: poller failed:\n{out}\n{_stderr(tmp_path, name)}"
            assert "SAW" in out and "'Default'" in out, f"round {i}: poller output {out!r}"
            assert tracker.client.get_experiment(tracker.experiment_id).name == "ksm"
            assert _experiments(uri) == ["Default", "ksm"]
            assert beside(folder) == ["mlflow.db"], f"round {i}: left beside the store"
    finally:
        for *_, proc in rounds:
            _end(proc)


@pytest.mark.slow
def test_two_drivers_create_the_same_store_at_once(tmp_path):
    """Two processes set up the same experiment on the same fresh store at the same moment: both succeed, on one
    store, with one experiment. Two rounds; all four processes import MLflow up front, together."""
    rounds = []
    for i in range(2):
        folder = tmp_path / f"both{i}"
        db = folder / "mlflow.db"  # the folder does not exist yet: ensure_store makes it
        uri = f"sqlite:///{db}"
        go = tmp_path / f"go{i}"
        rounds.append((folder, uri, go, [_start(tmp_path, CREATOR, uri, str(go), name=f"creator{i}{k}")
                                         for k in range(2)]))
    try:
        for *_, procs in rounds:
            for p in procs:
                _await_ready(p)
        for i, (folder, uri, go, procs) in enumerate(rounds):
            go.touch()
            outs = [p.communicate(timeout=WAIT_S)[0] for p in procs]
            for k, (p, out) in enumerate(zip(procs, outs)):
                assert p.returncode == 0, (f"round {i}: creator {k} failed:\n{out}\n"
                                           f"{_stderr(tmp_path, f'creator{i}{k}')}")
            ids = {out.split("EXP", 1)[1].strip() for out in outs}
            assert len(ids) == 1, f"round {i}: two experiments {ids}"
            assert _experiments(uri) == ["Default", "ksm"]
            assert beside(folder) == ["mlflow.db"], f"round {i}: left beside the store"
    finally:
        for *_, procs in rounds:
            for p in procs:
                _end(p)


@pytest.mark.slow
def test_waits_for_the_lock_and_gives_up_with_a_clear_error(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    holder = os.open(tmp_path / "mlflow.db.lock", os.O_RDWR | os.O_CREAT)  # another creator, as flock sees it
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(PipelineError) as e:
            ensure_store(uri, timeout_s=0.3)
        assert str(db) in str(e.value) and "mlflow.db.lock" in str(e.value)
        assert not db.exists()
    finally:
        os.close(holder)
    ensure_store(uri)  # lock released: it goes ahead
    assert _experiments(uri) == ["Default"]
    assert beside(tmp_path) == ["mlflow.db"]


# -- creation -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_creates_a_complete_store_and_leaves_an_existing_one_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "sub" / "mlflow.db"
    uri = f"sqlite:///{db}"
    ensure_store(uri)
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # cheaper commits
    assert {"alembic_version", "experiments", "runs", "metrics", "registered_models"} <= tables
    tracker = Tracker.setup(uri, "ksm")
    run = tracker.start("r", {"ksm_kind": "task"})
    tracker.finish(run)
    before = db.read_bytes()
    ensure_store(uri)
    assert db.read_bytes() == before
    assert beside(db.parent) == ["mlflow.db"]


@pytest.mark.slow
def test_empty_file_and_stale_temporaries_are_replaced(tmp_path):
    db = tmp_path / "mlflow.db"
    db.touch()  # e.g. a bare `sqlite3.connect` made it
    stale = [tmp_path / ".mlflow.db.dead1234.tmp", tmp_path / ".mlflow.db.dead1234.tmp-journal"]
    for p in stale:
        p.write_bytes(b"left by a creator that was killed")
    ensure_store(f"sqlite:///{db}")
    assert _experiments(f"sqlite:///{db}") == ["Default"]
    assert beside(tmp_path) == ["mlflow.db"]


@pytest.mark.slow
def test_relative_sqlite_uri_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ensure_store("sqlite:///rel/mlflow.db")
    assert (tmp_path / "rel" / "mlflow.db").stat().st_size > 0


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1", "file:./mlruns", "./mlruns", "sqlite://",
                                 "sqlite:///:memory:"])
def test_other_uris_are_left_alone(tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    ensure_store(uri)
    assert os.listdir(tmp_path) == []


# -- stores that cannot be used -----------------------------------------------------------------------------------
def test_garbage_file_is_refused_by_name(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database at all\n" * 200)
    with pytest.raises(PipelineError) as e:
        Tracker.setup(f"sqlite:///{db}", "ksm")
    assert str(e.value) == (f"tracking store {db} is not a readable sqlite database (file is not a database); move "
                            "it away or point tracking.uri at another file")
    assert db.read_bytes() == b"not a database at all\n" * 200


def test_unrelated_sqlite_database_is_refused_not_written(tmp_path):
    db = tmp_path / "notes.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()
    before = db.read_bytes()
    with pytest.raises(PipelineError) as e:
        Tracker.setup(f"sqlite:///{db}", "ksm")
    assert str(e.value) == (f"tracking store {db} is a sqlite database but not an MLflow store (found: notes); move "
                            "it away or point tracking.uri at another file")
    assert db.read_bytes() == before  # MLflow would have written its fifty tables into it


def _set_revision(db: Path, rev: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (rev,))
    conn.close()


@pytest.mark.slow
def test_old_or_unknown_schema_is_refused_with_the_fix(tmp_path):
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    head = ScriptDirectory.from_config(_get_alembic_config("")).get_revision("heads")
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    ensure_store(uri)
    _set_revision(db, head.down_revision)
    with pytest.raises(PipelineError) as e:
        ensure_store(uri)
    msg = str(e.value)
    assert msg.startswith(f"MLflow store {db} has an old schema ({head.down_revision}; ")
    assert f"back it up, then run `mlflow db upgrade {uri}`" in msg
    _set_revision(db, "ffffffffffff")
    with pytest.raises(PipelineError) as e:
        ensure_store(uri)
    assert str(e.value).startswith(f"MLflow store {db} has schema ffffffffffff, unknown to MLflow ")


def test_folder_under_a_regular_file_is_refused_by_name(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file where a folder should be")
    folder = blocker / "sub"
    with pytest.raises(PipelineError) as e:
        Tracker.setup(f"sqlite:///{folder / 'mlflow.db'}", "ksm")
    assert f"cannot create the MLflow store in folder {folder} (Not a directory)" in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder anyway: "
                    "test_read_only_folder_as_root_without_dac_override covers EACCES for root")
def test_read_only_folder_is_refused_by_name(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PipelineError) as e:
            ensure_store(f"sqlite:///{folder / 'mlflow.db'}")
        assert f"cannot create the MLflow store in folder {folder} (Permission denied)" in str(e.value)
    finally:
        folder.chmod(0o755)


# the store created by a process that lacks root's CAP_DAC_OVERRIDE: the folder's mode then denies it (EACCES)
_NO_DAC_SCRIPT = r"""
import errno, sys
from pipeline.errors import PipelineError
from pipeline.store import ensure_store
try:
    ensure_store(f"sqlite:///{sys.argv[1]}/mlflow.db")
except PipelineError as e:  # raised `from None`: the OSError it reports is still its __context__
    print("RESULT", errno.errorcode.get(getattr(e.__context__, "errno", None), "-"), e)
"""


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="test_read_only_folder_is_refused_by_name covers EACCES for a normal user")
def test_read_only_folder_as_root_without_dac_override(tmp_path):
    """As root a 0o555 folder does not deny: create the store as root without CAP_DAC_OVERRIDE (setpriv, as
    tests/test_artifact.py does), which the folder's mode then refuses with the real EACCES."""
    import shutil

    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed: cannot drop CAP_DAC_OVERRIDE")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    script = tmp_path / "create.py"
    script.write_text(_NO_DAC_SCRIPT)
    try:
        r = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable,
                            str(script), str(folder)], capture_output=True, text=True, timeout=WAIT_S, cwd=REPO)
    finally:
        folder.chmod(0o755)
    assert r.returncode == 0 and "RESULT" in r.stdout, (r.stdout + r.stderr)[-3000:]
    code, msg = r.stdout.split("RESULT ", 1)[1].strip().split(" ", 1)
    assert code == "EACCES", r.stdout  # the errno itself, as a normal user gets it
    assert f"cannot create the MLflow store in folder {folder} (Permission denied)" in msg, msg
    assert list(folder.iterdir()) == []  # nothing half-made left behind


def test_the_schema_head_read_from_the_revision_files_is_alembics(tmp_path):
    """The check of an existing store compares its revision with the head read from MLflow's revision files'
    text (no MLflow import); that head is alembic's own, and any file form the reader does not know sends the
    check back to alembic (None), as do two heads."""
    from pipeline.store import _schema_revisions, head_of_revision_files, migration_head_from_files

    assert migration_head_from_files() == _schema_revisions()[0]

    def revision(name: str, body: str) -> None:
        (tmp_path / f"{name}.py").write_text(f'"""{name}"""\nfrom alembic import op\n\n{body}\n')

    revision("a", 'revision = "aaaa"\ndown_revision = None')
    revision("b", "revision = 'bbbb'\ndown_revision = 'aaaa'")
    revision("c", 'revision: str = "cccc"\ndown_revision: Union[str, None] = "bbbb"')
    assert head_of_revision_files(tmp_path) == "cccc"
    revision("d", 'revision = "dddd"\ndown_revision = "bbbb"')  # a second head
    assert head_of_revision_files(tmp_path) is None
    revision("e", 'revision = "eeee"\ndown_revision = ("cccc", "dddd")')  # their merge: a form it leaves to alembic
    assert head_of_revision_files(tmp_path) is None
