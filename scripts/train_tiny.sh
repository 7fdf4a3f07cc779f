#!/usr/bin/env bash
# Reproduce the bundled model (mixtral_lite/bundled/) from the Shakespeare text.
# Usage: scripts/train_tiny.sh [path/to/tinyshakespeare.txt] [out_dir]
# Then copy config.json, model.safetensors and tokenizer.model from out_dir into mixtral_lite/bundled/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/tinyshakespeare.txt}
OUT=${2:-runs/shakespeare-tiny}
MIXTRAL_LITE=${MIXTRAL_LITE:-.venv/bin/mixtral-lite}
"$MIXTRAL_LITE" train-tokenizer --data "$DATA" --vocab-size 2048 --out "$OUT/tokenizer"
"$MIXTRAL_LITE" train --config shakespeare-tiny --data "$DATA" --tokenizer "$OUT/tokenizer" --out "$OUT" \
    --steps 600 --batch-size 8 --seq-len 256 --lr 2e-3 --warmup 50 --min-lr 2e-4 --eval-interval 100 \
    --eval-batches 16 --save-interval 100 --seed 0 --threads 1 --no-progress
