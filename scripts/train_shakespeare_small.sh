#!/usr/bin/env bash
# Train the larger Shakespeare model the quantisation tables use (configs/shakespeare-small.json,
# about 30M parameters) with the bundled tokenizer, then evaluate every quantisation mode on the
# last 100 KB of the text (inside the run's validation split). One CPU thread, about 25 minutes.
# Usage: scripts/train_shakespeare_small.sh [path/to/tinyshakespeare.txt] [out_dir]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/tinyshakespeare.txt}
OUT=${2:-runs/shakespeare-small}
PY=${PY:-.venv/bin/python}
"$PY" -m mixtral_lite train --config shakespeare-small --data "$DATA" --tokenizer mixtral_lite/bundled/tokenizer.model \
    --out "$OUT" --steps 500 --batch-size 8 --seq-len 256 --lr 1.5e-3 --warmup 50 --min-lr 1.5e-4 \
    --eval-interval 100 --eval-batches 16 --save-interval 100 --seed 0 --threads 1 --no-progress
tail -c 100000 "$DATA" > "$OUT/heldout.txt"
"$PY" scripts/eval_quant.py --model "$OUT" --data "$OUT/heldout.txt" --threads 1 \
    --modes int8,int4,int4-hqq,int4-mixed,int4-mixed-hqq --json "$OUT/eval.json"
