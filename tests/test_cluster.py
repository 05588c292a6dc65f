"""Issue #6: the same task sequence on a multi-node Ray cluster with a real MLflow tracking server.

Everything here is real, nothing is mocked: a two-node Ray cluster on loopback (``ray.cluster_utils.Cluster``:
a head and a second node with one CPU each, so the jobs have to spread; `ray start` refuses multi-node on
127.0.0.1), a single-node head from the Ray CLI (``ray start --head --block``) whose job API takes the READMEs'
``ray job submit`` command, an ``mlflow server`` started by cluster/start_mlflow_server.sh (sqlite + artifact
proxy), and the shards read over HTTP from ``python -m http.server``. Every process a test starts is ended by its
own id (its process group, or for the Ray head its process tree) at teardown. The cluster-launcher and KubeRay
files are checked against Ray's own schema and against this repository's configs.
"""
from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "cluster"
VENV_BIN = Path(sys.executable).parent

# tiny sizes: 4 new tasks of 200 train / 100 test images, a 1/16-width VGG, one epoch everywhere
TINY = ["benchmark.caps.train=200", "benchmark.caps.test=100", "benchmark.initial_caps.train=400",
        "benchmark.initial_caps.test=200", "train.epochs=1", "train.backbone.epochs=1", "model.width=0.0625",
        "progress=false"]
BENCH = "split_fashion_mnist"


def _has_fashion_mnist() -> bool:
    from pipeline.data.sources import DEBIAN_FASHION_MNIST

    return DEBIAN_FASHION_MNIST.is_dir()


needs_data = pytest.mark.skipif(not _has_fashion_mnist(), reason="needs dataset-fashion-mnist")


# ------------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    """A port nothing listens on right now. Only for addresses that must NOT answer, or through
    :func:`serve_on_a_free_port`: between this call and a server's bind another process may take the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_on_a_free_port(start: Callable[[int], Proc], path: str = "/", tries: int = 3) -> tuple[Proc, int]:
    """Start a server on a free port and wait until it answers; one that exits first (the port was taken in the
    meantime) is started again on another port, up to ``tries`` times."""
    for attempt in range(tries):
        port = free_port()
        proc = start(port)
        try:
            proc.wait_http(f"http://127.0.0.1:{port}{path}")
            return proc, port
        except RuntimeError:
            exited = proc.p.poll() is not None
            proc.stop()
            if not exited or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def compose(overrides: list[str]):
    """The run's config exactly as `python run_pipeline.py <overrides>` composes it."""
    import run_pipeline  # noqa: F401  (registers the ksm_root resolver)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run(overrides: list[str]) -> dict:
    import run_pipeline

    return run_pipeline.main_from_config(compose(overrides))


