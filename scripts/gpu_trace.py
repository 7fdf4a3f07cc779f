"""Ops and bytes per step of the GPU path, traced on meta tensors (no GPU needed).

Builds Mixtral-8x7B's exact shapes on the meta device (1 and 2 layers, extrapolated to all 32),
traces prefill and one decode step for bf16 and int8 at batch 1 and 8, and prints a table: kernel
launches, bytes moved (the trace's model of what CUDA kernels read and write, see
``mixtral_lite/bench/trace.py``), host syncs, the SDPA backend, and the decode ceiling those bytes
give at ``--bandwidth-tbps`` (an estimate, not a measurement).

    PYTHONPATH=. python scripts/gpu_trace.py [--cache 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mixtral_lite import MixtralConfig
from mixtral_lite.bench import active_weight_bytes
from mixtral_lite.bench.trace import kv_bytes_attended, meta_model, trace_decode, trace_prefill


def at_depth(one: float, two: float, total: int) -> float:
    """A per-step count at ``total`` layers from 1 and 2 traced layers (every layer is the same)."""
    return one + (two - one) * (total - 1)


def rows(cache: int, prompt: int, bandwidth: float) -> list[dict]:
    out = []
    total = MixtralConfig.from_preset("mixtral-8x7b").num_hidden_layers
    for name, dtype, int8 in (("bf16", torch.bfloat16, False), ("int8", torch.bfloat16, True)):
        models = [meta_model(layers=n, dtype=dtype, int8=int8) for n in (1, 2)]
        for batch in (1, 8):
            d = [trace_decode(m, batch, prompt, cache) for m in models]
            p = [trace_prefill(m, batch, prompt, cache) for m in models]
            step_bytes = at_depth(d[0].bytes, d[1].bytes, total)
            active = at_depth(*(active_weight_bytes(m) for m in models), total)
            kv = at_depth(*(kv_bytes_attended(m, batch, cache) for m in models), total)
            out.append(
                {
                    "weights": name,
                    "batch": batch,
                    "decode_kernels": round(at_depth(d[0].kernels, d[1].kernels, total)),
                    "decode_GB": step_bytes / 1e9,
                    "active_GB": active / 1e9,
                    "kv_GB": kv / 1e9,
                    "bytes_over_bound": step_bytes / (active + kv),
                    "prefill_kernels": round(at_depth(p[0].kernels, p[1].kernels, total)),
                    "syncs": sum(len(t.syncs) for t in (*d, *p)),
                    "sdpa": ",".join(sorted(d[1].sdpa_backends)),
                    "ceiling_tok_s": batch * bandwidth / step_bytes,
                }
            )
    return out


def format_rows(table: list[dict], bandwidth: float) -> str:
    head = (
        f"{'weights':7s} {'batch':>5s} {'kernels':>8s} {'GB/step':>8s} {'active':>7s} {'KV':>6s} "
        f"{'x bound':>7s} {'syncs':>5s} {'sdpa':>9s} {'est. tok/s':>10s}"
    )
    lines = [head]
    for r in table:
        lines.append(
            f"{r['weights']:7s} {r['batch']:5d} {r['decode_kernels']:8d} {r['decode_GB']:8.2f} {r['active_GB']:7.2f} "
            f"{r['kv_GB']:6.2f} {r['bytes_over_bound']:7.2f} {r['syncs']:5d} {r['sdpa']:>9s} {r['ceiling_tok_s']:10.0f}"
        )
    lines.append(
        f"(decode step, 32 layers; est. tok/s = batch x {bandwidth / 1e12:.1f} TB/s / GB per step: an estimate)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=int, default=1024, help="cache slots attended per step")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--bandwidth-tbps", type=float, default=4.8, help="for the estimated ceiling (H200: 4.8)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bandwidth = args.bandwidth_tbps * 1e12
    table = rows(args.cache, args.prompt, bandwidth)
    print(format_rows(table, bandwidth), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
