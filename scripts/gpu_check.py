"""Decode benchmark on a GPU with the exact Mixtral-8x7B shapes and random bfloat16 weights.

All 32 layers when the GPU holds them (about 94 GB), else as many as fit; tokens/s are then also
given scaled to 32 layers (a decode step's time is proportional to the bytes it reads). Prints
tokens/s at batch 1 and 8, eager and compiled (CUDA graphs through torch.compile
"reduce-overhead"), memory used, and the fraction of the bandwidth roofline: measured copy
bandwidth / bytes of active weights per token (about 167 tokens/s on an H200). Run by
``scripts/gpu_check.sh``; exits 0 without doing anything when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mixtral_lite import Mixtral, MixtralConfig
from mixtral_lite.bench import Ours, active_weight_bytes, machine_info, measure_bandwidth

GiB = 2**30


def layers_that_fit(config: MixtralConfig, dtype: torch.dtype, headroom: float) -> int:
    """Layers whose weights fit in the free GPU memory, after embeddings, head and ``headroom`` bytes."""
    size = torch.tensor([], dtype=dtype).element_size()
    d, i, e = config.hidden_size, config.intermediate_size, config.num_experts
    hd, h, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    per_layer = (d * hd * (2 * h + 2 * kv) + 3 * e * i * d + e * d + 2 * d) * size
    fixed = (2 * config.vocab_size * d + d) * size
    free = torch.cuda.mem_get_info()[0]
    return max(0, min(config.num_hidden_layers, int((free - fixed - headroom) // per_layer)))


def build(config: MixtralConfig, dtype: torch.dtype, seed: int) -> Mixtral:
    """Random weights made on the GPU (N(0, 0.02), norms 1): nothing is read from disk."""
    with torch.device("meta"):
        model = Mixtral(config)
    model = model.to(dtype=dtype).to_empty(device="cuda").eval()
    model.reset_parameters(std=0.02, generator=torch.Generator(device="cuda").manual_seed(seed))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def measure(engine: Ours, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Median decode tokens/s (all rows) over ``repeats`` runs, after one warm-up run of the same
    shapes (a compiled step compiles and records its CUDA graph there)."""
    engine.greedy(prompt, new_tokens)
    rates = sorted(engine.greedy(prompt, new_tokens).decode_tokens_per_s for _ in range(repeats))
    return rates[len(rates) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="layers to build (default: all that fit)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--headroom-gib", type=float, default=6.0, help="memory kept free for cache and activations")
    p.add_argument("--budget-s", type=float, default=360.0, help="skip compiled runs that would start after this")
    p.add_argument("--out", default="bench_out/gpu_check.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to do")
        return 0
    start = time.perf_counter()
    dtype = torch.bfloat16
    full = MixtralConfig.from_preset("mixtral-8x7b")
    n_layers = args.layers or layers_that_fit(full, dtype, args.headroom_gib * GiB)
    if n_layers < 1:
        print("gpu_check: not even one Mixtral-8x7B layer fits in this GPU's free memory")
        return 1
    config = MixtralConfig.from_dict({**full.to_dict(), "num_hidden_layers": n_layers})
    print(f"device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB)")
    print(f"Mixtral-8x7B shapes, bfloat16, {n_layers} of {full.num_hidden_layers} layers")
    bandwidth = measure_bandwidth(torch.device("cuda"))
    model = build(config, dtype, seed=0)
    weights_gib = sum(t.numel() * t.element_size() for t in model.parameters()) / GiB
    per_token = active_weight_bytes(model)
    full_per_token = _scale_bytes(per_token, config, full)
    roofline = bandwidth / per_token
    print(
        f"weights {weights_gib:.1f} GiB; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
        f"{per_token / 1e9:.2f} GB read per token -> roofline {roofline:.0f} tok/s "
        f"(32 layers: {full_per_token / 1e9:.2f} GB, {bandwidth / full_per_token:.0f} tok/s)"
    )
    gen = torch.Generator().manual_seed(1)
    results = {
        "machine": machine_info(torch.device("cuda")),
        "layers": n_layers,
        "weights_GiB": weights_gib,
        "bandwidth_TBps": bandwidth / 1e12,
        "bytes_per_token": per_token,
        "roofline_tok_s": roofline,
        "runs": {},
    }
    modes = [("eager", False)] + ([] if args.no_compile else [("compiled", True)])
    for mode, compiled in modes:
        engine = Ours(model, compile=compiled)
        for b in (int(x) for x in args.batches.split(",")):
            if compiled and time.perf_counter() - start > args.budget_s:
                print(f"{mode:8s} b{b}: skipped (time budget)")
                continue
            prompt = torch.randint(3, config.vocab_size, (b, args.prompt_len), generator=gen).cuda()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                rate = measure(engine, prompt, args.new_tokens, args.repeats)
            except Exception as exc:  # a compile failure must not hide the eager numbers
                print(f"{mode:8s} b{b}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                results["runs"][f"{mode}_b{b}"] = {"error": str(exc)[:2000]}
                continue
            mem = torch.cuda.max_memory_allocated() / GiB
            per_row = rate / b
            line = f"{mode:8s} b{b}: {rate:8.1f} tok/s ({per_row:.1f} per sequence), memory {mem:.1f} GiB"
            if b == 1:
                scaled = rate * per_token / full_per_token
                line += f", {rate / roofline:.0%} of roofline; scaled to 32 layers {scaled:.1f} tok/s"
            print(f"{line}  [{time.perf_counter() - t0:.0f} s]")
            results["runs"][f"{mode}_b{b}"] = {"tok_s": rate, "memory_GiB": mem, "roofline_fraction": rate / roofline}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"total {time.perf_counter() - start:.0f} s; JSON: {out}")
    return 0


def _scale_bytes(per_token: int, config: MixtralConfig, full: MixtralConfig) -> float:
    """Bytes per token of the full-depth model from a shallower one: the per-layer part scales."""
    d, v = config.hidden_size, config.vocab_size
    fixed = (v * d + d + d) * 2  # output head, one embedding row, final norm (bfloat16)
    return fixed + (per_token - fixed) * full.num_hidden_layers / config.num_hidden_layers


if __name__ == "__main__":
    sys.exit(main())
