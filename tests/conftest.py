"""Shared test set-up. Ray must bind loopback only (ARCHITECTURE.md, "Known traps")."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


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


@pytest.fixture(scope="module")
def ray_local():
    """An embedded Ray runtime on 2 CPUs for a test module (the pipeline's ray_session reuses it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
