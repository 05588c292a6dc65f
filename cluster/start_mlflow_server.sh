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
#   KSM_MLFLOW_AUTH           basic | none                      default: none on loopback, basic on any other
#                             address. basic = MLflow's basic-auth app (`mlflow server --app-name basic-auth`):
#                             every request but /health needs a user and password, so nobody who merely reaches
#                             the port can read runs, upload artifacts or register a model (whose code runs where
#                             it is loaded). none on a non-loopback address only when asked for, with a warning.
#   MLFLOW_AUTH_ADMIN_PASSWORD  (basic) the admin's password, >= 12 characters; read by MLflow itself, needed the
#                             first time (it creates the admin in the auth store), ignored afterwards. Never on a
#                             command line or in a file of ours. MLFLOW_AUTH_ADMIN_USERNAME: default admin.
#   MLFLOW_FLASK_SERVER_SECRET_KEY  (basic) signs the UI's CSRF tokens; default: a random one per start
#   KSM_MLFLOW_AUTH_CACHE_S   (basic) seconds a worker keeps a checked login (MLflow's auth_cache_ttl_seconds)
#                             default 30; 0 = check the password hash on every request. MLflow hashes passwords
#                             with scrypt: 0.12 s of server CPU per request, measured (benchmarks/RESULTS.md,
#                             "Suite time"), which a task stream pays on every metric batch and artifact upload.
#                             The price: a password changed or a user deleted through another worker is still
#                             accepted by this one for up to that long. Written into the script's own ini only:
#                             with KSM_MLFLOW_AUTH_CONFIG, set auth_cache_ttl_seconds in your ini.
#   KSM_MLFLOW_AUTH_CONFIG    (basic) your own auth config ini (MLflow's MLFLOW_AUTH_CONFIG_PATH); default: one
#                             written to $KSM_MLFLOW_DIR/basic_auth.ini (users in $KSM_MLFLOW_DIR/basic_auth.db,
#                             signed-in users without a grant may READ; KSM_MLFLOW_DEFAULT_PERMISSION changes it)
#                             Clients (the pipeline, its Ray workers, `mlflow ui` users) sign in with
#                             MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in their environment.
#   KSM_MLFLOW_PORT           port                              default 5000
#   KSM_MLFLOW_DIR            folder for the default stores     default ~/ksm-mlflow (outside the repo, so
#                             `ray job submit --working-dir .` never uploads the server's data)
#   KSM_MLFLOW_BACKEND_STORE_URI   runs, params, metrics        default sqlite:///$KSM_MLFLOW_DIR/mlflow.db
#                             PostgreSQL (the cluster store: many concurrent jobs, tens of thousands of runs):
#                             postgresql://USER:PASSWORD@DBHOST:5432/mlflow, an existing, empty database (MLflow
#                             creates its tables on the first start). Its driver is psycopg 3, which
#                             `pip install -e .[postgres]` (scripts/install.sh) brings. Handed to mlflow
#                             through its environment (MLFLOW_BACKEND_STORE_URI), never on its command line,
#                             where `ps` shows it to every user of the machine; printed with the password masked.
#                             Prefer the password in PGPASSWORD (or a ~/.pgpass) and none in the URI: libpq
#                             reads both itself. A sqlite store is created in WAL mode (pipeline/store.py).
#   KSM_MLFLOW_ARTIFACTS_DESTINATION  where the server stores artifacts  default $KSM_MLFLOW_DIR/artifacts
#                             (or s3://bucket/prefix, gs://..., with that store's client library installed
#                             on the server only: workers upload through the server, never to the store)
#   KSM_MLFLOW_WORKERS        uvicorn worker processes          default 2
#   KSM_MLFLOW_POOL_SIZE      database connections each worker keeps open (PostgreSQL)   default 10
#   KSM_MLFLOW_MAX_OVERFLOW   ... and may open beyond it under a burst                   default 20
#                             A request waits for a free connection up to 30 s, then fails: with SQLAlchemy's
#                             default (5 + 10) 64 concurrent jobs did (benchmarks/RESULTS.md, "Tracking at
#                             cluster scale"). Workers x (pool + overflow) must stay under the database's
#                             max_connections (PostgreSQL's default: 100).
#   KSM_MLFLOW_WORKER_HEALTHCHECK_S  seconds a uvicorn worker may take to answer its supervisor's ping   default 60
#                             (uvicorn's own: 5). A worker busy with a large search (thousands of runs, each with
#                             its tags, params and metrics) on a loaded machine missed 5 s and was killed mid-request
#                             (the client saw "Remote end closed connection"): measured with 10,000 runs on 2 cores.
#                             Ignored when you pass your own --uvicorn-opts.
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

