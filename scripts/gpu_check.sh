#!/usr/bin/env bash
# GPU check for a GPU lent for a few minutes (about 8 minutes on an H200; give it 10):
#   bash scripts/gpu_check.sh            # from a bare clone: needs only torch (pytest optional)
#   bash scripts/gpu_check.sh --dry-run  # the same code paths on the CPU, fake devices (CI runs it)
# The CUDA parity tests run first when pytest is there; their outcome is reported, and the decode
# benchmark (scripts/gpu_check.py, exact Mixtral-8x7B shapes) runs whatever they say. Results go
# to $OUT/gpu_check.json when OUT is set (bench_out/ otherwise), rewritten after every measurement.
# Extra arguments go to gpu_check.py (e.g. --layers 8). Exits 0, doing nothing, without CUDA.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RESULTS="${OUT:-$ROOT/bench_out}"
mkdir -p "$RESULTS"
DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done

if [ "$DRY" = 0 ]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: no CUDA device on this machine; skipping (--dry-run runs it on the CPU)"
        exit 0
    fi
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
fi

TESTS_LOG="$RESULTS/gpu_check_tests.log"
if [ "$DRY" = 0 ] && "$PY" -c 'import pytest' 2>/dev/null; then
    echo "== parity tests on CUDA (tests/test_cuda.py, experts in host memory), at most 150 s"
    timeout 150 "$PY" -u -m pytest -q -m '' -p no:cacheprovider tests/test_cuda.py \
        tests/test_offload.py::test_cuda_experts_in_host_memory_equal_the_resident_model 2>&1 | tee "$TESTS_LOG"
    echo "tests exit status: ${PIPESTATUS[0]}" | tee -a "$TESTS_LOG"
else
    echo "tests skipped (dry run, or no pytest on this machine)" | tee "$TESTS_LOG"
fi

echo "== decode benchmark, Mixtral-8x7B shapes, bf16 and int8 (budget 330 s, timeout 420 s)"
timeout 420 "$PY" -u scripts/gpu_check.py --budget-s 330 --tests-log "$TESTS_LOG" --out "$RESULTS/gpu_check.json" "$@"
status=$?
echo "gpu_check.py exit status: $status; results in $RESULTS"
exit $status
