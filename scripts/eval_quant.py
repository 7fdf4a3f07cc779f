"""Perplexity and KL divergence of every quantisation mode against the unquantised model.

Loads --model once as the reference, then each --modes variant (quantised from the same weights),
and runs ``mixtral_lite.eval.evaluate`` on the first --max-tokens tokens of --data with the
reference; prints one table row per variant (the reference's own row first).

    python scripts/eval_quant.py --model mixtral_lite/bundled --data ../shared/data/tinyshakespeare.txt
    python scripts/eval_quant.py --model DIR --data text.txt --modes int4,int4-hqq --group-size 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixtral_lite import load_model, load_tokenizer  # noqa: E402
from mixtral_lite.eval import evaluate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--modes", default="int8,int4,int4-hqq,int4-mixed")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    text = Path(args.data).read_text()
    tok = load_tokenizer(args.model)
    ref = load_model(args.model, dtype=args.dtype, progress=False)
    rows = []
    print(f"{args.model} on {args.data}: {args.max_tokens} tokens, context {args.context}, stride {args.stride}")
    print(
        f"{'variant':<11} {'ppl':>9} {'vs ref':>8} {'nats/byte':>10} {'KL mean':>9} {'KL p99':>8} {'top-1':>7} {'s':>5}"
    )
    for mode in ["reference", *[m for m in args.modes.split(",") if m]]:
        if mode == "reference":
            model = ref
        else:
            model = load_model(args.model, dtype=args.dtype, quantize=mode, group_size=args.group_size, progress=False)
        t0 = time.perf_counter()
        r = evaluate(
            model, tok, text, reference=ref, context=args.context, stride=args.stride, max_tokens=args.max_tokens
        )
        s = time.perf_counter() - t0
        print(
            f"{mode:<11} {r.ppl:>9.4f} {(r.ppl_ratio - 1) * 100:>+7.2f}% {r.nats_per_byte:>10.4f} "
            f"{r.kl_mean:>9.5f} {r.kl_p99:>8.4f} {r.top1_agreement:>7.2%} {s:>5.0f}"
        )
        rows.append({"variant": mode, **r.as_dict()})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
