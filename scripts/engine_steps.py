"""The serving engine alone (no HTTP): output tokens/s of N requests run one at a time against
the same requests run C at a time, on the same weights, in interleaved rounds.

Each request is a prompt of the bundled held-out text (lengths varied) and --max-tokens greedy
tokens. "serial" runs them through a one-row engine one after the other; "C concurrent" submits
them all to a C-row engine (continuous batching). Prints medians over --rounds of tokens/s,
milliseconds per decode step and the ratio to serial, and checks every concurrent output equals
the serial one. Where `serve_load.py` measures the server as deployed, this isolates the engine.

  PYTHONPATH=. python scripts/engine_steps.py --threads 1 --levels 4 16 64
  PYTHONPATH=. python scripts/engine_steps.py --model /path/to/bench-weights --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixtral_lite import load_model, load_tokenizer  # noqa: E402
from mixtral_lite.commands.generate import BUNDLED  # noqa: E402
from mixtral_lite.generation.engine import Engine, SeqRequest  # noqa: E402


def requests(tokenizer, n: int, max_tokens: int) -> list[SeqRequest]:
    text = (Path(BUNDLED) / "heldout.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    out = []
    for i in range(n):
        length = 4 + (i * 7) % 29  # 4 .. 32 prompt tokens
        start = (i * 997) % (len(ids) - length)
        out.append(SeqRequest(prompt=ids[start : start + length], max_tokens=max_tokens))
    return out


def run(model, tokenizer, reqs: list[SeqRequest], rows: int) -> tuple[float, float, list[list[int]]]:
    """(output tokens/s, ms per decode step, token ids) of ``reqs`` through a ``rows``-row engine."""
    engine = Engine(model, tokenizer, max_batch=rows, max_queue=len(reqs), max_seq_len=256, prefill_chunk=256)
    start = time.perf_counter()
    if rows == 1:
        results = [engine.generate([r])[0] for r in reqs]
    else:
        results = engine.generate(reqs)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return tokens / seconds, 1000 * seconds / max(engine.metrics.steps, 1), [r.token_ids for r in results]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUNDLED, help="a model folder (default: the bundled model)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the folder's / the CPU default)")
    p.add_argument("--quantize", default=None, help="int8, int4, ... as load_model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--levels", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: max(16, level))")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype, quantize=args.quantize, progress=False)
    tokenizer = load_tokenizer(args.model)
    rates: dict[tuple[int, str], list[float]] = {}
    steps: dict[tuple[int, str], list[float]] = {}
    mismatches = 0
    for _ in range(args.rounds):
        for level in args.levels:
            reqs = requests(tokenizer, args.requests or max(16, level), args.max_tokens)
            order = [("serial", 1), ("batched", level)]
            outs = {}
            for name, rows in order if _ % 2 == 0 else order[::-1]:
                rate, ms, ids = run(model, tokenizer, reqs, rows)
                rates.setdefault((level, name), []).append(rate)
                steps.setdefault((level, name), []).append(ms)
                outs[name] = ids
            mismatches += sum(a != b for a, b in zip(outs["serial"], outs["batched"], strict=True))
    print(f"model {args.model}, dtype {model.dtype}, quantize {args.quantize}, {args.threads} thread(s), "
          f"{args.max_tokens} tokens per request, medians of {args.rounds} rounds")  # fmt: skip
    print("| concurrency | requests | serial tok/s | concurrent tok/s | ratio | ms/step serial / concurrent |")
    print("|---|---|---|---|---|---|")
    for level in args.levels:
        s, c = statistics.median(rates[(level, "serial")]), statistics.median(rates[(level, "batched")])
        ms_s, ms_c = statistics.median(steps[(level, "serial")]), statistics.median(steps[(level, "batched")])
        n = args.requests or max(16, level)
        print(f"| {level} | {n} | {s:.0f} | {c:.0f} | {c / s:.2f}x | {ms_s:.1f} / {ms_c:.1f} |")
    print(f"outputs differing from serial: {mismatches}")


if __name__ == "__main__":
    main()
