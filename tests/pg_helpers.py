"""A real PostgreSQL 15 server for tests and benchmarks: the Debian server binaries (scripts/install.sh makes sure of
them), ``initdb`` into a temp folder the ``postgres`` user owns (``initdb`` refuses root), listening on 127.0.0.1
and a free port only (its unix socket in that folder too, never the system's), password login over TCP, one
database for MLflow. Stopped by its postmaster's pid (SIGINT: PostgreSQL's fast shutdown; SIGKILL after a
timeout) and its folder removed.

    with Postgres.start() as pg:          # or the ``postgres`` fixture of a test module
        uri = pg.uri                      # postgresql://ksm:<password>@127.0.0.1:<port>/mlflow

Skipped (``pytest.skip``) when the binaries are missing or there is no ``postgres`` user, so a fresh machine says
why instead of failing; on CI (``CI`` set) that is an error: the install step should have provided them.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("KSM_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"  # the OS user the server runs as (initdb refuses root)
DB, ROLE = "mlflow", "ksm"


def missing() -> str | None:
    """Why a PostgreSQL cannot be started here, or None."""
    if not (PG_BIN / "initdb").is_file() or not (PG_BIN / "postgres").is_file():
        return f"PostgreSQL server binaries not in {PG_BIN} (scripts/install.sh installs postgresql-15)"
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return f"no '{PG_USER}' user (the postgresql-15 package creates it)"
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != PG_USER:
        return "starting PostgreSQL as the postgres user needs root (runuser)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "no psycopg (pip install -e .[postgres])"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(argv: list[str]) -> list[str]:
    return argv if os.geteuid() != 0 else ["runuser", "-u", PG_USER, "--", *argv]


@dataclass
class Postgres:
    folder: Path
    port: int
    password: str
    pid: int  # the postmaster's
    proc: subprocess.Popen | None = None  # what started it (runuser), reaped once the postmaster is gone

    @property
    def uri(self) -> str:
        """The MLflow backend store URI (password included: pass it through the environment only)."""
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{DB}"

    @classmethod
    def start(cls, fast: bool = True, max_connections: int = 200, tries: int = 3) -> "Postgres":
        """initdb + start + create the MLflow database; ``fast``: no fsync (tests; a benchmark passes False)."""
        why = missing()
        if why:
            import pytest

            if os.environ.get("CI"):
                pytest.fail(f"CI: {why}")
            pytest.skip(why)
        folder = Path(tempfile.mkdtemp(prefix="ksm-pg-", dir="/tmp"))  # /tmp: the postgres user can reach it
        try:
            data = folder / "data"
            password = secrets.token_urlsafe(18)
            pwfile = folder / "pw"
            pwfile.write_text(password + "\n")
            os.chmod(folder, 0o700)
            if os.geteuid() == 0:
                pw = pwd.getpwnam(PG_USER)
                for p in (folder, pwfile):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
            subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", ROLE, "--pwfile", str(pwfile),
                                         "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                                         "--locale=C", *(["--no-sync"] if fast else [])]),
                           check=True, capture_output=True, text=True, timeout=120)
            pwfile.unlink()
            opts = ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={folder}",
                    "-c", f"max_connections={max_connections}", "-c", "shared_buffers=64MB"]
            if fast:
                opts += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
            last = ""
            for _ in range(tries):  # a port taken between _free_port and the bind: another port
                port = _free_port()
                log = folder / "postgres.log"
                proc = subprocess.Popen(_as_postgres([str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port),
                                                      *opts]),
                                        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
                pg = cls._wait_ready(folder, data, port, password, proc)
                if pg is not None:
                    return pg
                last = log.read_text()[-2000:]
            raise RuntimeError(f"PostgreSQL did not start:\n{last}")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @classmethod
    def _wait_ready(cls, folder: Path, data: Path, port: int, password: str, proc: subprocess.Popen,
                    timeout: float = 60) -> "Postgres | None":
        import psycopg

        deadline = time.monotonic() + timeout
        pid = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # exited: the port was taken, or a bad option
                return None
            try:
                pid = int((data / "postmaster.pid").read_text().split()[0])
                with psycopg.connect(host="127.0.0.1", port=port, user=ROLE, password=password, dbname="postgres",
                                     autocommit=True, connect_timeout=2) as con:
                    con.execute(f"CREATE DATABASE {DB}")
                return cls(folder, port, password, pid, proc)
            except (OSError, ValueError, IndexError, psycopg.OperationalError):
                time.sleep(0.2)
        if pid:
            _stop_pid(pid)
        proc.kill()
        proc.wait()
        return None

    def stop(self) -> None:
        """Fast shutdown by the postmaster's pid, then the folder is removed."""
        try:
            _stop_pid(self.pid)
            if self.proc is not None:
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:  # runuser lingering after its child: end it by its own pid
                    self.proc.kill()
                    self.proc.wait()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _stop_pid(pid: int, timeout: float = 30) -> None:
    """SIGINT to the postmaster (fast shutdown: ends every session, checkpoints, exits with its children); SIGKILL
    if it has not gone within ``timeout``."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 10)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def postgres_fixture(scope: str = "module"):
    """A pytest fixture (``postgres = postgres_fixture()`` in a test module): one PostgreSQL for the module."""
    import pytest

    @pytest.fixture(scope=scope)
    def postgres():
        pg = Postgres.start()
        try:
            yield pg
        finally:
            pg.stop()

    return postgres
