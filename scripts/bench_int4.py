"""Decode speed at batch 1 of our bf16, int8 and int4 models on the same weights, interleaved.

Writes (or reuses) the benchmark's random checkpoint for --preset (``mixtral_lite.bench``'s
peaked-successor recipe), loads every variant once (bfloat16 activations), then runs --rounds
rounds; each round times one greedy generation of --new-tokens tokens per variant, in an order
rotated every round. Prints the median decode tokens/s, the ratio to bf16, and the share of
greedy tokens equal to bf16's.

    python scripts/bench_int4.py --threads 2 --rounds 5
    python scripts/bench_int4.py --modes int4,int4-mixed --group-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixtral_lite.bench.checkpoint import make_checkpoint  # noqa: E402
from mixtral_lite.bench.engines import Ours  # noqa: E402
from mixtral_lite.config import MixtralConfig  # noqa: E402
from mixtral_lite.weights.loading import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--checkpoint", default=str(Path.home() / ".cache" / "mixtral_lite" / "bench_int4_ckpt"))
    p.add_argument("--modes", default="int8,int4,int4-hqq,int4-mixed", help="comma-separated quantize modes")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = MixtralConfig.from_preset(args.preset)
    folder = make_checkpoint(Path(args.checkpoint), config, seed=0, std=0.02)
    variants = {"bf16": Ours(load_model(folder, dtype=torch.bfloat16, progress=False), "bf16")}
    for mode in [m for m in args.modes.split(",") if m]:
        model = load_model(folder, dtype=torch.bfloat16, quantize=mode, group_size=args.group_size, progress=False)
        variants[mode] = Ours(model, mode)
        print(f"loaded {mode}", file=sys.stderr, flush=True)
    ids = torch.randint(3, config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    for engine in variants.values():  # warm-up (kernel build, allocator)
        engine.greedy(ids, 8)
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[int]] = {}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = variants[name].greedy(ids, args.new_tokens)
            speeds[name].append(run.decode_tokens_per_s)
            tokens[name] = run.tokens[0]
            print(f"round {r} {name}: {run.decode_tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
    base = statistics.median(speeds["bf16"])
    rows = []
    print(f"preset {args.preset}, batch 1, {args.threads} threads, {args.new_tokens} tokens, {args.rounds} rounds")
    print(f"{'variant':<12} {'tok/s (median)':>15} {'min..max':>16} {'x bf16':>7} {'same tokens':>12}")
    for name in names:
        med = statistics.median(speeds[name])
        same = sum(a == b for a, b in zip(tokens[name], tokens["bf16"], strict=True)) / len(tokens["bf16"])
        lo, hi = min(speeds[name]), max(speeds[name])
        print(f"{name:<12} {med:>15.1f} {f'{lo:.0f}..{hi:.0f}':>16} {med / base:>7.2f} {same:>12.0%}")
        rows.append({"variant": name, "tok_s": med, "runs": speeds[name], "vs_bf16": med / base, "same_tokens": same})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
