"""Probes of the outside world the driver runs before any work: the tracking server answers, the Ray address
accepts a connection. Each fails within seconds, naming the address and the fix (a wrong address would otherwise
hang in MLflow's or Ray's own retries for minutes)."""
from __future__ import annotations

import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import PipelineError

__all__ = ["check_tracking_uri", "check_ray_address"]


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, naming the URI, when a tracking server does not answer."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status != 200:
                    raise PipelineError(f"MLflow tracking server {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise PipelineError(f"MLflow tracking server {uri} is not reachable ({reason}); start it "
                                "(cluster/start_mlflow_server.sh) or fix tracking.uri") from None
    elif scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(f"tracking.uri={uri}: cannot create folder {path.parent} ({e}); "
                                "set paths.root or tracking.uri to a writable place") from None
    elif scheme not in ("file", "", "databricks", "postgresql", "mysql", "mssql"):
        raise PipelineError(f"tracking.uri={uri!r} has an unsupported scheme {scheme!r}; use sqlite:///abs/path.db "
                            "or http://host:port")


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """For host:port and ray://host:port addresses, a TCP connect with a timeout (ray.init itself can hang for
    a minute on a wrong address). 'local' and 'auto' need no check."""
    if address in ("local", "auto", "", None):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"cluster.address={address!r} is not local, auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise PipelineError(f"Ray cluster at {address} is not reachable ({e}); check cluster.address / RAY_ADDRESS "
                            "(`ray status` on the head node shows the address)") from None
