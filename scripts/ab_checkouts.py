"""Interleaved A/B of two checkouts of this project on the same `bench` checkpoint.

Each round runs, for every configuration, one process per checkout (alternating which goes first),
each loading the checkpoint with that checkout's code and timing prefill and decode; the table
gives the medians over rounds and the range of the per-round ratios (B / A).

    git worktree add --detach ../before <commit>
    python scripts/ab_checkouts.py ../before . --rounds 5

Run without arguments it prints its own measurement of one side (the worker mode is internal).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CONFIGS = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),
}


def worker(ckpt: str, dtype_name: str, quantize: str | None, repeats: int) -> dict[str, float]:
    import torch

    from mixtral_lite.bench.engines import Ours

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    eng = Ours.load(Path(ckpt), dtype, torch.device("cpu"), quantize=quantize)
    g = torch.Generator().manual_seed(0)
    vocab = eng.model.config.vocab_size
    pre = torch.randint(0, vocab, (1, 512), generator=g)
    p1 = torch.randint(0, vocab, (1, 32), generator=g)
    p8 = torch.randint(0, vocab, (8, 32), generator=g)
    eng.greedy(p1, 8)
    eng.prefill_s(pre[:, :64])  # warm-up
    res: dict[str, list[float]] = {"prefill": [], "b1": [], "b8": []}
    for _ in range(repeats):
        res["prefill"].append(512 / eng.prefill_s(pre))
        res["b1"].append(eng.greedy(p1, 65).decode_tokens_per_s)
        res["b8"].append(eng.greedy(p8, 33).decode_tokens_per_s)
    return {k: statistics.median(v) for k, v in res.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", nargs="?", help="checkout A (the baseline)")
    p.add_argument("b", nargs="?", help="checkout B")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per process (median)")
    p.add_argument("--config", action="append", choices=list(CONFIGS), help="repeat for several (default: all)")
    p.add_argument("--checkpoint", default="bench_out/ab-ckpt", help="the bench checkpoint (written if missing)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", nargs=3, metavar=("CKPT", "DTYPE", "QUANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        ckpt, dtype_name, quant = args.worker
        print(json.dumps(worker(ckpt, dtype_name, None if quant == "none" else quant, args.repeats)))
        return 0
    if not (args.a and args.b):
        p.error("give two checkouts: A B")
    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / "config.json").is_file():
        from mixtral_lite.bench.checkpoint import bench_config, make_checkpoint
        from mixtral_lite.bench.options import Options

        opts = Options()
        make_checkpoint(ckpt, bench_config(opts), seed=opts.seed, std=opts.std)
    sides = {"A": Path(args.a).resolve(), "B": Path(args.b).resolve()}
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for name in args.config or list(CONFIGS):
            dtype_name, quant = CONFIGS[name]
            order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
            for side in order:
                env = {**os.environ, "PYTHONPATH": str(sides[side]), "OMP_NUM_THREADS": str(args.threads)}
                cmd = [sys.executable, __file__, "--worker", str(ckpt), dtype_name, quant or "none",
                       "--repeats", str(args.repeats)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=sides[side], check=True)
                for metric, value in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    results.setdefault((name, metric), {"A": [], "B": []})[side].append(value)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print("| config | A tok/s | B tok/s | B / A | per-round ratios | rounds |")
    print("|---|---|---|---|---|---|")
    for (name, metric), v in results.items():
        a, b = statistics.median(v["A"]), statistics.median(v["B"])
        ratios = [y / x for x, y in zip(v["A"], v["B"], strict=True)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"| {name} {metric} | {a:.1f} | {b:.1f} | {b / a:.2f} | {spread} | {len(ratios)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
