"""Issue #23, the serving / secrets / cluster half: a request, a URI or a name from outside must never run the
served model out of memory, leak a credential, or open the tracking server to whoever reaches it.

Each test feeds the real hostile input to the real part: the served model (``served.MultiTaskModel``, loaded from a
real backbone and real task artifacts, in this process and behind a real ``mlflow models serve``), the tracking
server from ``cluster/start_mlflow_server.sh`` with MLflow's basic-auth app on 127.0.0.1, the pipeline's own
probe and config checks, and whole ``python run_pipeline.py`` runs whose console, ``outputs/``, MLflow store and
Ray logs are searched for the passwords they were given. Every process a test starts is ended by its own id.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import tracemalloc
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from data_helpers import build_model_dir
from test_cluster import CLUSTER_DIR, VENV_BIN, Proc, compose, free_port, serve_on_a_free_port

from pipeline.config import resolve
from pipeline.validation import validate
from pipeline.errors import PipelineError
from pipeline.served import BadRequest, MultiTaskModel

# servers, drivers and a served model of its own: nothing here runs Ray in the pytest process
pytestmark = pytest.mark.own_processes

ROOT = Path(__file__).resolve().parents[1]
# the admin's password: '/' and '@' are what a sed mask or a URL parser cut in two
ADMIN_PASSWORD = "adm/in@pw-" + secrets.token_hex(6)
SHARD_PASSWORD = "shard-pw-" + secrets.token_hex(6)
TINY = ["benchmark.num_tasks=3", "benchmark.caps.train=200", "benchmark.caps.test=60",
        "benchmark.initial_caps.train=400", "benchmark.initial_caps.test=100", "train.epochs=1",
        "train.backbone.epochs=1", "model.width=0.0625", "progress=false", "cluster.num_cpus=1",
        "tracking.system_metrics_s=0"]
SHARDS = ["benchmark.shard.max_samples=64"]  # t2's train split: 4 shards, one of which is corrupted


def _has_fashion_mnist() -> bool:
    from pipeline.data.sources import DEBIAN_FASHION_MNIST

    return DEBIAN_FASHION_MNIST.is_dir()


needs_data = pytest.mark.skipif(not _has_fashion_mnist(), reason="needs dataset-fashion-mnist")


# ------------------------------------------------------------------------------------------ the served model
LIMITS = {"max_rows": 1024, "max_pixels": 1024 * 28 * 28}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The model loaded as MLflow loads it (load_context), with request limits recorded in its spec."""
    root = build_model_dir(tmp_path_factory.mktemp("served") / "ksm", LIMITS)
    model = MultiTaskModel()
    model.load_context(SimpleNamespace(artifacts={"ksm": str(root)}, model_config={}))
    return model


def _peak_bytes(fn) -> tuple[int, object]:
    """Peak bytes numpy and Python allocated while ``fn`` ran (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001  (the caller looks at what was raised)
        out = e
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak, out


def test_a_request_over_the_models_limits_is_refused_before_any_conversion(served):
    """More rows or pixels than the spec's limits: refused with the numbers and the limit, before any work. A
    REST request's pixels (an object array: 8 bytes a pixel) of a shape its task does not take are refused without
    being converted (before the fix: float64 copies of the whole request, then the shape check)."""
    grey = np.zeros((LIMITS["max_rows"] + 1, 28, 28), np.uint8)
    with pytest.raises(BadRequest) as e:
        served.predict(None, {"task": np.array(["grey"] * len(grey)), "image": grey})
    assert "1025 rows" in str(e.value) and "at most 1024" in str(e.value) and "split" in str(e.value)
    big = np.zeros((900, 32, 32, 3), np.uint8)  # 2.8M pixels > 1024*28*28
    with pytest.raises(BadRequest) as e:
        served.predict(None, {"task": np.array(["rgb"] * 900), "image": big})
    assert "2764800 pixels" in str(e.value) and f"at most {LIMITS['max_pixels']}" in str(e.value)

    wrong = np.zeros((1000, 20, 20), dtype=object)  # as JSON arrives: 400k Python ints, 3.2 MB of pointers
    peak, err = _peak_bytes(lambda: served.predict(None, {"task": np.array(["grey"] * 1000), "image": wrong}))
    assert isinstance(err, BadRequest) and "row 0 (task 'grey'): image is 20x20" in str(err)
    assert peak < wrong.nbytes / 20, f"{peak} bytes allocated to refuse a {wrong.nbytes}-byte request"


def test_json_pixels_are_converted_row_by_row_not_as_one_float64_copy(served):
    """A valid REST-shaped request (an object array) gives the same classes as its uint8 form, and converting it
    costs a fraction of the request itself (before the fix: about 2.5x it, in float64 copies and masks)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8)
    tasks = rng.choice(["base", "grey"], 1000)
    want = served.predict(None, {"task": tasks, "image": images})
    as_json = np.empty(images.shape, dtype=object)
    as_json[...] = images.astype(int)  # Python ints, as MLflow's JSON parsing makes them
    peak, got = _peak_bytes(lambda: served.predict(None, {"task": tasks, "image": as_json}))
    assert isinstance(got, np.ndarray) and np.array_equal(got, want)
    assert peak < as_json.nbytes / 2, f"{peak} bytes to convert a {as_json.nbytes}-byte request"


