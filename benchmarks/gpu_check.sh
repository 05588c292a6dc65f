#!/usr/bin/env bash
# GPU device check (issue 13): benchmarks/gpu_check.sh [--smoke] [--out DIR] [--prepare] [--help]
# Runs unchanged on a machine with one NVIDIA GPU and only torch, torchvision, numpy and safetensors: the check
# imports ksm_core (pure PyTorch) and nothing of the pipeline. See benchmarks/gpu_check.py for what it measures.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="$(command -v python3)"; fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$root/benchmarks/gpu_check.py" "$@"
