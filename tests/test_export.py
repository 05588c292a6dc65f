"""The served multi-task model (pipeline/served.py, pipeline/export.py) and what each task run tells MLflow about
itself (dataset inputs, system metrics, source tags, the experiment's kind).

Fast tests build a served model by hand (a real backbone and real task artifacts, no store) and check its
preprocessing against the loader's and its answers to bad requests. Slow tests run a tiny real sequence (embedded
Ray, MLflow on a sqlite file, real Fashion-MNIST shards), load the registered model through the Model Registry and
serve it over REST with `mlflow models serve` on 127.0.0.1.
"""
from __future__ import annotations

import ast
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import run_pipeline
from data_helpers import build_model_dir
from pipeline.data import Manifest, iter_samples, load_source
from pipeline.data.transforms import BatchTransform
from pipeline.data.sources import DEBIAN_FASHION_MNIST
from pipeline.jobs import split_digest
from pipeline.served import BadRequest, MultiTaskModel, eval_transform
from pipeline.tracking import EXPERIMENT_KIND
from test_cluster import Proc, serve_on_a_free_port

ROOT = Path(run_pipeline.__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
TINY = ["benchmark.num_tasks=3", "benchmark.caps.train=300", "benchmark.caps.test=100",
        "benchmark.initial_caps.train=800", "benchmark.initial_caps.test=200", "train.epochs=2",
        "train.backbone.epochs=2", "model.width=0.0625", "progress=false"]
NAME = "split_fashion_mnist-ksm"  # the default run name: the registered model's default name

needs_fashion = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                   reason="Fashion-MNIST not installed; `apt-get install dataset-fashion-mnist`")


# ---------------------------------------------------------------------------------------------- fast tests
@pytest.fixture(scope="module")
def fashion_test():
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed; `apt-get install dataset-fashion-mnist`")
    return load_source({"name": "fashion_mnist"}, "test")


@needs_fashion
def test_the_served_transform_is_the_loaders_eval_transform_bit_for_bit(fashion_test):
    """served.py repeats the loader's eval transform (it must stand alone in the model): same bits, on real
    Fashion-MNIST (28x28 grey, resized to 32, to 3 channels) and on a shrink and a 3-channel case."""
    x = torch.from_numpy(fashion_test.x[:300].copy())
    mean, std = [0.29, 0.29, 0.29], [0.35, 0.35, 0.35]
    for size, channels, images in [(32, 3, x), (16, 3, x), (32, 1, x.expand(-1, -1, -1, 3).contiguous())]:
        m = mean[:channels]
        s = std[:channels]
        want, _ = BatchTransform(m, s, image_size=size, channels=channels, train=False, flip=False)(
            (images, torch.zeros(len(images), dtype=torch.long)), torch.Generator())
        got = eval_transform(images, torch.tensor(m).view(1, -1, 1, 1), torch.tensor(s).view(1, -1, 1, 1), size, channels)
        assert torch.equal(got, want), (size, channels)


def test_the_served_model_code_imports_nothing_from_the_pipeline():
    """served.py is copied into every model as its code, with ksm_core beside it: it must import nothing else of
    ours, so a model loads where only torch, numpy, safetensors and MLflow are installed."""
    tree = ast.parse((ROOT / "pipeline" / "served.py").read_text())
    mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    mods += [n.module or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    assert {m.split(".")[0] for m in mods} <= {"__future__", "json", "threading", "pathlib", "typing", "numpy",
                                               "torch", "mlflow", "safetensors", "ksm_core"}


def test_the_models_entry_file_is_checked_in_and_ends_by_setting_the_model():
    """MLflow's models from code: export logs pipeline/served_model.py as it is (no code written at export), and
    its last statement hands MLflow the model; it imports only MLflow and the served code."""
    from pipeline.export import SERVED_CODE, SERVED_ENTRY

    tree = ast.parse(SERVED_ENTRY.read_text())
    assert SERVED_ENTRY == ROOT / "pipeline" / "served_model.py" and SERVED_CODE == ROOT / "pipeline" / "served.py"
    assert ast.unparse(tree.body[-1]) == "set_model(MultiTaskModel())"
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods == {"mlflow.models", "served", "pipeline.served"}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import)]
    # nothing of the pipeline imports it (that would register a model as a side effect)
    def names(n: ast.AST) -> list[str]:
        if isinstance(n, ast.ImportFrom):
            return [n.module or "", *(a.name for a in n.names)]
        return [a.name for a in n.names] if isinstance(n, ast.Import) else []

    importers = [p.name for p in (ROOT / "pipeline").rglob("*.py")
                 if any(m.endswith("served_model") for n in ast.walk(ast.parse(p.read_text())) for m in names(n))]
    assert importers == []


