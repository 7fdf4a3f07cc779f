"""Decode benchmark on a GPU with the exact Mixtral-8x7B shapes and random weights, bf16 then int8.

Made for a GPU lent for a few minutes: every measurement is written to the JSON (``$OUT`` when
set) as soon as it is taken, compiled runs that would start after ``--budget-s`` are skipped, each
(batch, length) gets one cache used for its warm-up and its timed runs (a compiled step compiles
and records its CUDA graph in the warm-up, outside the timing), and a failure is reported in its
row without stopping the others. All 32 layers when the GPU holds them, else as many as fit;
batch-1 rates are also given scaled to 32 layers (a decode step's time follows its bytes).

int8 runs with the GPU backend's Triton kernels installed (``mixtral_lite/cuda``; their report
goes into the JSON as ``int8_kernels``); ``--weights bf16,int8,int8-ref`` adds the reference int8
modules for comparison.

Prints one table: tokens/s at batch 1 and 8 for bf16 and int8, eager and compiled (CUDA graphs,
``torch.compile`` "reduce-overhead"), memory used, the SDPA backend decode attention gets, and
the fraction of the bandwidth roofline (measured copy bandwidth / active bytes per token).

``--dry-run`` takes every code path on the CPU with fake devices: the tiny preset stands in for
the GPU model, ``torch.compile``'s eager backend for CUDA graphs, the meta-device trace for the
SDPA backend CUDA would choose (``tests/test_gpu_check.py`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from mixtral_lite import Mixtral, MixtralConfig
from mixtral_lite.bench import active_weight_bytes, machine_info, measure_bandwidth
from mixtral_lite.bench.trace import sdpa_backend
from mixtral_lite.cuda import install_cuda_kernels, uninstall_cuda_kernels
from mixtral_lite.generation.generate import compile_decode_step, decode_step, prefill
from mixtral_lite.model.cache import KVCache
from mixtral_lite.model.quant import quantize_model

GiB = 2**30
BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


class Results:
    """The JSON, rewritten after every measurement (a run cut short still leaves its numbers)."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.data = path, {**header, "runs": {}, "tests": None}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, key: str, row: dict) -> None:
        self.data["runs"][key] = row
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def layers_that_fit(config: MixtralConfig, dtype: torch.dtype, headroom: float) -> int:
    """Layers whose weights fit in the free GPU memory, after embeddings, head and ``headroom`` bytes."""
    size = torch.tensor([], dtype=dtype).element_size()
    d, i, e = config.hidden_size, config.intermediate_size, config.num_experts
    hd, h, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    per_layer = (d * hd * (2 * h + 2 * kv) + 3 * e * i * d + e * d + 2 * d) * size
    fixed = (2 * config.vocab_size * d + d) * size
    free = torch.cuda.mem_get_info()[0]
    return max(0, min(config.num_hidden_layers, int((free - fixed - headroom) // per_layer)))


def build(config: MixtralConfig, dtype: torch.dtype, device: torch.device, seed: int) -> Mixtral:
    """Random weights made on the device (N(0, 0.02), norms 1): nothing is read from disk."""
    with torch.device("meta"):
        model = Mixtral(config)
    model = model.to(dtype=dtype).to_empty(device=device).eval()
    model.reset_parameters(std=0.02, generator=torch.Generator(device=device).manual_seed(seed))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GiB


def decode_backend(model: Mixtral, batch: int, length: int) -> str:
    """The SDPA backend of a decode step's attention (the folded layout of ``Attention.attend``):
    asked of PyTorch on CUDA, predicted by the trace's rules elsewhere."""
    att, dev = model.layers[0].attention, model.device
    kv, g, hd = att.n_kv_heads, att.n_heads // att.n_kv_heads, att.head_dim
    q = torch.zeros(batch, kv, g, hd, dtype=model.dtype, device=dev)
    k = torch.zeros(batch, kv, length, hd, dtype=model.dtype, device=dev)
    mask = torch.zeros(batch, 1, 1, length, dtype=model.dtype, device=dev)
    if dev.type == "cuda":
        return BACKENDS.get(int(torch._fused_sdp_choice(q, k, k, mask)), "unknown")
    return sdpa_backend(q, k, mask, False) + " (predicted)"


class Decoder:
    """Greedy decoding with one cache per (batch, length), reused across warm-up and timed runs."""

    def __init__(self, model: Mixtral, step) -> None:
        self.model, self.step, self.caches = model, step, {}

    @torch.no_grad()
    def run(self, prompt: torch.Tensor, n: int) -> float:
        """Decode tokens/s (all rows) for ``n`` tokens after ``prompt``, prefill outside the timing."""
        b, t = prompt.shape
        key = (b, t + n)
        if key not in self.caches:
            m = self.model
            self.caches[key] = KVCache(m.config, b, t + n, device=m.device, dtype=m.dtype)
        cache = self.caches[key]
        cache.reset()
        dev = self.model.device
        tokens = prefill(self.model, prompt, cache, None).argmax(-1)[:, None]
        slot = torch.tensor([t], device=dev)
        positions = torch.full((b, 1), t, device=dev)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            tokens = self.step(self.model, tokens, cache, slot, positions).argmax(-1)[:, None]
            slot += 1
            positions += 1
        sync(dev)
        return b * n / (time.perf_counter() - t0)


def compiled_step(device: torch.device):
    if device.type == "cuda":
        return compile_decode_step(device)  # the library's own: CUDA graphs
    scalars = torch._dynamo.config.patch(capture_scalar_outputs=True)
    return scalars(torch.compile(decode_step, fullgraph=True, dynamic=False, backend="eager"))


def measure(decoder: Decoder, prompt: torch.Tensor, n: int, repeats: int) -> float:
    """Median tokens/s over ``repeats`` runs after one warm-up run of the same shapes and cache."""
    decoder.run(prompt, n)
    rates = sorted(decoder.run(prompt, n) for _ in range(repeats))
    return rates[len(rates) // 2]


def run_tests(results: Results, path: str | None) -> None:
    """The parity tests' outcome, reported by ``gpu_check.sh`` in a file (never stops the benchmark)."""
    if path and Path(path).exists():
        results.data["tests"] = Path(path).read_text().strip().splitlines()[-3:]
        results.write()


def table(rows: list[dict]) -> str:
    head = (
        f"{'weights':7s} {'mode':8s} {'batch':>5s} {'tok/s':>8s} {'per seq':>8s} {'GiB':>6s} "
        f"{'roofline':>8s} {'32 layers':>9s}"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['weights']:7s} {r['mode']:8s} {r['batch']:5d} failed: {r['error'][:60]}")
            continue
        if "skipped" in r:
            lines.append(f"{r['weights']:7s} {r['mode']:8s} {r['batch']:5d} skipped ({r['skipped']})")
            continue
        frac = f"{r['roofline_fraction']:.0%}" if r["batch"] == 1 else ""
        scaled = f"{r['scaled_tok_s']:.1f}" if r["batch"] == 1 else ""
        lines.append(
            f"{r['weights']:7s} {r['mode']:8s} {r['batch']:5d} {r['tok_s']:8.1f} {r['tok_s'] / r['batch']:8.1f} "
            f"{r['memory_GiB']:6.1f} {frac:>8s} {scaled:>9s}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every code path on the CPU, fake devices, tiny model")
    p.add_argument("--layers", type=int, default=None, help="layers to build (default: all that fit)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument(
        "--weights",
        default="bf16,int8",
        help="bf16, int8 (quantises the bf16 model, the GPU kernels installed), int8-ref (without them)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--headroom-gib", type=float, default=8.0, help="memory kept free for caches and activations")
    p.add_argument("--budget-s", type=float, default=360.0, help="skip compiled runs that would start after this")
    p.add_argument("--tests-log", default=None, help="the parity tests' output (from gpu_check.sh)")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else bench_out/)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out or Path(os.environ.get("OUT") or "bench_out") / "gpu_check.json")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to do (--dry-run runs it on the CPU)")
        return 0
    import mixtral_lite

    print(f"mixtral_lite from {Path(mixtral_lite.__file__).parent}; torch {torch.__version__}", flush=True)
    full = MixtralConfig.from_preset("tiny" if args.dry_run else "mixtral-8x7b")
    if args.dry_run:
        device = torch.device("cpu")
        n_layers = args.layers or full.num_hidden_layers
        name = "dry run (CPU, tiny preset)"
    else:
        device = torch.device("cuda")
        n_layers = args.layers or layers_that_fit(full, torch.bfloat16, args.headroom_gib * GiB)
        name = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB)"
    if n_layers < 1:
        print("gpu_check: not even one Mixtral-8x7B layer fits in this GPU's free memory")
        return 1
    config = MixtralConfig.from_dict({**full.to_dict(), "num_hidden_layers": n_layers})
    print(f"device: {name}; {n_layers} of {full.num_hidden_layers} layers", flush=True)
    bandwidth = measure_bandwidth(device, nbytes=1 << (20 if args.dry_run else 29))
    model = build(config, torch.bfloat16, device, seed=0)
    results = Results(
        out,
        {"machine": machine_info(device), "device": name, "layers": n_layers, "bandwidth_TBps": bandwidth / 1e12},
    )
    run_tests(results, args.tests_log)
    length = args.prompt_len + args.new_tokens
    results.data["sdpa_decode_backend"] = backend = decode_backend(model, 1, length)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; decode attention backend: {backend}", flush=True)
    gen = torch.Generator().manual_seed(1)
    rows: list[dict] = []
    for weights in args.weights.split(","):
        if weights in ("int8", "int8-ref"):
            torch._dynamo.reset()  # compiled graphs hold the previous weights or modules
            if not getattr(model, "quantized", None):
                quantize_model(model)
            if weights == "int8":  # the GPU kernels (Triton; on the dry run in Triton's interpreter)
                kernels = install_cuda_kernels(model, device_types=(device.type,))
            else:  # the reference int8 modules' GPU branches, for comparison
                uninstall_cuda_kernels(model)
                kernels = "GPU kernels: none (reference modules)"
            results.data[f"{weights}_kernels"] = str(kernels)
            print(kernels, flush=True)
        per_token = active_weight_bytes(model)
        full_per_token = per_token * full.num_hidden_layers / n_layers  # close: the head is ~1% at 32 layers
        roofline = bandwidth / per_token
        results.data[f"{weights}_bytes_per_token"] = per_token
        print(f"{weights}: {per_token / 1e9:.2f} GB read per token -> roofline {roofline:.0f} tok/s", flush=True)
        modes = [("eager", decode_step)] + ([] if args.no_compile else [("compiled", None)])
        for mode, step in modes:
            decoder = Decoder(model, step or compiled_step(device))
            for b in (int(x) for x in args.batches.split(",")):
                row = {"weights": weights, "mode": mode, "batch": b}
                if mode == "compiled" and time.perf_counter() - start > args.budget_s:
                    row["skipped"] = "time budget"
                else:
                    prompt = torch.randint(3, config.vocab_size, (b, args.prompt_len), generator=gen).to(device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    try:
                        rate = measure(decoder, prompt, args.new_tokens, args.repeats)
                    except Exception as exc:  # a failure must not hide the other numbers
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"
                    else:
                        row.update(
                            tok_s=rate,
                            memory_GiB=memory_gib(device),
                            roofline_fraction=rate / b / roofline if b == 1 else None,
                            scaled_tok_s=rate * per_token / full_per_token,
                            seconds=time.perf_counter() - t0,
                        )
                rows.append(row)
                results.add(f"{weights}_{mode}_b{b}", row)
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{name}; decode attention: {backend}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(table(rows))
    print(f"total {time.perf_counter() - start:.0f} s; JSON: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
