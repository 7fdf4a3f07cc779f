#!/usr/bin/env bash
# GPU check (about 8 minutes on one large NVIDIA GPU): the CUDA parity tests, then a decode
# benchmark with the exact Mixtral-8x7B shapes (scripts/gpu_check.py). Exits 0, doing nothing,
# on a machine without CUDA. Extra arguments go to gpu_check.py (e.g. --layers 8).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device on this machine; skipping"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true

echo "== parity tests on CUDA (tests/test_cuda.py)"
timeout 180 "$PY" -m pytest -q -m '' -p no:cacheprovider tests/test_cuda.py

echo "== decode benchmark, Mixtral-8x7B shapes, bfloat16"
timeout 300 "$PY" scripts/gpu_check.py "$@"