@needs_fashion
def test_the_saved_model_runs_its_own_copy_of_the_served_code_and_answers_as_it(tmp_path, fashion_test):
    """The model as export packages it, saved and loaded through MLflow in this process: it holds the entry file
    and, in code/, served.py byte for byte, the loaded model is the copy of served.py in the model (not the
    repository's pipeline.served), and it answers a mixed request as MultiTaskModel loaded by hand."""
    from pipeline.export import SERVED_CODE, SERVED_ENTRY, model_files

    root = build_model_dir(tmp_path / "ksm", random_heads=True)
    path = tmp_path / "model"
    mlflow.pyfunc.save_model(str(path), **model_files(tmp_path / "pkg", root))
    assert (path / "code" / "served.py").read_bytes() == SERVED_CODE.read_bytes()
    assert (path / "served_model.py").read_bytes() == SERVED_ENTRY.read_bytes()  # MLflow keeps it at the root
    assert (path / "code" / "ksm_core" / "artifact.py").is_file() and not list(path.rglob("__pycache__"))
    loaded = mlflow.pyfunc.load_model(str(path))
    inner = loaded.unwrap_python_model()
    assert type(inner).__name__ == "MultiTaskModel" and type(inner).__module__ == "served"
    # (a model loaded earlier in this process may have put its own copy in sys.modules first: the same file)
    assert Path(sys.modules[type(inner).__module__].__file__).parts[-2:] == ("code", "served.py")

    by_hand = MultiTaskModel()
    by_hand.load_context(SimpleNamespace(artifacts={"ksm": str(root)}, model_config={}))
    tasks = np.random.default_rng(0).choice(["base", "grey"], size=24)
    request = {"task": tasks, "image": fashion_test.x[:24, ..., 0]}
    want = by_hand.predict(None, request)
    assert np.array_equal(loaded.predict(request), want) and len(set(want.tolist())) > 1


@pytest.fixture(scope="module")
def hand_model(tmp_path_factory, fashion_test):
    """A served model built by hand: a real (untrained) backbone, a grey 28x28 task and a colour 32x32 task whose
    artifacts are real ksm_core artifacts; loaded through MultiTaskModel.load_context as MLflow would."""
    root = build_model_dir(tmp_path_factory.mktemp("served") / "ksm", random_heads=True)
    model = MultiTaskModel()
    threads = torch.get_num_threads()
    try:
        model.load_context(SimpleNamespace(artifacts={"ksm": str(root)}, model_config={"batch_size": 7, "threads": 1}))
        assert torch.get_num_threads() == 1 and model.batch_size == 7
    finally:
        torch.set_num_threads(threads)
    return model


@needs_fashion
def test_mixed_rows_are_grouped_by_task_and_answer_as_each_task_alone(hand_model, fashion_test):
    m = hand_model
    grey = fashion_test.x[:40]
    rng = np.random.default_rng(0)
    tasks = rng.choice(["base", "grey"], size=40)
    mixed = m.predict(None, {"task": tasks, "image": grey[..., 0]})  # (N, H, W): a grey task's 2-D images
    assert mixed.dtype == np.int64 and mixed.shape == (40,)
    for t, k in (("base", 3), ("grey", 2)):
        rows = np.flatnonzero(tasks == t)
        alone = m.predict(None, {"task": np.array([t] * len(rows)), "image": grey[rows]})  # (N, H, W, 1)
        assert np.array_equal(mixed[rows], alone) and alone.max() < k
    assert m.predict(None, {"task": np.array([], dtype=str), "image": np.zeros((0, 28, 28), np.uint8)}).shape == (0,)
    # over REST the pixels arrive as JSON numbers (an object array): whole numbers 0..255 are accepted
    as_json = np.array(grey[:5].tolist(), dtype=object)
    assert np.array_equal(m.predict(None, {"task": tasks[:5], "image": as_json}), mixed[:5])
    colour = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert m.predict(None, {"task": np.array(["rgb"] * 3), "image": colour}).max() < 4


