"""Shared test set-up. Ray must bind loopback only (ARCHITECTURE.md, "Known traps")."""
import os
import platform
import subprocess

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# `make test` runs two xdist workers beside Ray workers and drivers on 2 cores: OpenMP threads that spin while they
# wait for work (GOMP's default) then burn the time slices the other processes need (a 2.4 s test took 45 s in the
# suite). Passive waiting, for this process and every process it starts; set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# one intra-op thread per xdist worker (two workers share the 2 cores), two in a plain serial run
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
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
    config.addinivalue_line("markers", "own_processes: its cost is processes it starts and waits on (drivers, servers, "
                                       "a `ray start` head), never Ray in the pytest process: `make test` runs it on "
                                       "any xdist worker, beside the in-process group (see pytest_collection_modifyitems)")
    # pytest-xdist registers it too; said here so that a plain `pytest` without xdist accepts it under --strict-markers
    config.addinivalue_line("markers", "xdist_group(name): tests of one group run on one xdist worker, in order")


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


# ------------------------------------------------------------------------------- the fast tier starts nothing
# A test not marked `slow` may start no process (Ray, an MLflow server, a CLI run), in its body or in any fixture
# it sets up, whatever the fixture's scope (a module- or session-scoped fixture is set up inside the setup of the
# first test that needs it): `make test-fast` relies on it. Popen is guarded for the whole session and consults
# the test whose setup or call runs now; such a test fails, naming itself and the command, instead of silently
# slowing the fast tier. (Teardown is left out: a session fixture a slow test started ends in whichever test's
# teardown comes last.)
_fast_item: pytest.Item | None = None  # the test being set up or run now, when it is not marked slow
_real_popen_init = subprocess.Popen.__init__


def _fast_tests_start_nothing(self, args, *a, **kw):
    if _fast_item is not None:
        pytest.fail(f"{_fast_item.nodeid} starts a process ({args!r:.200}), in its body or a fixture of any scope: "
                    "mark it @pytest.mark.slow", pytrace=False)
    return _real_popen_init(self, args, *a, **kw)


subprocess.Popen.__init__ = _fast_tests_start_nothing  # from conftest's import on: before any test or fixture runs


def _guarding(item):
    """While a test's setup or call runs: the guard above knows it, unless it is marked slow."""
    global _fast_item
    _fast_item = None if item.get_closest_marker("slow") else item
    try:
        yield
    finally:
        _fast_item = None


pytest_runtest_setup = pytest.hookimpl(hookwrapper=True)(_guarding)
pytest_runtest_call = pytest.hookimpl(hookwrapper=True)(_guarding)


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


@pytest.hookimpl(tryfirst=True)  # before xdist's own (registered later, so called first): it reads the groups set here
def pytest_collection_modifyitems(session, config, items):
    """Order, keeping each group in collection order: (0) tests that do not use the shared runtime (they start
    their own Ray, a multi-node Cluster or subprocesses, or assert that Ray is not running); (1) tests on the
    shared runtime; (2) tests that only read the shared tiny sequence; (3) tests that add to it
    (`@pytest.mark.mutates_tiny_sequence`), last, in collection order. Ray is started once, after group 0, and kept
    until no test that uses it is left (the session's end; under xdist, its worker's first test of another group);
    the sequence is read in the state its readers assert.

    Under pytest-xdist (`make test`: `-n 2 --dist loadgroup`) the slow tests that may run Ray in this process form
    two xdist groups, each run by one worker in the order above: RAY_DOWN (group 0's) and RAY_HERE (groups 1-3).
    Neither waits for the other (the one queue of 590 s they made was the suite's critical path). The tests that only
    wait on their own processes (`@pytest.mark.own_processes`, one group per module so a module's fixtures start
    once) and the fast tests fill both workers around them. Two workers, not three: the suite is bound by CPU (the
    processes it starts), and a third worker made it slower and timed Ray's start-up out (benchmarks/RESULTS.md)."""
    def group(item) -> int:
        if not _uses_shared_ray(item):
            return 0
        if item.get_closest_marker("mutates_tiny_sequence"):
            return 3
        return 2 if "tiny_sequence" in item.fixturenames else 1

    # stable: collection order within a group. In group 0 the slow tests come before the fast ones: xdist hands out
    # its units (an xdist group, or one ungrouped test) biggest count first, ties in this order, so a one-test
    # group of a minute (own:test_images_e2e) is not handed out last, behind 300 fast tests, with the other worker
    # already idle; the fast tests then fill both workers' ends.
    items[:] = sorted(items, key=lambda item: (group(item), item.get_closest_marker("slow") is None))
    for item in items:
        if item.get_closest_marker("own_processes"):
            item.add_marker(pytest.mark.xdist_group(f"own:{item.module.__name__}"))
        elif item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group(RAY_HERE if _uses_shared_ray(item) else RAY_DOWN))


_groups_lost: str | None = None  # why xdist's groups did not hold in this worker, when they did not


def pytest_collection_finish(session):
    """Under `--dist loadgroup`, every grouped test's node id must carry its group: when it does not (pytest 9.2
    with pytest-xdist 3.8, pytest-dev/pytest-xdist#1386) xdist schedules every test alone, silently; the shared
    runtime and tiny sequence are then built once per worker and the order above is lost. Each grouped test then
    fails at once with the reason (a worker's own error would be lost: the controller only says it has none)."""
    global _groups_lost
    if not getattr(session.config.option, "loadgroup", False):  # set by xdist in its workers only
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        _groups_lost = (f"pytest-xdist did not apply the xdist groups ({len(lost)} tests): this pytest/pytest-xdist "
                        "pair ignores --dist loadgroup; install the versions pyproject.toml pins (make install)")


@pytest.fixture(autouse=True)
def _xdist_groups_held(request):
    if _groups_lost and request.node.get_closest_marker("xdist_group"):
        pytest.fail(_groups_lost, pytrace=False)


# The two xdist groups of slow tests that hold Ray in the pytest process. RAY_HERE's tests share the session's
# runtime and tiny sequence, in the order above. RAY_DOWN's need this process's Ray down when they start (their
# own multi-node `Cluster`, a `ray start` head beside an embedded run, "fails before Ray starts"): a worker of
# their own runs them meanwhile, which halves the longest worker's queue (RESULTS.md, "Suite time").
RAY_HERE, RAY_DOWN = "in_process", "ray_down"


@pytest.fixture(autouse=True)
def _ray_down_tests_start_with_ray_down(request):
    """Under xdist the worker that ran RAY_HERE (handed out first: it is the biggest group) goes on with other
    groups and fast tests, with the shared runtime still up; several of those assert that this process's Ray is
    down (RAY_DOWN's, "fails before Ray starts"). A test that does not use the shared runtime ends it first: no
    RAY_HERE test follows on that worker, and the session fixture's own shutdown then does nothing. (A serial run
    orders every such test before RAY_HERE: this never fires there.)"""
    if not _uses_shared_ray(request.node):
        import sys

        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    yield


@pytest.fixture(autouse=True)
def _own_processes_start_no_ray_here(request, _ray_down_tests_start_with_ray_down):  # that one first: it may end Ray
    """An `own_processes` test may run on the worker that holds the shared runtime, or on one that runs the
    Ray-down tests next: it must leave this process's Ray as it found it (never start it here)."""
    if not request.node.get_closest_marker("own_processes"):
        yield
        return
    import sys

    def up() -> bool:
        ray = sys.modules.get("ray")
        return bool(ray is not None and ray.is_initialized())

    before = up()
    yield
    assert up() == before, f"{request.node.nodeid} is marked own_processes but started Ray in the pytest process"


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
