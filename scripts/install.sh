#!/usr/bin/env bash
# Installs everything this project needs on a fresh machine: the Debian data package, a .venv with the
# pinned torch build and the project, and the real CIFAR-100 test images shipped in the foolbox wheel.
# Idempotent; `make` re-runs it only when pyproject.toml or this script change.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# torch/torchvision pins that resolve to files on this workplace's disk; override for other machines,
# e.g. TORCH_SPEC="torch torchvision" to take whatever your index serves.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "[install] Debian package dataset-fashion-mnist (real Fashion-MNIST, offline)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

# PostgreSQL 15's server: the tracking server's cluster store, and what tests/test_postgres.py starts (initdb into
# a temp folder as the postgres user, on 127.0.0.1). The client side is the [postgres] extra below.
if [ ! -x /usr/lib/postgresql/15/bin/initdb ] || [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then
  echo "[install] Debian package postgresql-15 (server binaries for the PostgreSQL tracking store)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # its default cluster, if the package makes one, is not used: tests and benchmarks initdb a folder of their own
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql-15
fi

if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv"
  $PY -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "[install] $TORCH_SPEC"
.venv/bin/python -m pip install -q $TORCH_SPEC
echo "[install] project + dev and postgres extras"
.venv/bin/python -m pip install -q -e ".[dev,postgres]"

# 20 real CIFAR-100 test images (+ their fine labels in the file names) ship inside the foolbox wheel;
# the tests use them to check the superclass mapping and the PNG shard path without downloading CIFAR.
FB=.cache/foolbox
if [ ! -f "$FB/cifar100/.done" ]; then
  echo "[install] CIFAR-100 sample images from the foolbox wheel"
  mkdir -p "$FB/wheel" "$FB/cifar100"
  .venv/bin/python -m pip download -q --no-deps -d "$FB/wheel" foolbox
  .venv/bin/python - "$FB" <<'PY'
import glob, sys, zipfile, os
fb = sys.argv[1]
whl = sorted(glob.glob(os.path.join(fb, "wheel", "foolbox-*.whl")))[-1]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("foolbox/data/cifar100_") and n.endswith(".png"):
            with open(os.path.join(fb, "cifar100", os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
open(os.path.join(fb, "cifar100", ".done"), "w").close()
PY
fi
touch .install-stamp
echo "[install] done"