def _with(a: np.ndarray, where: tuple, value) -> np.ndarray:
    a[where] = value
    return a


@needs_fashion
def test_bad_requests_name_the_row_and_the_expected_form(hand_model, fashion_test):
    m = hand_model
    grey = fashion_test.x[:4]
    cases = [
        ({"task": np.array(["grey", "base", "nope", "grey"]), "image": grey},
         ["row 2", "unknown task 'nope'", "base, grey, rgb"]),
        ({"task": np.array(["grey", "rgb", "grey", "grey"]), "image": grey},
         ["row 1 (task 'rgb')", "image is 28x28x1", "expected uint8 32x32x3"]),
        ({"task": np.array(["base"] * 4), "image": grey[:, :20]},
         ["row 0 (task 'base')", "image is 20x28x1", "uint8 28x28 or 28x28x1"]),
        ({"task": np.array(["grey"] * 4), "image": grey.astype(np.float32) / 255},
         ["row 0 (task 'grey')", "must be uint8", "float32"]),
        ({"task": np.array(["grey"] * 4), "image": grey.astype(np.int64)}, ["row 0", "must be uint8", "int64"]),
        ({"task": np.array(["base", "grey", "grey", "base"]),
          "image": np.array([r.tolist() for r in grey[:2]] + [(grey[2] + 300.0).tolist(), grey[3].tolist()],
                            dtype=object)}, ["row 2 (task 'grey')", "must be uint8"]),
        ({"task": np.array(["grey"] * 4), "image": _with(np.array(grey.tolist(), dtype=object), (1, 3, 3, 0), "x")},
         ["row 1 (task 'grey')", "not numbers", "a str ('x')"]),
        ({"task": np.array(["grey"] * 3), "image": grey}, ["N = 3 rows", "(4, 28, 28, 1)"]),
        ({"image": grey}, ['"task"', "keys ['image']"]),
    ]
    for request, words in cases:
        with pytest.raises(BadRequest) as e:
            m.predict(None, request)
        for w in words:
            assert w in str(e.value), (w, str(e.value))
    assert isinstance(e.value, ValueError) and e.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400


