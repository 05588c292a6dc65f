"""Probes of the outside world the driver runs before any work: the tracking server answers, the Ray address
accepts a connection. Each fails within seconds, naming the address and the fix (a wrong address would otherwise
hang in MLflow's or Ray's own retries for minutes)."""
from __future__ import annotations

import base64
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import PipelineError
from .redact import redact_url, split_userinfo

__all__ = ["check_tracking_uri", "check_ray_address"]

_LOGIN = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment of the driver and of every "
          "Ray node (MLflow's client reads them; never put a password in tracking.uri, it is a config value)")


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, naming the server (never its password), when a tracking server does not
    answer, or refuses the login (MLFLOW_TRACKING_USERNAME/PASSWORD, or user info in the URI itself)."""
    shown = redact_url(uri)
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        # urllib takes 'user:password@host' for a host name: the login is split off and sent as a header instead
        bare, user, password = split_userinfo(uri)
        where = urllib.parse.urlsplit(bare)
        try:
            host = f"{where.hostname}:{where.port or (443 if scheme == 'https' else 80)}"
        except ValueError as e:  # a port that is not a number
            raise PipelineError(f"tracking.uri={shown!r} is not a valid URL ({e}); use http://host:port") from None
        base = bare.rstrip("/")
        try:
            with urllib.request.urlopen(base + "/health", timeout=timeout) as r:  # /health needs no login
                if r.status != 200:
                    raise PipelineError(f"MLflow tracking server {shown} answered {r.status} on /health")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = redact_url(str(getattr(e, "reason", e)))
            raise PipelineError(f"MLflow tracking server {shown} ({host}) is not reachable ({reason}); start it "
                                "(cluster/start_mlflow_server.sh) or fix tracking.uri") from None
        _check_login(base, shown, host, user if user is not None else os.environ.get("MLFLOW_TRACKING_USERNAME"),
                     password if user is not None else os.environ.get("MLFLOW_TRACKING_PASSWORD"), timeout)
    elif scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(f"tracking.uri={uri}: cannot create folder {path.parent} ({e}); "
                                "set paths.root or tracking.uri to a writable place") from None
    elif scheme not in ("file", "", "databricks", "postgresql", "mysql", "mssql"):
        raise PipelineError(f"tracking.uri={shown!r} has an unsupported scheme {scheme!r}; use sqlite:///abs/path.db "
                            "or http://host:port")


def _check_login(base: str, shown: str, host: str, user: str | None, password: str | None, timeout: float) -> None:
    """One read that needs a login on a server with authentication (MLflow's basic-auth app): a missing or wrong
    login fails here, in seconds, instead of in the first job's first call. A server without auth answers 200."""
    req = urllib.request.Request(base + "/api/2.0/mlflow/experiments/search?max_results=1")
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        if e.code == 401:
            said = f"refused the login of user {user!r}" if user is not None else "needs a login"
            raise PipelineError(f"MLflow tracking server {shown} ({host}) {said} (HTTP 401); {_LOGIN}") from None
        if e.code == 403:  # signed in; the permissions of each call are the server's to check
            return
        raise PipelineError(f"MLflow tracking server {shown} ({host}) answered HTTP {e.code} to a search; is it an "
                            "MLflow server?") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise PipelineError(f"MLflow tracking server {shown} ({host}) is not reachable "
                            f"({redact_url(str(getattr(e, 'reason', e)))})") from None


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