# The python beside mlflow (its venv) masks URIs with the project's one redaction rule (pipeline/redact.py: the user
# info up to the last '@', so a password holding '/' or '@' is masked whole), makes the secret key and checks the
# store's driver.
MLFLOW_PATH=$(command -v "$MLFLOW_BIN")
PY=$(dirname "$MLFLOW_PATH")/python
[ -x "$PY" ] || PY=python3
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

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
AUTH_CACHE_S=${KSM_MLFLOW_AUTH_CACHE_S:-30}
case "$AUTH_CACHE_S" in
  ''|*[!0-9]*) echo "error: KSM_MLFLOW_AUTH_CACHE_S=$AUTH_CACHE_S is not a number of seconds (0 turns the login cache off)" >&2; exit 2 ;;
esac

case "$BACKEND" in
  postgresql:*|postgresql+*|postgres:*)
    # MLflow 3 on SQLAlchemy 2.1 opens postgresql:// with psycopg (v3): say so now, not in a traceback per worker
    if ! "$PY" -c 'import psycopg' 2>/dev/null; then
      echo "error: a PostgreSQL store needs the psycopg driver beside mlflow: pip install -e '.[postgres]'" \
           "(or pip install 'psycopg[binary]')" >&2
      exit 2
    fi
    case "$BACKEND" in postgres:*) BACKEND=postgresql:${BACKEND#postgres:} ;; esac  # SQLAlchemy's dialect name
    export MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=${KSM_MLFLOW_POOL_SIZE:-${MLFLOW_SQLALCHEMYSTORE_POOL_SIZE:-10}}
    export MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=${KSM_MLFLOW_MAX_OVERFLOW:-${MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW:-20}}
    ;;
  sqlite:*)
    # created complete and in WAL mode (readers never wait for the writer) before any worker opens it
    KSM_STORE_URI=$BACKEND "$PY" -c 'import os, sys; sys.path.insert(0, sys.argv[1])
from pipeline.store import ensure_store
from pipeline.errors import PipelineError
try:
    ensure_store(os.environ["KSM_STORE_URI"])
except PipelineError as e:
    sys.exit(f"error: {e}")' "$ROOT" || exit 2
    ;;
esac

# Secrets travel in the environment, never in argv: a command line is world-readable in /proc (`ps`), an
# environment only by the same user. `mlflow server` reads each of these variables itself.
export MLFLOW_BACKEND_STORE_URI=$BACKEND
export MLFLOW_ARTIFACTS_DESTINATION=$ARTIFACTS
args=(server
  --serve-artifacts
  --default-artifact-root mlflow-artifacts:/
  --host "$HOST"
  --port "$PORT"
  --workers "$WORKERS")
HEALTHCHECK=${KSM_MLFLOW_WORKER_HEALTHCHECK_S:-60}
case "$HEALTHCHECK" in
  ''|*[!0-9]*) echo "error: KSM_MLFLOW_WORKER_HEALTHCHECK_S=$HEALTHCHECK is not a number of seconds" >&2; exit 2 ;;
esac
case " $* " in
  *" --uvicorn-opts"*|*" --gunicorn-opts"*|*" --waitress-opts"*) ;;  # the caller's server options win
  *) args+=(--uvicorn-opts "--timeout-worker-healthcheck $HEALTHCHECK") ;;
esac
if [ -n "${KSM_MLFLOW_ALLOWED_HOSTS:-}" ]; then
  args+=(--allowed-hosts "$KSM_MLFLOW_ALLOWED_HOSTS")
