"""Where a batch-1 decode step's time goes on the CPU: each product's streaming rate against the
measured read bandwidth, the one-call layers, the output head and what is left (Python, mask,
embedding, the loop).

    python scripts/profile_decode.py                         # bench preset, float32 and bfloat16
    python scripts/profile_decode.py --shape 8x7b --dtype bfloat16
    python scripts/profile_decode.py --products-only          # the product table alone (no model)

Products are timed on enough distinct copies of each matrix (together > 256 MB) that every call
reads from memory, not from the caches, as decoding does. Prints tables; no JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mixtral_lite.bench.hardware import measure_bandwidth  # noqa: E402
from mixtral_lite.config import MixtralConfig  # noqa: E402
from mixtral_lite.cpu.native import native_linear  # noqa: E402

SHAPES = {
    "bench": MixtralConfig.from_preset("bench"),
    "8x7b": MixtralConfig.from_dict({**MixtralConfig.from_preset("mixtral-8x7b").to_dict(), "num_hidden_layers": 2}),
}


def products(config: MixtralConfig) -> dict[str, tuple[int, int]]:
    d, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    return {
        "wq / wo": (config.num_attention_heads * hd, d),
        "wk / wv": (config.num_key_value_heads * hd, d),
        "expert w1 / w3": (i, d),
        "expert w2": (d, i),
        "output head": (config.vocab_size, d),
    }


def time_product(o: int, i: int, dtype: torch.dtype, budget: float = 1.0) -> tuple[float, float]:
    """Median seconds of one row times an [o, i] matrix read from memory, and its GB/s."""
    nbytes = o * i * torch.finfo(dtype).bits // 8
    copies = max(2, (256 << 20) // nbytes + 1)
    ws = [torch.randn(o, i).to(dtype) for _ in range(copies)]
    x = torch.randn(1, i).to(dtype)
    for w in ws[:2]:
        native_linear(x, w)
    times: list[float] = []
    end = time.perf_counter() + budget
    while time.perf_counter() < end or len(times) < 3 * copies:
        for w in ws:
            t0 = time.perf_counter()
            native_linear(x, w)
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return t, nbytes / t / 1e9


def product_table(config: MixtralConfig, dtypes: list[torch.dtype], bandwidth: float) -> str:
    lines = ["| product | dtype | us per call | GB/s | of bandwidth |", "|---|---|---|---|---|"]
    for name, (o, i) in products(config).items():
        for dtype in dtypes:
            t, gbs = time_product(o, i, dtype)
            lines.append(f"| {name} {o}x{i} | {dtype} | {t * 1e6:.0f} | {gbs:.1f} | {gbs * 1e9 / bandwidth:.0%} |")
    return "\n".join(lines)


def step_profile(ckpt: Path, dtype: torch.dtype, steps: int, quantize: str | None = None) -> str:
    """One model's decode steps: the layers' kernel calls and the head timed inside the step."""
    from mixtral_lite.bench.engines import Ours
    from mixtral_lite.bench.hardware import active_weight_bytes
    from mixtral_lite.cpu import layer as layer_mod

    engine = Ours.load(ckpt, dtype, torch.device("cpu"), quantize=quantize)
    spent = {"layers": 0.0, "head": 0.0}
    head = engine.model.output
    head_class = type(head)  # CpuLinear, or the int8 / int4 one
    run, head_forward = layer_mod.LayerPlan.run, head_class.forward

    def timed_run(self, *a, **k):
        t0 = time.perf_counter()
        out = run(self, *a, **k)
        spent["layers"] += time.perf_counter() - t0
        return out

    def timed_head(self, x):
        t0 = time.perf_counter()
        out = head_forward(self, x)
        if self is head:
            spent["head"] += time.perf_counter() - t0
        return out

    one = torch.tensor([[5]])
    engine.greedy(one, 8)
    layer_mod.LayerPlan.run, head_class.forward = timed_run, timed_head
    try:
        t = engine.greedy(one, steps + 1).decode_s
    finally:
        layer_mod.LayerPlan.run, head_class.forward = run, head_forward
    nbytes = active_weight_bytes(engine.model)
    n = engine.model.config.num_hidden_layers
    layers, head_s = spent["layers"] / steps, spent["head"] / steps
    step = t / steps
    rest = step - layers - head_s
    return "\n".join(
        [
            f"{dtype}{' ' + quantize if quantize else ''}: {1 / step:.1f} tok/s, {step * 1e3:.2f} ms per step, "
            f"{nbytes / step / 1e9:.1f} GB/s of active weights",
            f"  {n} layers (one kernel call each): {layers * 1e3:.2f} ms ({layers / n * 1e6:.0f} us per layer)",
            f"  output head: {head_s * 1e3:.2f} ms",
            f"  the rest (Python, embedding, mask, rotary, the loop): {rest * 1e3:.2f} ms",
        ]
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="bench")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--checkpoint", type=Path, default=None, help="model folder (default: bench_out/vs_llamacpp)")
    p.add_argument("--products-only", action="store_true")
    p.add_argument("--quantize", action="append", help="also profile these weights (int8, int4, ...) with --dtype")
    p.add_argument("--skip-products", action="store_true", help="only the decode steps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "bfloat16"])]
    bw = measure_bandwidth(torch.device("cpu"))
    config = SHAPES[args.shape]
    print(f"read bandwidth {bw / 1e9:.1f} GB/s ({args.threads} threads)\n")
    if not args.skip_products:
        print(product_table(config, dtypes, bw))
    if args.products_only:
        return 0
    ckpt = args.checkpoint or ROOT / "bench_out" / "vs_llamacpp" / f"ckpt-{args.shape}"
    if not (ckpt / "config.json").exists():
        print(f"\nno checkpoint at {ckpt} (run scripts/vs_llamacpp.py first, or pass --checkpoint)")
        return 2
    print()
    for dtype in dtypes:
        for quantize in [None, *(args.quantize or [])]:
            print(step_profile(ckpt, dtype, args.steps, quantize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