class Proc:
    """A server subprocess in its own process group, ended (the whole group) through its own pid."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.log = log
        self._f = open(log, "wb")
        self.p = subprocess.Popen(argv, stdout=self._f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)

    def wait_http(self, url: str, timeout: float = 90.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.p.args} exited with {self.p.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{url} did not answer within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGTERM)  # the group: mlflow's uvicorn worker too
        except ProcessLookupError:
            pass
        try:
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(15)
        self._f.close()


def node_tag_keys(run_) -> set[str]:
    return {k for k in run_.data.tags if k.startswith("ksm_")}


def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time in clock ticks, state) of every process on this machine, from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(d)] = (int(st[1]), int(st[19]), st[0])
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_tree(root: int) -> dict[int, int]:
    """root and all its descendants, pid -> start time (so that a reused pid is never taken for one of them)."""
    procs = _procs()
    children = defaultdict(list)
    for pid, (ppid, _, _) in procs.items():
        children[ppid].append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in tree:
            tree[pid] = procs[pid][1]
            todo += children[pid]
    return tree


def still_running(tree: dict[int, int], marker: str | None = None) -> dict[int, str]:
    """The processes of `tree` that still run (zombies excluded), plus any whose command line names `marker`."""
    procs = _procs()
    alive = {pid for pid, start in tree.items() if pid in procs and procs[pid][1] == start and procs[pid][2] != "Z"}
    if marker:
        alive |= {pid for pid, (_, _, state) in procs.items() if state != "Z" and marker in _cmdline(pid)}
    return {pid: _cmdline(pid)[:160] for pid in sorted(alive)}


class RayHead:
    """A single-node Ray cluster from the Ray CLI: `ray start --head --block` with the dashboard and its job API.

    Started the way cluster/README.md starts a head: with this venv active (its `bin` first on PATH), so a job's
    `python` is the venv's. Everything of its own: 127.0.0.1, free ports, a temp dir (Ray writes its
    `ray_current_cluster` file there, not into the shared /tmp/ray) and a token (Ray 2.60's token authentication,
    which `ray start --head` turns on anyway when ~/.ray/auth_token exists; an explicit token keeps the test
    independent of that file). Stopped through its own pid: SIGTERM to `ray start` alone, which stops the GCS,
    raylet and dashboard, the raylet ending its workers (each in a process group of its own); SIGKILL for whatever
    of its process tree outlives that. Never `ray stop`: that would end every Ray on the machine.
    """

    def __init__(self, log_dir: Path, num_cpus: int = 2):
        # short on purpose: Ray's unix socket paths under it must stay below 108 characters
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ksm-rayhead-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.gcs_address = f"127.0.0.1:{free_port()}"
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # what `source .venv/bin/activate` does, and the client side of the token (the CLI reads both variables)
        self.env = {**env, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                    "VIRTUAL_ENV": str(VENV_BIN.parent), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        argv = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_address.rsplit(':', 1)[1]}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                "--dashboard-agent-listen-port=0",  # not the fixed 52365: another Ray on this machine may hold it
                f"--ray-client-server-port={free_port()}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                f"--object-store-memory={200 * 1024**2}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        # no drain on SIGTERM (RayService's grace period): nothing here to drain, stop at once
        self.proc = Proc(argv, log_dir / "ray-head.log", cwd=log_dir,  # not the repository: see the probe job
                         env={**self.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
        self.killed: dict[int, str] = {}
        self._stopped = False

    def api(self, path: str, auth: bool = True) -> dict:
        """GET the job API (JSON) with the cluster's token."""
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        with urllib.request.urlopen(urllib.request.Request(self.address + path, headers=headers), timeout=10) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 60.0) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.p.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.p.returncode}:\n"
                                   f"{self.proc.log.read_text()[-3000:]}")
            try:
                version = self.api("/api/version")
                if (self.temp_dir / "ray_current_cluster").is_file():  # written last: `ray start` is done
                    return version
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.address} did not answer within {timeout}s:\n{self.proc.log.read_text()[-3000:]}")

    def stop(self) -> dict[int, str]:
        """End the head; returns what still ran afterwards (nothing, unless SIGKILL failed)."""
        if self._stopped:
            return {}
        self._stopped = True
        p = self.proc.p
        tree = process_tree(p.pid)  # now, while the raylet's workers are still its children
        p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and still_running(tree, str(self.temp_dir)):
            time.sleep(0.2)
        # `ray start` is our child: until it is reaped its pid, and so its process group id, cannot be reused
        self.killed = still_running(tree, str(self.temp_dir))
        for pid in self.killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(15)
        self.proc._f.close()
        time.sleep(0.2)
        left = still_running(tree, str(self.temp_dir))
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="ksm-cluster-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def shards(workdir) -> Path:
    """The tiny benchmark's shards, written once to a local folder (`mode=shards`)."""
    folder = workdir / "shards"
    run(["mode=shards", f"paths.root={workdir / 'writer'}", f"paths.shards={folder}", *TINY])
    return folder


