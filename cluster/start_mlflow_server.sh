#!/usr/bin/env bash
# Start the MLflow tracking server that the driver and every Ray worker log to.
#
#   cluster/start_mlflow_server.sh                      # sqlite + local artifact store, on 127.0.0.1:5000
#   KSM_MLFLOW_HOST=10.0.0.5 cluster/start_mlflow_server.sh   # reachable from the cluster's private network
#
# Runs in the foreground (`exec`: the server keeps this script's pid); use nohup/tmux/systemd to keep it up.
# Settings (environment variables; anything after the script's name is passed on to `mlflow server`):
#   KSM_MLFLOW_HOST           interface to bind                 default 127.0.0.1 (this machine only).
#                             Other nodes need an address they can reach: the node's private IP, or 0.0.0.0.
#                             The server has no authentication: never expose it beyond a private network.
#   KSM_MLFLOW_PORT           port                              default 5000
#   KSM_MLFLOW_DIR            folder for the default stores     default ~/ksm-mlflow (outside the repo, so
#                             `ray job submit --working-dir .` never uploads the server's data)
#   KSM_MLFLOW_BACKEND_STORE_URI   runs, params, metrics        default sqlite:///$KSM_MLFLOW_DIR/mlflow.db
#                             PostgreSQL: postgresql://USER:PASSWORD@DBHOST:5432/mlflow
#                             (then `pip install psycopg2-binary` where the server runs)
#   KSM_MLFLOW_ARTIFACTS_DESTINATION  where the server stores artifacts  default $KSM_MLFLOW_DIR/artifacts
#                             (or s3://bucket/prefix, gs://..., with that store's client library installed
#                             on the server only: workers upload through the server, never to the store)
#   KSM_MLFLOW_WORKERS        uvicorn worker processes          default 2
#   KSM_MLFLOW_ALLOWED_HOSTS  Host headers the server accepts   default: MLflow's (localhost, private IPs).
#                             Set it when clients use a DNS name, e.g. a Kubernetes service:
#                             "mlflow,mlflow:5000,mlflow.*"
#   MLFLOW                    the mlflow executable             default: mlflow on PATH
#
# Artifacts are served by the server (--serve-artifacts, default artifact root mlflow-artifacts:/), so a
# worker uploads its task artifact over HTTP to this server: no shared filesystem is needed for artifacts.
set -euo pipefail

HOST=${KSM_MLFLOW_HOST:-127.0.0.1}
PORT=${KSM_MLFLOW_PORT:-5000}
DIR=${KSM_MLFLOW_DIR:-$HOME/ksm-mlflow}
WORKERS=${KSM_MLFLOW_WORKERS:-2}
MLFLOW_BIN=${MLFLOW:-mlflow}

if ! command -v "$MLFLOW_BIN" >/dev/null 2>&1; then
  echo "error: '$MLFLOW_BIN' not found; activate the project's venv (. .venv/bin/activate) or set MLFLOW=/path/to/mlflow" >&2
  exit 2
fi

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)   # absolute: sqlite:/// and the artifact folder must not depend on the cwd
BACKEND=${KSM_MLFLOW_BACKEND_STORE_URI:-sqlite:///$DIR/mlflow.db}
ARTIFACTS=${KSM_MLFLOW_ARTIFACTS_DESTINATION:-$DIR/artifacts}
case "$ARTIFACTS" in
  *:*) ;;   # a store URL (s3://, gs://, ...): the server writes there itself
  *) mkdir -p "$ARTIFACTS" && ARTIFACTS=$(cd "$ARTIFACTS" && pwd) ;;
esac
case "$PORT" in
  ''|*[!0-9]*) echo "error: KSM_MLFLOW_PORT=$PORT is not a port number" >&2; exit 2 ;;
esac

args=(server
  --backend-store-uri "$BACKEND"
  --serve-artifacts
  --artifacts-destination "$ARTIFACTS"
  --default-artifact-root mlflow-artifacts:/
  --host "$HOST"
  --port "$PORT"
  --workers "$WORKERS")
if [ -n "${KSM_MLFLOW_ALLOWED_HOSTS:-}" ]; then
  args+=(--allowed-hosts "$KSM_MLFLOW_ALLOWED_HOSTS")
fi

# the server's background job runner (GenAI scorers) is of no use here: one process less
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

echo "[mlflow] backend $(printf '%s' "$BACKEND" | sed -E 's#//[^/@]*@#//***@#')" >&2   # no password in logs
echo "[mlflow] artifacts $ARTIFACTS (served through http://$HOST:$PORT)" >&2
echo "[mlflow] tracking.uri=http://$HOST:$PORT   (UI: the same address in a browser)" >&2
exec "$MLFLOW_BIN" "${args[@]}" "$@"