fi

masked() {  # the value of the variable named $1, credentials masked; "(hidden)" if it cannot be masked
  KSM_MASK_THIS=${!1} "$PY" -c 'import os, sys; sys.path.insert(0, sys.argv[1]); from pipeline.redact import redact_url
print(redact_url(os.environ["KSM_MASK_THIS"]))' "$ROOT" 2>/dev/null || echo "(hidden)"
}

case "$HOST" in
  127.*|localhost|::1) LOOPBACK=1 ;;
  *) LOOPBACK=0 ;;
esac
AUTH=${KSM_MLFLOW_AUTH:-}
[ -n "$AUTH" ] || { [ "$LOOPBACK" = 1 ] && AUTH=none || AUTH=basic; }
case "$AUTH" in
  basic)
    if [ -n "${KSM_MLFLOW_AUTH_CONFIG:-}" ]; then
      export MLFLOW_AUTH_CONFIG_PATH=$KSM_MLFLOW_AUTH_CONFIG
    else
      # MLflow's own default ini keeps its users in ./basic_auth.db, relative to the cwd: write one with an
      # absolute store beside the others. No password in it: MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD itself.
      export MLFLOW_AUTH_CONFIG_PATH=$DIR/basic_auth.ini
      (umask 077 && cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${KSM_MLFLOW_DEFAULT_PERMISSION:-READ}
database_uri = sqlite:///$DIR/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = $AUTH_CACHE_S
INI
      )
    fi
    if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
      # one key for all the server's workers (they inherit it); a restart makes a new one (UI sessions sign in again)
      MLFLOW_FLASK_SERVER_SECRET_KEY=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
      export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    args+=(--app-name basic-auth)
    ;;
  none)
    if [ "$LOOPBACK" = 0 ]; then
      echo "[mlflow] WARNING: no authentication on $HOST:$PORT (KSM_MLFLOW_AUTH=none): whoever reaches it can read" \
           "every run, upload artifacts and register models whose code runs where they are loaded" >&2
    fi
    ;;
  *) echo "error: KSM_MLFLOW_AUTH=$AUTH; use basic (MLflow's basic-auth app) or none" >&2; exit 2 ;;
esac

# the server's background job runner (GenAI scorers) is of no use here: one process less
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

echo "[mlflow] backend $(masked BACKEND)" >&2
echo "[mlflow] artifacts $(masked ARTIFACTS) (served through http://$HOST:$PORT)" >&2
if [ "$AUTH" = basic ]; then
  echo "[mlflow] authentication: basic (users in $MLFLOW_AUTH_CONFIG_PATH's store); clients set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" >&2
fi
case "$BACKEND" in
  postgresql*)
    # open the store once before the workers do: a wrong host or password is one masked line here, not a SQLAlchemy
    # traceback per worker that may print pieces of the password (a password holding '/' or '@' is cut there by the
    # URL parser, and a piece can land in the "host" of the error)
    KSM_STORE_URI=$BACKEND "$PY" -c 'import os, re, sys; sys.path.insert(0, sys.argv[1])
from pipeline.redact import redact_text, redact_url, split_userinfo
uri = os.environ["KSM_STORE_URI"]
password = split_userinfo(uri)[2] or ""
try:
    import sqlalchemy
    with sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10}).connect():
        pass
except Exception as exc:
    why = redact_text(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
    for piece in sorted({password, *re.split(r"[/@:]", password)}, key=len, reverse=True):
        if len(piece) >= 3:
            why = why.replace(piece, "***")
    print(f"error: cannot open the PostgreSQL store {redact_url(uri)}: {why}. Check the host, port, database and login "
          "(a password holding / @ : must be percent-encoded in the URI)", file=sys.stderr)
    sys.exit(2)' "$ROOT" || exit 2
    ;;
esac
echo "[mlflow] tracking.uri=http://$HOST:$PORT   (UI: the same address in a browser)" >&2
exec "$MLFLOW_BIN" "${args[@]}" "$@"