@pytest.fixture(scope="module")
def shard_server(workdir, shards):
    """`python -m http.server` over the shard folder on 127.0.0.1: paths.shards=<its URL>."""
    proc, port = serve_on_a_free_port(lambda port: Proc(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(shards)],
        workdir / "http.log"))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def mlflow_server(workdir):
    """A real tracking server from cluster/start_mlflow_server.sh (sqlite + --serve-artifacts) on a free port."""
    store = workdir / "mlflow-server"

    def start(port: int) -> Proc:
        env = {**os.environ, "KSM_MLFLOW_DIR": str(store), "KSM_MLFLOW_PORT": str(port), "KSM_MLFLOW_WORKERS": "1",
               "MLFLOW": str(VENV_BIN / "mlflow")}
        env.pop("KSM_MLFLOW_HOST", None)  # the script's default: this machine only
        return Proc(["bash", str(CLUSTER_DIR / "start_mlflow_server.sh")], workdir / "mlflow.log", env=env,
                    cwd=workdir)

    proc, port = serve_on_a_free_port(start, "/health")
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "store": store, "log": proc.log}
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def embedded_run(workdir, shards):
    """The same tiny sequence the default way (embedded Ray, sqlite store): the reference schema."""
    import ray

    assert not ray.is_initialized(), "an earlier test left Ray initialised in this process"
    (workdir / "embedded").mkdir()
    out = run(["cluster=local", "cluster.num_cpus=1", "tracking=local", f"paths.root={workdir / 'embedded'}",
               f"paths.shards={shards}", *TINY])
    assert not ray.is_initialized()
    from mlflow import MlflowClient

    out["client"] = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'embedded' / 'mlflow.db'}")
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on loopback, one CPU each: with one CPU per job, concurrent jobs must use both nodes."""
    import ray
    from ray.cluster_utils import Cluster

    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "tests/conftest.py keeps Ray on 127.0.0.1"
    assert not ray.is_initialized(), "an earlier test left Ray initialised in this process"
    # dashboard_agent_listen_port=0: with ray[default] each node's agent serves HTTP; the head's default port
    # (52365) is often taken by another Ray on this machine, and the agent then retries for ~3.5 s before start-up
    # goes on (add_node already picks a free port)
    small = {"object_store_memory": 80 * 1024**2, "include_dashboard": False, "dashboard_agent_listen_port": 0}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"ksm_head": 1}, **small})
    try:
        cluster.add_node(num_cpus=1, resources={"ksm_worker": 1}, **small)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def ray_head(tmp_path):
    """A `ray start` head; started again on other ports if it exits before it is ready (a port taken between
    free_port() and Ray's bind), up to 3 times."""
    for attempt in range(3):
        head = RayHead(tmp_path)
        try:
            head.wait_ready()
            break
        except RuntimeError:
            exited = head.proc.p.poll() is not None
            head.stop()
            if not exited or attempt == 2:
                raise
    try:
        yield head
    finally:
        head.stop()


# -------------------------------------------------------------------------------------------- the sequence
def documented_submit(readme: Path, after: str) -> list[str]:
    """The `ray job submit ...` command of the first bash block after the line `after` in a README, as argv."""
    text = readme.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(after):], re.S).group(1)
    (cmd,) = [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("ray job submit ")]
    return shlex.split(cmd)


# what a job's `python` is, where it runs and what it sees there
_PROBE = ("import json, os, sys, ksm_core; print('KSM_PROBE', json.dumps({'python': sys.executable, "
          "'cwd': os.getcwd(), 'ksm_core': ksm_core.__file__, 'files': sorted(os.listdir())}))")