@pytest.mark.parametrize("value, words", [("7", ["a str", "'7'"]), (True, ["a bool", "True"]),
                                          (None, ["a NoneType"]), ([1, 2], ["a list"])])
def test_pixels_that_are_not_numbers_are_refused_naming_the_row(served, value, words):
    """Over REST "7" and true were taken for pixels (numpy casts them to 7.0 and 1.0): refused, naming the row,
    the task and what was found."""
    image = np.empty((4, 28, 28), dtype=object)
    image[...] = 0
    image[2, 5, 6] = value
    with pytest.raises(BadRequest) as e:
        served.predict(None, {"task": np.array(["grey", "base", "grey", "base"]), "image": image})
    msg = str(e.value)
    assert "row 2 (task 'grey')" in msg and "pixels must be uint8 (whole numbers 0..255)" in msg, msg
    for w in words:
        assert w in msg, msg


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _vm_hwm_kb(pid: int) -> int:
    """Peak resident memory of a process (VmHWM), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


@pytest.mark.slow
def test_mlflow_models_serve_answers_oversized_and_non_numeric_requests_with_http_400(tmp_path):
    """The model saved as export packages it, served by a real `mlflow models serve` on 127.0.0.1: a request over
    the spec's rows, and pixels "7" or true, get HTTP 400 naming the limit or the row; a good one still answers."""
    import mlflow

    from pipeline.export import model_files

    root = build_model_dir(tmp_path / "ksm", {"max_rows": 64, "max_pixels": 64 * 28 * 28})
    model_dir = tmp_path / "model"
    mlflow.pyfunc.save_model(str(model_dir), **model_files(tmp_path / "pkg", root))
    port = free_port()
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = Proc([str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
                 "-h", "127.0.0.1", "-p", str(port)], tmp_path / "serve.log", env=env)
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/ping", timeout=240)
        url = f"http://127.0.0.1:{port}/invocations"
        good = np.random.default_rng(0).integers(0, 256, (4, 28, 28)).tolist()
        status, answer = _post(url, json.dumps({"inputs": {"task": ["grey", "base", "grey", "base"],
                                                           "image": good}}).encode())
        assert status == 200 and len(answer["predictions"]) == 4
        bad = [[[0] * 28 for _ in range(28)] for _ in range(4)]
        bad[1][0][0] = "7"
        status, answer = _post(url, json.dumps({"inputs": {"task": ["grey"] * 4, "image": bad}}).encode())
        assert status == 400 and "row 1 (task 'grey')" in answer["message"] and "'7'" in answer["message"], answer
        bad[1][0][0] = True
        status, answer = _post(url, json.dumps({"inputs": {"task": ["grey"] * 4, "image": bad}}).encode())
        assert status == 400 and "row 1 (task 'grey')" in answer["message"] and "bool" in answer["message"], answer

        rows = 2000  # 31x the model's max_rows: a 4.7 MB body
        body = json.dumps({"inputs": {"task": ["grey"] * rows, "image": [[[255] * 28] * 28] * rows}}).encode()
        workers = _descendants(proc.p.pid) or [proc.p.pid]
        before = {p: _vm_hwm_kb(p) for p in workers}
        status, answer = _post(url, body)
        grew = max(_vm_hwm_kb(p) - before[p] for p in workers)
        print(f"[serve] a {len(body) / 1e6:.1f} MB request of {rows} rows: HTTP {status}; the server's peak RSS "
              f"grew {grew / 1024:.0f} MB")
        assert status == 400 and "2000 rows" in answer["message"] and "at most 64" in answer["message"], answer
        status, answer = _post(url, json.dumps({"inputs": {"task": ["grey"] * 4, "image": good}}).encode())
        assert status == 200  # still serving
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("override, key, value", [
    ("run_name=../x", "run_name", "../x"),
    ("run_name=a/b", "run_name", "a/b"),
    ("run_name=..", "run_name", ".."),
    ("registry.model_name=\"it's\"", "registry.model_name", "it's"),
    ("registry.model_name=a/b", "registry.model_name", "a/b"),
])
def test_a_run_name_or_model_name_that_escapes_outputs_or_breaks_a_filter_is_refused(tmp_path, override, key, value):
    """run_name names folders under outputs/ (../ escaped it) and registry.model_name goes into the registry's
    filter (a quote broke it, so every rerun registered a new version): both are checked before any work."""
    rc = resolve(compose([f"paths.root={tmp_path}", override]))
    with pytest.raises(PipelineError) as e:
        validate(rc)
    msg = str(e.value)
    assert f"{key}={value!r}" in msg and "letters, digits" in msg, msg
    assert not any(tmp_path.iterdir())  # nothing written
    validate(resolve(compose([f"paths.root={tmp_path}", "run_name=my-run_2.b", "registry.model_name=served-1"])))


