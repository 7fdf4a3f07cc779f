"""Prefill with int8/int4 weights: the kernel's one-pass conversions into a reused tile
(``cpu/dequant.py``) against the plain conversions of whole matrices, interleaved in one process.

Loads the checkpoint once per --quantize mode (bfloat16 activations, the CPU kernels installed),
then times one forward pass over a --prompt-token prompt with each arm in turns, --rounds rounds,
and prints the median prefill tokens/s of each arm and the per-round ratios. The logits of the two
arms are compared first (they must agree to the GEMM's rounding).

    python scripts/ab_prefill.py --model bench_out/vs_llamacpp/ckpt-8x7b --quantize int8,int4
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

from mixtral_lite import KVCache  # noqa: E402
from mixtral_lite.cpu import products  # noqa: E402
from mixtral_lite.generation.generate import prefill  # noqa: E402
from mixtral_lite.weights.loading import load_model  # noqa: E402

KERNEL = (products.native_int8_ok, products.native_int4_ok)


def use_kernel(on: bool) -> None:
    """The kernel's conversions (on) or the plain ones (off) for products' many-row paths."""
    if on:
        products.native_int8_ok, products.native_int4_ok = KERNEL
    else:
        products.native_int8_ok = products.native_int4_ok = lambda *a: False


def run(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    cache = KVCache(model.config, 1, ids.shape[1] + 1, dtype=model.dtype)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = prefill(model, ids, cache, None)
    return ids.shape[1] / (time.perf_counter() - t0), logits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--quantize", default="int8,int4")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.model}, prompt {args.prompt}, {args.threads} threads, {args.rounds} rounds\n")
    print("| weights | plain tok/s | kernel tok/s | kernel / plain, per round | max logit diff |")
    print("|---|---|---|---|---|")
    for mode in args.quantize.split(","):
        model = load_model(args.model, dtype=torch.bfloat16, quantize=mode)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        speeds: dict[bool, list[float]] = {True: [], False: []}
        logits = {}
        for r in range(args.rounds + 1):  # round 0: warm-up
            for on in (True, False) if r % 2 else (False, True):
                use_kernel(on)
                tps, logits[on] = run(model, ids)
                if r:
                    speeds[on].append(tps)
        use_kernel(True)
        diff = (logits[True].float() - logits[False].float()).abs().max().item()
        ratios = [k / q for k, q in zip(speeds[True], speeds[False], strict=True)]
        plain, kernel = statistics.median(speeds[False]), statistics.median(speeds[True])
        spread = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
        print(f"| {mode} | {plain:.1f} | {kernel:.1f} | {spread} | {diff:.3g} |")
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