@needs_data
@pytest.mark.slow
def test_ray_job_submit_runs_the_sequence_on_a_ray_start_head(ray_head, mlflow_server, shards, tmp_path):
    """The READMEs' submit command through the real job CLI and job API: `ray job submit --address
    http://HEAD:8265 --working-dir . -- python run_pipeline.py cluster=remote cluster.address=auto tracking=server
    tracking.uri=... paths.shards=...` (read from cluster/README.md and README.md, addresses filled in) to a head
    from `ray start --head`, plus this machine's sizes (CPU only, one CPU per job, tiny tasks, a root and run name
    of its own). (First in this section: the module's two-node cluster starts later, so one Ray runs at a time.)"""
    from mlflow import MlflowClient

    from pipeline.data import Manifest
    from pipeline.report import COLUMNS

    head, uri = ray_head, mlflow_server["uri"]
    # the job API wants the cluster's token
    with pytest.raises(urllib.error.HTTPError) as denied:
        head.api("/api/version", auth=False)
    assert denied.value.code == 401
    assert (head.temp_dir / "ray_current_cluster").read_text().strip() == head.gcs_address

    def ray_cli(*args: str, timeout: float) -> tuple[int, str]:
        p = subprocess.run([str(VENV_BIN / "ray"), *args], cwd=ROOT, env=head.env, capture_output=True, text=True,
                           timeout=timeout)
        return p.returncode, p.stdout + p.stderr

    # the documented command, its addresses filled in; both READMEs show the same one
    fill = {"http://HEAD:8265": head.address, "http://TRACKING_HOST:5000": uri, "http://MLFLOW_HOST:5000": uri,
            "SHARDS": str(shards)}
    documented = [re.sub("|".join(map(re.escape, fill)), lambda m: fill[m.group(0)], a)
                  for a in documented_submit(CLUSTER_DIR / "README.md", "### 3. Submit the sequence")]
    assert documented == [re.sub("|".join(map(re.escape, fill)), lambda m: fill[m.group(0)], a)
                          for a in documented_submit(ROOT / "README.md", "## On a cluster")]
    assert documented == ["ray", "job", "submit", "--address", head.address, "--working-dir", ".", "--", "python",
                          "run_pipeline.py", "cluster=remote", "cluster.address=auto", "tracking=server",
                          f"tracking.uri={uri}", f"paths.shards={shards}"]
    submit, entrypoint = documented[1:documented.index("--")], documented[documented.index("--"):]

    # a probe job, not waited for: it runs while the sequence is submitted
    rc, probe_out = ray_cli(*submit, "--no-wait", "--", "python", "-c", _PROBE, timeout=60)
    assert rc == 0, probe_out[-3000:]
    probe_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", probe_out).group(1)

    here = ["cluster.cpus_per_task=1", "cluster.gpus_per_task=0", f"paths.root={tmp_path / 'root'}",
            "run_name=submitted-cli", *TINY, "train.lr_head=1.1e-3"]  # a result of its own on the shared server
    rc, out = ray_cli(*submit, *entrypoint, *here, timeout=180)
    assert rc == 0, out[-5000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", out).group(1)
    assert f"Job '{job_id}' succeeded" in out
    job = head.api(f"/api/jobs/{job_id}")
    assert job["status"] == "SUCCEEDED" and job["driver_exit_code"] == 0, job
    logs = head.api(f"/api/jobs/{job_id}/logs")["logs"]
    assert "[ray] connecting to" in logs and f"Browse the runs: open {uri}" in logs, logs[-3000:]

    # the working dir: the repository without what .gitignore lists, pushed once (the second submit reuses it)
    uploaded = re.search(r"Uploading package gcs://(_ray_pkg_\w+)\.zip", probe_out)
    assert uploaded, probe_out[-3000:]
    head_logs = "".join(f.read_text(errors="replace")
                        for f in (head.temp_dir / "session_latest" / "logs").glob("*.log"))
    pushed = re.search(rf"Pushing file package 'gcs://({uploaded.group(1)})\.zip' \(([\d.]+)MiB\)", head_logs)
    assert pushed, "the head logged no size for the working dir package"
    assert float(pushed.group(2)) < 5, f"the working dir package is {pushed.group(2)} MiB"
    assert job["runtime_env"]["working_dir"] == f"gcs://{pushed.group(1)}.zip"
    for _ in range(150):
        probe = head.api(f"/api/jobs/{probe_id}")
        if probe["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.2)
    probe_logs = head.api(f"/api/jobs/{probe_id}/logs")["logs"]
    assert probe["status"] == "SUCCEEDED", probe_logs[-3000:]
    seen = json.loads(re.search(r"^KSM_PROBE (.*)$", probe_logs, re.M).group(1))
    assert Path(seen["python"]).parent == VENV_BIN, seen["python"]  # `python` is the venv's, from the head's PATH
    pkg = Path(seen["cwd"])
    assert pkg.name == pushed.group(1) and pkg.is_relative_to(head.temp_dir)  # the head's copy, not this checkout
    assert Path(seen["ksm_core"]).is_relative_to(pkg)  # the job imports the uploaded copy, not this checkout
    assert {"run_pipeline.py", "ksm_core", "pipeline", "configs", "cluster"} <= set(seen["files"])
    assert not {".venv", "data", "outputs", "mlruns", "mlflow.db", "mlartifacts", ".cache"} & set(seen["files"])
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    assert size < 10 * 1024**2, f"{pkg} holds {size / 1024**2:.1f} MiB"

    # the per-task table in the job's log
    tasks = Manifest.load(shards / BENCH).new_tasks
    assert f"Sequence 'submitted-cli' ({BENCH}," in logs, logs[-3000:]
    assert re.search(r"^" + r"\s+".join(re.escape(h) for _, h in COLUMNS) + r"\s*$", logs, re.M), logs[-3000:]

    # MLflow: one FINISHED child run per new task, each with its artifact behind the server's proxy
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ksm")
    (parent,) = client.search_runs([exp.experiment_id],
                                   "tags.ksm_kind = 'sequence' and attributes.run_name = 'submitted-cli'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                                       "and attributes.status = 'FINISHED'")
    assert sorted(r.data.tags["ksm_task"] for r in children) == tasks == ["t1", "t2", "t3", "t4"]
    for r in children:
        task = r.data.tags["ksm_task"]
        assert r.info.artifact_uri.startswith("mlflow-artifacts:")
        assert r.data.tags["ksm_node_id"] == job["driver_node_id"]  # trained on this head, its only node
        path = client.download_artifacts(r.info.run_id, f"task/{task}.safetensors", str(tmp_path / "dl" / task))
        assert os.path.getsize(path) == r.data.metrics["artifact_bytes"]
        assert re.search(rf"^{task}\s+.*\s{r.data.metrics['test_acc']:.3f}\s.*trained\s*$", logs, re.M), task

    # teardown, checked: nothing of the head runs any more, and the shared /tmp/ray does not point at it
    left = head.stop()
    print(f"job python {seen['python']}, working dir {pkg} ({pushed.group(2)} MiB package); head stopped, "
          f"SIGKILL needed for: {head.killed or 'nothing'}")
    assert not left, left
    assert not head.temp_dir.exists()
    shared = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    assert not (shared.exists() and shared.read_text().strip() == head.gcs_address)


@needs_data
@pytest.mark.slow
def test_sequence_on_a_two_node_cluster_with_a_tracking_server(embedded_run, ray_cluster, mlflow_server,
                                                               shard_server, workdir, monkeypatch):
    import ray
    from mlflow import MlflowClient
    from safetensors.numpy import load_file

    from ksm_core import KSMNet, evaluate, load_task
    from pipeline.data import Manifest, make_loader
    from pipeline.worker import build_backbone
    from pipeline.config import resolve

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = mlflow_server["uri"]
    assert f"tracking.uri={uri}" in mlflow_server["log"].read_text()  # bound to 127.0.0.1 by default
    root = workdir / "driver"
    overrides = ["cluster=remote", f"cluster.address={ray_cluster.address}", "cluster.cpus_per_task=1",
                 "cluster.gpus_per_task=0", "tracking=server", f"tracking.uri={uri}", f"paths.root={root}",
                 f"paths.shards={shard_server}", *TINY]
    out = run(overrides)
    assert not ray.is_initialized()  # the driver disconnected from the cluster it connected to

    client = MlflowClient(tracking_uri=uri)
    manifest = Manifest.load(f"{shard_server}/{BENCH}")  # the jobs read the shards from this URL too
    assert [r.task for r in out["results"]] == manifest.new_tasks == ["t1", "t2", "t3", "t4"]
    assert all(r.status == "trained" for r in out["results"])

    # every run's artifacts live behind the server's proxy, not in a local folder of the driver or a worker
    task_runs = [client.get_run(r.run_id) for r in out["results"]]
    bb_run = client.get_run(out["backbone_run_id"])
    parent = client.get_run(out["parent_run_id"])
    for r in [bb_run, parent, *task_runs]:
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri
        assert r.info.status == "FINISHED"
    assert not any((root / d).exists() for d in ("mlruns", "mlartifacts", "mlflow.db"))
    stored = {p.name for p in (mlflow_server["store"] / "artifacts").rglob("*.safetensors")}
    assert stored >= {"backbone.safetensors", *(f"{t}.safetensors" for t in manifest.new_tasks)}

    # the jobs ran on both nodes, and each child run of the sequence says on which
    node_ids = {n.node_id for n in ray_cluster.list_all_nodes()}
    ran_on = [r.data.tags["ksm_node_id"] for r in task_runs]
    assert set(ran_on) <= node_ids and len(set(ran_on)) == 2, ran_on
    assert all(r.data.tags.get("mlflow.parentRunId") == out["parent_run_id"] for r in task_runs)

    # every task artifact downloads through the server and loads onto the backbone downloaded from its run,
    # giving the accuracy its job logged
    rc = resolve(compose(overrides))
    dl = workdir / "downloads"
    state = load_file(client.download_artifacts(bb_run.info.run_id, "backbone/backbone.safetensors", str(dl / "bb")))
    bb = build_backbone(rc.model, manifest.task(manifest.initial_task).num_classes, state)
    net = KSMNet.from_backbone(bb)
    assert net.backbone_fingerprint == bb_run.data.tags["ksm_fingerprint"] == out["fingerprint"]
    for r, run_ in zip(out["results"], task_runs):
        path = client.download_artifacts(run_.info.run_id, f"task/{r.task}.safetensors", str(dl / r.task))
        net.set_task(load_task(net, path))
        acc, _ = evaluate(net, make_loader(manifest, r.task, "test", batch_size=64))
        assert acc == pytest.approx(run_.data.metrics["test_acc"], abs=1e-9), r.task

    # the same schema as the embedded run on sqlite: result fields, and each run's param / metric / ksm tag keys
    ref = embedded_run
    ref_client = ref["client"]
    filled = [[{k for k, v in vars(r).items() if v is not None} for r in o["results"]] for o in (out, ref)]
    assert filled[0] == filled[1]  # the same result fields got a value
    ref_tasks = [ref_client.get_run(r.run_id) for r in ref["results"]]
    pairs = [(bb_run, ref_client.get_run(ref["backbone_run_id"])), (parent, ref_client.get_run(ref["parent_run_id"])),
             *zip(task_runs, ref_tasks)]
    for mine, theirs in pairs:
        assert set(mine.data.params) == set(theirs.data.params)
        assert set(mine.data.metrics) == set(theirs.data.metrics)
        assert node_tag_keys(mine) == node_tag_keys(theirs)
    assert not ref_tasks[0].info.artifact_uri.startswith("mlflow-artifacts:")  # the reference is really local
    # ... and the same numbers: the sequence is deterministic wherever it runs
    assert out["fingerprint"] == ref["fingerprint"]
    assert [r.test_acc for r in out["results"]] == [r.test_acc for r in ref["results"]]


# ------------------------------------------------------------------------------------------- URL shards
@pytest.mark.slow
@needs_data
def test_shards_from_a_url(shard_server, shards, tmp_path, capsys):
    """The manifest and every shard read over HTTP (or through a pipe: command) give the same samples as the
    folder; a URL is only read, never written, and verifying it starts no Ray."""
    import numpy as np
    from omegaconf import OmegaConf

    from pipeline.data import ConfigError, Manifest, ensure_shards, iter_samples, make_loader

    local = Manifest.load(shards / BENCH)
    url = f"{shard_server}/{BENCH}"
    for where in (url, url + "/", url + "/manifest.json"):
        m = Manifest.load(where)
        assert m.root == url and m.is_remote and m.path == url + "/manifest.json"
        assert m.to_dict() == local.to_dict()
    assert Manifest.load(m.path).root == url  # what a Ray job receives (str(manifest.path)) loads again
    _, xs, ys = zip(*iter_samples(m, "t2", "test"))
    _, lxs, lys = zip(*iter_samples(local, "t2", "test"))
    np.testing.assert_array_equal(np.stack(xs), np.stack(lxs))
    assert ys == lys
    loader = make_loader(m, "t3", "train", batch_size=64)
    assert sum(len(y) for _, y in loader) == loader.num_samples == 200

    bench = OmegaConf.to_container(compose(TINY).benchmark, resolve=True)
    assert ensure_shards(bench, shard_server, verify="sha256", log=lambda _: None).to_dict() == local.to_dict()
    with pytest.raises(ConfigError, match=rf"no shard manifest at {re.escape(shard_server)}/other/manifest.json; "
                                          r"shards are never written to a URL.*mode=shards"):
        ensure_shards({**bench, "name": "other"}, shard_server, log=lambda _: None)
    with pytest.raises(ConfigError, match=r"were made from another benchmark spec"):
        ensure_shards({**bench, "caps": {"train": 50, "test": 10, "seed": 0}}, shard_server, log=lambda _: None)
    with pytest.raises(ConfigError, match="cannot write the manifest"):
        m.save()
    # mode=shards with a URL verifies the published shards (sha256 over HTTP) instead of writing
    capsys.readouterr()
    out = run(["mode=shards", f"paths.root={tmp_path}", f"paths.shards={shard_server}", *TINY])
    assert out == {"manifest": url + "/manifest.json"}
    assert "[ray]" not in capsys.readouterr().out  # nothing to write: no Ray start-up (seconds) to verify

    # a `pipe:` command template (here `cat`; on a cluster e.g. `aws s3 cp s3://bucket/shards/{rel} -`), given
    # on the command line the way the README shows it (quoted: spaces and braces)
    out = run(["mode=shards", f"paths.root={tmp_path}", f"paths.shards='pipe:cat {shards}/{{rel}}'", *TINY])
    assert out == {"manifest": f"pipe:cat {shards}/{BENCH}/{{rel}}"}
    assert "[ray]" not in capsys.readouterr().out
    piped = Manifest.load(out["manifest"])
    assert piped.url("t1/test-000000.tar") == f"pipe:cat {shards}/{BENCH}/t1/test-000000.tar"
    assert [s[2] for s in iter_samples(piped, "t4", "test")] == [s[2] for s in iter_samples(local, "t4", "test")]


# --------------------------------------------------------------------------------------------- bad input
def _fails_fast(root: Path, overrides: list[str], *needles: str) -> str:
    """The run fails with a message naming the fault, before Ray started and before anything was written (the
    probes run first, each with a timeout of seconds, instead of Ray's or MLflow's minutes of retries)."""
    import ray

    from pipeline.errors import DataError, PipelineError

    assert not ray.is_initialized(), "an earlier test left Ray initialised: the driver would reuse it"
    with pytest.raises((PipelineError, DataError)) as ei:
        run([f"paths.root={root}", *overrides])
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    assert not ray.is_initialized()
    assert not (root / "mlflow.db").exists() and not (root / "data").exists(), sorted(root.iterdir())
    return msg


def test_a_tracking_server_that_is_down_fails_within_seconds(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    msg = _fails_fast(tmp_path, ["cluster=remote", "tracking=server", f"tracking.uri={uri}", *TINY],
                      uri, "not reachable")
    assert "start_mlflow_server.sh" in msg


@needs_data
@pytest.mark.slow  # its `shards` fixture (module scope) writes the tiny stream's shards with `mode=shards`: Ray
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_wrong_ray_address_fails_within_seconds(scheme, shards, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"{scheme}127.0.0.1:{free_port()}"
    _fails_fast(tmp_path, ["cluster=remote", f"cluster.address={address}", "tracking=local", f"paths.shards={shards}",
                           *TINY], f"Ray cluster at {address} is not reachable")


def test_a_shard_url_that_is_down_fails_within_seconds(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/shards"
    _fails_fast(tmp_path, ["cluster=remote", "tracking=local", f"paths.shards={url}", *TINY],
                f"{url}/{BENCH}/manifest.json is not reachable", f"paths.shards={url}")


# --------------------------------------------------------------------------------- launcher and manifests
def _install_sh_torch_pins() -> list[str]:
    m = re.search(r'TORCH_SPEC=\$\{TORCH_SPEC:-"([^"]+)"\}', (ROOT / "scripts" / "install.sh").read_text())
    assert m, "scripts/install.sh sets TORCH_SPEC"
    return m.group(1).split()


def test_ray_up_config_validates_against_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER_DIR / "ray-cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))  # what `ray up` does: merge the provider's defaults, then validate
    validate_config(cfg)
    types = cfg["available_node_types"]
    head, workers = types[cfg["head_node_type"]], [v for k, v in types.items() if k != cfg["head_node_type"]]
    assert cfg["provider"]["type"] == "aws"
    gpu_families = ("g4", "g5", "g6", "p3", "p4", "p5")  # AWS instance families with NVIDIA GPUs
    assert head["resources"] == {"CPU": 0} and not head["node_config"]["InstanceType"].startswith(gpu_families)
    assert len(workers) == 1 and workers[0]["node_config"]["InstanceType"].startswith(gpu_families)
    assert 1 <= workers[0]["min_workers"] < workers[0]["max_workers"] <= cfg["max_workers"]  # autoscaling
    # the validator is real: an unknown key or a wrong type is refused
    with pytest.raises(jsonschema.ValidationError):
        validate_config({**cfg, "setup_comands": []})
    with pytest.raises(jsonschema.ValidationError):
        validate_config({**cfg, "max_workers": "four"})


def test_ray_up_config_installs_this_project_from_its_files():
    import ray

    cfg = yaml.safe_load((CLUSTER_DIR / "ray-cluster.yaml").read_text())
    (remote, local), = cfg["file_mounts"].items()
    assert (ROOT / local / "pyproject.toml").is_file() and ".gitignore" in cfg["rsync_filter"]
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install -q -e ." in setup and remote in setup
    for pin in _install_sh_torch_pins():  # the same torch as scripts/install.sh
        assert f'"{pin}"' in setup, pin
    assert f'"ray[default]=={ray.__version__}"' in setup  # nodes run the Ray this project is tested with
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert cmd.startswith(f"source {remote}/.venv/bin/activate && ")  # jobs' `python` is the venv's


def _k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER_DIR / name).read_text()) if d]


def test_rayjob_manifest_runs_this_repos_entrypoint():
    import ray

    from pipeline.config import resolve
    from pipeline.validation import validate

    docs = _k8s_docs("rayjob.yaml")
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "run_pipeline.py"]
    wd = Path(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"])
    overrides = argv[2:]
    for o in overrides:
        key, _, value = o.partition("=")
        if (ROOT / "configs" / key).is_dir():  # a config group: its option file exists
            assert (ROOT / "configs" / key / f"{value}.yaml").is_file(), o
    assert {"cluster=remote", "cluster.address=auto", "tracking=server"} <= set(overrides)
    assert any(o.startswith("tracking.uri=http://") for o in overrides)
    rc = resolve(compose(overrides))  # Hydra accepts every override (unknown keys would raise)
    validate(rc)
    assert rc.cluster.gpus_per_task > 0 and rc.tracking.uri.startswith("http://")

    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and gpu_groups[0]["minReplicas"] >= 1 and gpu_groups[0]["maxReplicas"] > gpu_groups[0]["minReplicas"]
    # the shard folder is the same shared volume on the head and the GPU workers
    shard_dir = Path(rc.paths.shards)
    for pod in [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in gpu_groups)]:
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        assert any(shard_dir.is_relative_to(m) for m in mounts), mounts
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims["ksm-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]

    # every pod runs the image of cluster/Dockerfile, which holds the repo at the job's working_dir
    images = {c["image"] for pod in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in pod["template"]["spec"]["containers"]}
    assert len(images) == 1
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile and f"WORKDIR {wd}" in dockerfile
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        for s in src.split():
            assert (ROOT / s).exists(), s
    assert (ROOT / "run_pipeline.py").is_file() and "run_pipeline.py" in dockerfile
    for pin in _install_sh_torch_pins():
        assert pin in dockerfile


def test_k8s_mlflow_runs_the_start_script_behind_a_service():
    docs = {d["kind"]: d for d in _k8s_docs("k8s-mlflow.yaml")}
    job = next(d for d in _k8s_docs("rayjob.yaml") if d["kind"] == "RayJob")
    svc, dep = docs["Service"], docs["Deployment"]
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"
    assert f"tracking.uri=http://{host}" in job["spec"]["entrypoint"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"][-1] == "/home/ray/ksm/cluster/start_mlflow_server.sh"
    script = (CLUSTER_DIR / "start_mlflow_server.sh").read_text()
    env = {e["name"]: e["value"] for e in c["env"]}
    assert all(name in script for name in env)
    assert any(re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), host)
               for p in env["KSM_MLFLOW_ALLOWED_HOSTS"].split(","))  # the server accepts the Service's name


@pytest.mark.slow
def test_start_script_defaults_to_loopback_sqlite_and_the_artifact_proxy(tmp_path):
    script = (CLUSTER_DIR / "start_mlflow_server.sh").read_text()
    assert subprocess.run(["bash", "-n", str(CLUSTER_DIR / "start_mlflow_server.sh")]).returncode == 0
    assert "HOST=${KSM_MLFLOW_HOST:-127.0.0.1}" in script
    assert "sqlite:///$DIR/mlflow.db" in script and "postgresql://" in script
    assert "--serve-artifacts" in script and "--default-artifact-root mlflow-artifacts:/" in script
    bad = subprocess.run(["bash", str(CLUSTER_DIR / "start_mlflow_server.sh")], capture_output=True, text=True,
                         env={**os.environ, "MLFLOW": str(VENV_BIN / "mlflow"), "KSM_MLFLOW_PORT": "50OO",
                              "KSM_MLFLOW_DIR": str(tmp_path)}, timeout=30)
    assert bad.returncode == 2 and "KSM_MLFLOW_PORT=50OO is not a port number" in bad.stderr
    bad = subprocess.run(["bash", str(CLUSTER_DIR / "start_mlflow_server.sh")], capture_output=True, text=True,
                         env={**os.environ, "MLFLOW": str(VENV_BIN / "mlflow"), "KSM_MLFLOW_AUTH_CACHE_S": "30s",
                              "KSM_MLFLOW_DIR": str(tmp_path)}, timeout=30)
    assert bad.returncode == 2 and "KSM_MLFLOW_AUTH_CACHE_S=30s is not a number of seconds" in bad.stderr