# ------------------------------------------------------------------------------------------- the cluster files
def _k8s(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER_DIR / name).read_text()) if d]


def test_the_cluster_files_turn_authentication_on_and_fence_the_tracking_server():
    """The MLflow Deployment runs the basic-auth app with its secrets from a Secret, a NetworkPolicy lets only the
    Ray pods reach it, every Ray pod signs in to it from a Secret, and both Ray configs use Ray's token auth."""
    docs = _k8s("k8s-mlflow.yaml")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KSM_MLFLOW_AUTH"] == "basic"
    server_secrets = {s["secretRef"]["name"] for s in c.get("envFrom", [])}
    assert server_secrets, "the admin password and the secret key come from a Secret"
    pol = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert pol["spec"]["podSelector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = pol["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [5000]
    assert all("podSelector" in f for f in rule["from"])  # pods of this namespace only, not the world

    job = next(d for d in _k8s("rayjob.yaml") if d["kind"] == "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    for pod in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for ctr in pod["template"]["spec"]["containers"]:
            refs = {s["secretRef"]["name"] for s in ctr.get("envFrom", [])}
            assert refs and not refs & server_secrets, ctr["name"]  # the client's login, not the admin's secrets
    ray_labels = {"ray.io/is-ray-node": "yes"}
    assert any(f["podSelector"].get("matchLabels") == ray_labels for f in rule["from"])

    cfg = yaml.safe_load((CLUSTER_DIR / "ray-cluster.yaml").read_text())
    for cmd in [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert "~/.ray/auth_token" in cfg["cluster_synced_files"]  # the head's token reaches every worker
    assert any("get-auth-token --generate" in c for c in cfg["head_setup_commands"])


# ------------------------------------------------------------------------------ the tracking server, with auth
def _auth_server(store: Path, log: Path, port: int, **extra: str) -> Proc:
    env = {**os.environ, "KSM_MLFLOW_DIR": str(store), "KSM_MLFLOW_PORT": str(port), "KSM_MLFLOW_WORKERS": "1",
           "MLFLOW": str(VENV_BIN / "mlflow"), "KSM_MLFLOW_AUTH": "basic",
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, **extra}
    for k in ("KSM_MLFLOW_HOST", "KSM_MLFLOW_AUTH_CACHE_S", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        env.pop(k, None)
    return Proc(["bash", str(CLUSTER_DIR / "start_mlflow_server.sh")], log, env=env, cwd=store.parent)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("auth-server")
    store = work / "store"
    proc, port = serve_on_a_free_port(lambda p: _auth_server(store, work / "mlflow.log", p), "/health")
    try:
        yield SimpleNamespace(uri=f"http://127.0.0.1:{port}", port=port, store=store, proc=proc, log=work / "mlflow.log")
    finally:
        proc.stop()


def _get(url: str, auth: tuple[str, str] | None = None, method: str = "GET", data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, method=method)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_the_tracking_server_refuses_whoever_has_no_login(auth_server):
    """With KSM_MLFLOW_AUTH=basic nobody without a login reads runs, uploads an artifact or registers a model;
    the admin (MLFLOW_TRACKING_USERNAME/PASSWORD, which MLflow's client reads itself) does. The backend URI is on
    no process's command line and the admin password in no file of the store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    u = auth_server.uri
    assert _get(f"{u}/health") == 200
    assert _get(f"{u}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _get(f"{u}/api/2.0/mlflow-artifacts/artifacts/planted/code.py", method="PUT", data=b"import os") == 401
    assert _get(f"{u}/api/2.0/mlflow/registered-models/create", method="POST", data=b'{"name": "x"}') == 401
    assert _get(f"{u}/api/2.0/mlflow/experiments/search?max_results=1", ("admin", "wrong-password-123")) == 401
    assert _get(f"{u}/api/2.0/mlflow/experiments/search?max_results=1", ("admin", ADMIN_PASSWORD)) == 200
    # a worker keeps a checked login for KSM_MLFLOW_AUTH_CACHE_S (30 s): the cache is keyed by the password, so a
    # wrong one right after the right one is still checked, and refused
    assert "auth_cache_ttl_seconds = 30" in (auth_server.store / "basic_auth.ini").read_text()
    assert _get(f"{u}/api/2.0/mlflow/experiments/search?max_results=1", ("admin", "wrong-password-123")) == 401
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        with pytest.raises(MlflowException):
            MlflowClient(u).search_experiments()
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
        assert MlflowClient(u).search_experiments() is not None
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    group = [auth_server.proc.p.pid, *_descendants(auth_server.proc.p.pid)]
    cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode() for p in group
                if Path(f"/proc/{p}/cmdline").exists()]
    assert cmdlines and not [c for c in cmdlines if "mlflow.db" in c or "--backend-store-uri" in c], cmdlines
    _nowhere([ADMIN_PASSWORD], [auth_server.store], "the server's store")


@pytest.mark.slow
def test_the_server_script_masks_a_password_holding_slash_and_at(tmp_path):
    """A PostgreSQL URI whose password holds '/' and '@' (the script's sed mask let those through): printed as
    postgresql://***@host/db, the password nowhere in the output. Nothing listens on port 1: the script's check of the
    store fails, naming the masked URI (MLflow's own traceback printed a piece of the password as the host)."""
    uri = "postgresql://ksm:pa/ss@w0rd@127.0.0.1:1/mlflow"
    env = {**os.environ, "KSM_MLFLOW_DIR": str(tmp_path), "KSM_MLFLOW_PORT": str(free_port()),
           "KSM_MLFLOW_WORKERS": "1", "MLFLOW": str(VENV_BIN / "mlflow"), "KSM_MLFLOW_BACKEND_STORE_URI": uri}
    env.pop("KSM_MLFLOW_HOST", None)
    out = subprocess.run(["bash", str(CLUSTER_DIR / "start_mlflow_server.sh")], env=env, capture_output=True,
                         text=True, timeout=120, start_new_session=True)
    text = out.stdout + out.stderr
    assert "[mlflow] backend postgresql://***@127.0.0.1:1/mlflow" in text, text[-2000:]
    assert "pa/ss" not in text and "w0rd" not in text, text[-2000:]
    assert out.returncode == 2 and "error: cannot open the PostgreSQL store postgresql://***@" in text, text[-2000:]


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_used_and_never_shown(auth_server):
    """A credentialed tracking URI (the form MLflow's client accepts) passes the probe; a wrong password fails it
    within seconds, naming the host and the login variables, never the password (the probe took
    'user:password@127.0.0.1' for a host name and printed the URI whole)."""
    from pipeline.probes import check_tracking_uri

    quoted = urllib.parse.quote(ADMIN_PASSWORD, safe="")
    check_tracking_uri(f"http://admin:{quoted}@127.0.0.1:{auth_server.port}")
    wrong = "wrong-pw-" + secrets.token_hex(4)
    with pytest.raises(PipelineError) as e:
        check_tracking_uri(f"http://admin:{wrong}@127.0.0.1:{auth_server.port}")
    msg = str(e.value)
    assert f"127.0.0.1:{auth_server.port}" in msg and "401" in msg and "MLFLOW_TRACKING_USERNAME" in msg, msg
    assert wrong not in msg
    down = free_port()
    with pytest.raises(PipelineError) as e:
        check_tracking_uri(f"http://admin:{wrong}@127.0.0.1:{down}")
    assert f"127.0.0.1:{down}" in str(e.value) and "not reachable" in str(e.value) and wrong not in str(e.value)


def _nowhere(words: list[str], places: list[Path], what: str) -> None:
    """None of ``words`` (nor their URL-quoted forms) in any file under ``places``."""
    forms = {w.encode() for w in words} | {urllib.parse.quote(w, safe="").encode() for w in words}
    found = []
    for place in places:
        for p in [place] if place.is_file() else place.rglob("*"):
            if p.is_file() and not p.is_symlink():
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                found += [f"{p}: {f.decode()}" for f in forms if f in data]
    assert not found, f"a password in {what}: {found[:5]}"


@pytest.fixture(scope="module")
def published_shards(tmp_path_factory):
    """The tiny stream's shards written to a folder (in this process) with one train shard of t2 corrupted, and
    served by `python -m http.server` (which ignores the login the URL carries; curl sends it)."""
    from pipeline.data import Manifest, ensure_shards

    work = tmp_path_factory.mktemp("published")
    folder = work / "shards"
    rc = resolve(compose([f"paths.root={work}", f"paths.shards={folder}", *TINY, *SHARDS]))
    ensure_shards(rc.benchmark, str(folder), log=lambda s: None)
    m = Manifest.load(next(folder.rglob("manifest.json")))
    bad = Path(m.url(m.task("t2").shards["train"][1]))
    data = bytearray(bad.read_bytes())
    data[512 * 3 + 128 + 400] ^= 0x01  # a pixel of its first sample: the tar stays readable, the sha256 does not
    bad.write_bytes(bytes(data))
    proc, port = serve_on_a_free_port(lambda p: Proc([sys.executable, "-m", "http.server", str(p), "--bind",
                                                      "127.0.0.1", "--directory", str(folder)],
                                                     work / "http.log"), "/")
    try:
        yield SimpleNamespace(port=port, bad=bad.relative_to(folder).as_posix())
    finally:
        proc.stop()


def _pipeline(root: Path, overrides: list[str], env: dict[str, str], ray_tmp: Path) -> str:
    argv = [sys.executable, str(ROOT / "run_pipeline.py"), f"paths.root={root}", *TINY, *overrides]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1",
           "RAY_TMPDIR": str(ray_tmp), **env}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        if k not in env or not env[k]:
            env.pop(k, None)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=900)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = out.decode(errors="replace")
    n = len(list(root.glob("console-*.log")))
    (root / f"console-{n}.log").write_text(text)  # kept with the test's files: what each run printed
    assert p.returncode == 0, text[-4000:]
    return text


@pytest.mark.slow
@needs_data
def test_a_sequence_with_logins_from_the_environment_and_in_urls_leaks_them_nowhere(auth_server, published_shards,
                                                                                     tmp_path):
    """A real `python run_pipeline.py` against the basic-auth server, signing in from MLFLOW_TRACKING_USERNAME/
    PASSWORD, its shards read through a URL that carries a login (a `pipe:curl` template) with one corrupt shard
    skipped; then the same sequence again with the login in tracking.uri itself. Both succeed; neither password
    is in the console, under outputs/ (Hydra's saved config included), in the server's store or in Ray's logs,
    while the dataset source and the skipped shard still name the shard server."""
    from mlflow import MlflowClient

    ray_tmp = Path(tempfile.mkdtemp(prefix="ksm-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        shards = f"pipe:curl -s -f http://ksm:{SHARD_PASSWORD}@127.0.0.1:{published_shards.port}/{{rel}}"
        common = ["tracking=server", f"paths.shards='{shards}'", "data.on_corrupt=skip", *SHARDS]
        quoted = urllib.parse.quote(ADMIN_PASSWORD, safe="")
        first = _pipeline(tmp_path, [*common, f"tracking.uri={auth_server.uri}"],
                          {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}, ray_tmp)
        assert "mean test accuracy" in first and "[export] registered model" in first
        again = _pipeline(tmp_path, [*common, f"tracking.uri=http://admin:{quoted}@127.0.0.1:{auth_server.port}"],
                          {}, ray_tmp)
        assert "reused" in again and f"http://***@127.0.0.1:{auth_server.port}" in again  # the end's UI line

        words = [ADMIN_PASSWORD, SHARD_PASSWORD]
        for name, text in (("the first run's console", first), ("the second run's console", again)):
            for w in words:
                assert w not in text and urllib.parse.quote(w, safe="") not in text, name
        _nowhere(words, [tmp_path / "outputs"], "outputs/")
        _nowhere(words, [auth_server.store], "the tracking server's store")
        _nowhere(words, [ray_tmp], "Ray's session logs")
        saved = list((tmp_path / "outputs" / "hydra").rglob(".hydra/config.yaml"))
        assert len(saved) == 2  # the record of each run is kept, redacted
        assert any(f"http://***@127.0.0.1:{auth_server.port}" in p.read_text() for p in saved)

        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
        try:
            client = MlflowClient(auth_server.uri)
            exp = client.get_experiment_by_name("ksm")
            runs = client.search_runs([exp.experiment_id], "tags.ksm_kind = 'task'")
        finally:
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(k, None)
        assert sorted(r.data.tags["ksm_task"] for r in runs) == ["t1", "t2"]
        t2 = next(r for r in runs if r.data.tags["ksm_task"] == "t2")
        assert t2.data.tags["ksm_skipped_shards"].endswith(published_shards.bad), t2.data.tags
        assert f"http://***@127.0.0.1:{published_shards.port}/" in t2.data.tags["ksm_skipped_shards"]
        sources = [json.loads(i.dataset.source)["uri"] for r in runs for i in r.inputs.dataset_inputs]
        assert sources and all(f"http://***@127.0.0.1:{published_shards.port}/tasks/" in s for s in sources), sources
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)



def test_the_tune_follow_up_command_masks_a_password(tmp_path):
    """Tune prints the command that runs the sequence with the best values, made of the run's own overrides: a
    password in tracking.uri is shown masked there."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from pipeline.tune.outputs import follow_up

    secret = "s3cr/t@pw"
    uri = f"postgresql://ksm:{urllib.parse.quote(secret, safe='/@')}@127.0.0.1:5432/mlflow"
    root = Path(__file__).resolve().parent.parent
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["mode=tune", f"tracking.uri={uri}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        cmd = follow_up(tmp_path / "best.yaml")
    finally:
        HydraConfig.instance().cfg = None
    assert "tracking.uri=postgresql://***@127.0.0.1:5432/mlflow" in cmd and "s3cr" not in cmd and "mode=" not in cmd