# ---------------------------------------------------------------------------------------------- slow tests
def _config(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.root={root}", *overrides])


def _run(root: Path, *overrides: str) -> dict:
    return run_pipeline.main_from_config(_config(root, *overrides))


@pytest.fixture(scope="module")
def sequence(tiny_sequence):
    """TINY's default run, trained once a session (tests/conftest.py; test_pipeline's `first` reads it too): root,
    out, uri, client, manifest and MLflow's process-wide URIs (globals_before/after) around the run."""
    assert tiny_sequence.uri == f"sqlite:///{tiny_sequence.root}/mlflow.db"
    return tiny_sequence


@pytest.fixture
def registry(sequence):
    """mlflow.pyfunc.load_model('models:/...') reads the process-wide tracking/registry URIs: point them at the
    sequence's store for the test, then back."""
    before, before_reg = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(sequence.uri)
    mlflow.set_registry_uri(sequence.uri)
    yield sequence
    mlflow.set_tracking_uri(before)
    mlflow.set_registry_uri(before_reg)


def _mixed_test_images(m: Manifest, tasks: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every real test image of the tasks, rows of different tasks shuffled together: (task, image, label)."""
    names, images, labels = [], [], []
    for t in tasks:
        for _, image, label in iter_samples(m, t, "test"):
            names.append(t)
            images.append(image)
            labels.append(label)
    order = np.random.default_rng(0).permutation(len(names))
    return np.array(names)[order], np.stack(images)[order], np.array(labels)[order]


def _logged_acc(s, task: str) -> float:
    exp = s.client.get_experiment_by_name("ksm").experiment_id
    kind = "backbone" if task == s.manifest.initial_task else "task"
    runs = s.client.search_runs([exp], f"tags.ksm_kind = '{kind}' and tags.ksm_task = '{task}' "
                                       "and attributes.status = 'FINISHED'")
    return runs[0].data.metrics["test_acc"]


@pytest.mark.slow
def test_the_registered_model_predicts_mixed_tasks_with_their_logged_accuracy(registry):
    s = registry
    versions = s.client.search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["task", "image"] and sig.outputs.input_names() == ["class"]
    assert "uint8 array (N, H, W) or (N, H, W, C)" in versions[0].description
    tasks = [s.manifest.initial_task, *s.manifest.new_tasks]
    assert len(tasks) >= 3
    names, images, labels = _mixed_test_images(s.manifest, tasks)
    assert len(set(names[:10])) > 1  # really mixed within one call
    pred = model.predict({"task": names, "image": images[..., 0]})  # grey (N, 28, 28)
    for t in tasks:
        rows = names == t
        assert (pred[rows] == labels[rows]).mean() == _logged_acc(s, t), t  # the same images, the same accuracy
    with pytest.raises(mlflow.exceptions.MlflowException, match="row 0: unknown task 'nope'"):
        model.predict({"task": np.array(["nope"]), "image": images[:1]})

    # the model holds safetensors and JSON, and its code: nothing of ours pickled
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    ours = {f for f in files if f.startswith("artifacts/")}
    assert ours == {"artifacts/ksm/backbone.safetensors", "artifacts/ksm/ksm_model.json",
                    *(f"artifacts/ksm/tasks/{t}.safetensors" for t in s.manifest.new_tasks)}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".cloudpickle"))]
    assert "code/ksm_core/artifact.py" in files


@pytest.mark.slow
def test_task_runs_log_their_datasets_system_metrics_and_source(sequence):
    s = sequence
    exp = s.client.get_experiment_by_name("ksm")
    assert exp.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1] == "custom_model_development"
    runs = s.client.search_runs([exp.experiment_id], "tags.ksm_kind = 'task'")
    assert sorted(r.data.tags["ksm_task"] for r in runs) == s.manifest.new_tasks
    commit = s.commit  # HEAD when the sequence ran (tests/conftest.py's tiny_sequence)
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-t", str(commit)], capture_output=True, text=True)
    assert known.stdout.strip() == "commit", (commit, known.stderr)  # a real commit of this checkout, not None
    for r in runs:
        t = r.data.tags["ksm_task"]
        info = s.manifest.task(t)
        inputs = {i.tags[0].value: i.dataset for i in r.inputs.dataset_inputs}
        assert set(inputs) == {"train", "test"}
        for split, d in inputs.items():
            assert d.name == t and d.digest == split_digest(s.manifest, t, split)
            assert json.loads(d.source)["uri"] == str(Path(s.manifest.url(info.split_shards(split)[0])).parent)
            schema = json.loads(d.schema)
            assert schema["ksm"] == {"image_shape": list(info.image_shape), "dtype": "uint8",
                                     "classes": list(info.class_names)}
            assert json.loads(d.profile)["num_rows"] == info.counts[split]
        assert "system/cpu_utilization_percentage" in r.data.metrics  # a short job still gets its one point
        assert "system/system_memory_usage_megabytes" in r.data.metrics
        assert r.data.tags["mlflow.source.name"].endswith("run_pipeline.py")
        assert r.data.tags["mlflow.source.git.commit"] == commit  # the tests run in a git checkout: never skipped
    # the export's fluent MLflow calls left this process's URIs as they were (unset stays unset)
    assert s.globals_after == s.globals_before
    export = s.client.search_runs([exp.experiment_id], "tags.ksm_kind = 'export'")
    assert len(export) == 1 and export[0].data.params["model_version"] == "1"
    assert export[0].data.tags["ksm_sequence_run"] == s.out["parent_run_id"]
    assert "mlflow.parentRunId" not in export[0].data.tags  # the sequence's children are its tasks


@pytest.mark.slow
@pytest.mark.mutates_tiny_sequence
def test_a_rerun_adds_no_version_and_mode_export_adds_one(registry):
    s = registry
    again = _run(s.root)
    assert {r.status for r in again["results"]} == {"reused"}
    assert [str(v.version) for v in s.client.search_model_versions(f"name = '{NAME}'")] == ["1"]  # nothing changed
    _run(s.root, "mode=export")
    assert sorted(str(v.version) for v in s.client.search_model_versions(f"name = '{NAME}'")) == ["1", "2"]
    names, images, _ = _mixed_test_images(s.manifest, s.manifest.new_tasks)
    one, two = (mlflow.pyfunc.load_model(f"models:/{NAME}/{v}").predict({"task": names, "image": images})
                for v in (1, 2))
    assert np.array_equal(one, two)
    _run(s.root, "mode=export", "registry.model_name=fashion-served")
    assert [str(v.version) for v in s.client.search_model_versions("name = 'fashion-served'")] == ["1"]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _asgi_post(app, path: str, body: dict) -> tuple[int, dict]:
    """One POST to an ASGI app in this process (no HTTP client library needed)."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.mark.slow
def test_mlflow_models_serve_answers_rest_requests_like_the_loaded_model(registry, tmp_path):
    s = registry
    names, images, _ = _mixed_test_images(s.manifest, s.manifest.new_tasks)
    names, images = names[:24], images[:24]
    want = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict({"task": names, "image": images})
    body = {"inputs": {"task": names.tolist(), "image": images[..., 0].tolist()}}
    bad = {"inputs": {"task": [names[0], "nope"], "image": images[:2].tolist()}}

    # the scoring server's own app, in this process
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(mlflow.pyfunc.load_model(f"models:/{NAME}/1"))
    status, answer = _asgi_post(app, "/invocations", body)
    assert status == 200 and answer["predictions"] == want.tolist()
    status, answer = _asgi_post(app, "/invocations", bad)
    assert status == 400 and "row 1: unknown task 'nope'" in answer["message"]

    # the real thing: `mlflow models serve` on loopback, from the registry, in this environment (offline), on a
    # free port: started again on another one when the port was taken between the pick and the server's bind
    env = {**os.environ, "MLFLOW_TRACKING_URI": s.uri, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    proc, port = serve_on_a_free_port(lambda p: _ServeProc(
        [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(p)], tmp_path / f"serve-{p}.log", env=env), "/ping")
    try:
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", body)
        assert status == 200 and answer["predictions"] == want.tolist()
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", bad)
        assert status == 400 and "row 1: unknown task 'nope'" in answer["message"]
    finally:
        _end_group(proc.p)
        proc.stop()  # closes its log; the group is gone already


class _ServeProc(Proc):
    """A `mlflow models serve` process (tests/test_cluster.py's Proc: its own process group) whose start-up
    wait allows for imports, the model's download and load: seconds, minutes on a busy machine."""

    def wait_http(self, url: str, timeout: float = 300.0) -> None:
        super().wait_http(url, timeout)


def _end_group(proc: subprocess.Popen) -> None:
    """End the process group this test started (the server and the uvicorn worker it spawns), by its own id."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for _ in range(40):
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.poll()
                return
            time.sleep(0.25)
        try:
            os.killpg(proc.pid, sig if sig == signal.SIGKILL else signal.SIGTERM)
        except ProcessLookupError:
            return
    proc.wait()


def test_a_long_stream_is_not_exported_at_the_end_of_every_run(tmp_path):
    """Above registry.export_max_tasks the end-of-sequence export is skipped, saying how to export: every export
    copies all task artifacts into a new version (106 s at 1000 tasks), which every append would pay again."""
    from pipeline.config import resolve
    from pipeline.export import export_after_sequence
    from pipeline.records import TaskResult

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        rc = resolve(compose("config", overrides=[f"paths.root={tmp_path}", "registry.export_max_tasks=3"]))
    logs: list[str] = []
    results = [TaskResult(task=f"t{i}", run_id=f"r{i}", status="trained") for i in range(4)]
    assert export_after_sequence(rc, None, None, "parent", "bb", results, logs.append) is None  # touches no store
    assert logs == ["[export] skipped at the end of the sequence: 4 tasks > registry.export_max_tasks=3; register "
                    "them with the same command and mode=export"]
