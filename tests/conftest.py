"""Shared test set-up. Ray must bind loopback only (ARCHITECTURE.md, "Known traps")."""
import os
import platform

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
# platform.uname() runs `uname -p` in a subprocess the first time its processor field is read, then caches it;
# code that MLflow imports unpacks it. Read here, once, so that whichever fast test happens to import that first
# does not trip the fast tier's no-process guard below (it did, for tests/test_tune.py run alone).
platform.processor()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "mutates_tiny_sequence: adds runs to the session's shared tiny sequence (run "
                                       "after every test that only reads it; see pytest_collection_modifyitems)")


def pytest_sessionstart(session):
    """On CI the install step must have provided the real data: a test that skips for want of it there would
    hide a broken install behind a green run."""
    if not os.environ.get("CI"):
        return
    from data_helpers import FOOLBOX_CIFAR
    from pipeline.data.sources import DEBIAN_FASHION_MNIST

    missing = [str(p) for p in (DEBIAN_FASHION_MNIST, FOOLBOX_CIFAR) if not p.is_dir() or not any(p.iterdir())]
    if missing:
        pytest.exit(f"CI: real test data missing ({', '.join(missing)}); scripts/install.sh should have installed "
                    "it (apt-get dataset-fashion-mnist, the foolbox wheel's CIFAR-100 images)", returncode=3)


@pytest.fixture(autouse=True)
def _fast_tests_start_nothing(request, monkeypatch):
    """A test not marked `slow` may start no process (Ray, an MLflow server, a CLI run): `make test-fast` relies
    on it. Such a test fails here, naming the command, instead of silently slowing the fast tier."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import subprocess

    real_init = subprocess.Popen.__init__

    def refuse(self, args, *a, **kw):
        pytest.fail(f"{request.node.nodeid} starts a process ({args!r:.200}): mark it @pytest.mark.slow")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield
    monkeypatch.setattr(subprocess.Popen, "__init__", real_init)


# ------------------------------------------------------------------------------------ one Ray runtime a session
# Starting Ray costs seconds on a 2-core machine, and a tiny sequence trains in seconds: the in-process tests share
# ONE embedded runtime (Ray's own `ray_start_regular_shared` pattern; the pipeline's ray_session reuses it) and ONE
# trained tiny sequence. Tests that need Ray down (their own `Cluster`, "fails before Ray starts") run first: see
# pytest_collection_modifyitems below.
TINY = ["benchmark.num_tasks=3", "benchmark.caps.train=300", "benchmark.caps.test=100",
        "benchmark.initial_caps.train=800", "benchmark.initial_caps.test=200", "train.epochs=2",
        "train.backbone.epochs=2", "model.width=0.0625", "progress=false"]


def _uses_shared_ray(item) -> bool:
    return "ray_local" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """Order, keeping each group in collection order: (0) tests that do not use the shared runtime (they start
    their own Ray, a multi-node Cluster or subprocesses, or assert that Ray is not running); (1) tests on the
    shared runtime; (2) tests that only read the shared tiny sequence; (3) tests that add to it
    (`@pytest.mark.mutates_tiny_sequence`), last, in collection order. Ray is started once, after group 0, and never
    shut down until the session ends; the sequence is read in the state its readers assert."""
    def group(item) -> int:
        if not _uses_shared_ray(item):
            return 0
        if item.get_closest_marker("mutates_tiny_sequence"):
            return 3
        return 2 if "tiny_sequence" in item.fixturenames else 1

    items[:] = sorted(items, key=group)  # stable: collection order within a group


@pytest.fixture(scope="session")
def crash_dir(tmp_path_factory):
    """Where tests/crash_hook.py looks for its `armed` file (test_pipeline's worker-death test arms it)."""
    return tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="session")
def ray_local(crash_dir):
    """The session's embedded Ray runtime on 2 CPUs, no GPU (the pipeline's ray_session reuses it). Every worker
    runs tests/crash_hook.py's set-up hook, which does nothing unless the worker-death test arms it."""
    import ray

    assert not ray.is_initialized(), "a test left Ray initialised before the shared runtime started"
    tests = os.path.dirname(os.path.abspath(__file__))
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "crash_hook.install",
                          "env_vars": {"KSM_TEST_CRASH_DIR": str(crash_dir), "PYTHONPATH": tests}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sequence(tmp_path_factory, ray_local):
    """The default pipeline (`make run`'s, registered model included) on the tiny stream, trained once a session
    on a sqlite store: root, out (what main_from_config returned), uri, client, manifest, the git commit it ran
    at, and MLflow's process-wide URIs before and after the run. Read-only, except for tests marked mutates_tiny_sequence."""
    from pathlib import Path
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from mlflow import MlflowClient
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    import run_pipeline
    from pipeline.data import Manifest
    from pipeline.tracking import git_commit

    def mlflow_globals() -> tuple:
        return (tracking_state._tracking_uri, registry_state._registry_uri,
                *(os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")))

    root = tmp_path_factory.mktemp("tiny-sequence")
    configs = os.path.join(os.path.dirname(os.path.abspath(run_pipeline.__file__)), "configs")
    before = mlflow_globals()
    commit = git_commit(Path(configs).parent)  # HEAD when it ran (others may commit during the session)
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"paths.root={root}"])
    out = run_pipeline.main_from_config(cfg)
    uri = f"sqlite:///{root}/mlflow.db"
    return SimpleNamespace(root=root, out=out, uri=uri, client=MlflowClient(uri, registry_uri=uri),
                           globals_before=before, globals_after=mlflow_globals(), commit=commit,
                           manifest=Manifest.load(next((root / "data" / "shards").rglob("manifest.json"))))
