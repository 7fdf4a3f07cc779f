"""Mixtral-8x7B's full shape on a 24 GB, 2-core machine: experts read from disk as tokens choose them.

Writes a checkpoint with the exact 8x7B tensor shapes (all 32 layers) in int8, directly, tensor
chunk by chunk (random int8 weights and per-row bfloat16 scales; never a bfloat16 copy: ~47 GB on
disk), then runs ``generate`` for 32 greedy tokens in a fresh process per placement: every layer's
experts on disk, then 4 and 8 layers resident in memory. Each run reports its peak RSS, load time,
prefill and decode speed and the expert bytes read per decoded token. A 4-layer checkpoint of the
same shapes checks that the greedy tokens with experts on disk equal the all-resident model's.

    python scripts/offload_8x7b.py --dir /work/offload-8x7b            # write, run, keep the files
    python scripts/offload_8x7b.py --dir /work/offload-8x7b --delete   # and delete them after
    python scripts/offload_8x7b.py --dir DIR --runs disk               # only some runs

Random weights route tokens about uniformly: a worst case for the cache (a trained model reuses
experts more, see docs/offloading.md). Run it with ``nice``: it reads the disk hard.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixtral_lite import Mixtral, MixtralConfig  # noqa: E402
from mixtral_lite.model.quant import DEFAULT_GROUP_SIZE, quantize_model  # noqa: E402
from mixtral_lite.weights.checkpoint import DTYPE_NAMES, INDEX_FILE  # noqa: E402
from mixtral_lite.weights.loading import model_tensors  # noqa: E402
from mixtral_lite.weights.quantized import QuantizationConfig  # noqa: E402

CHUNK = 1 << 26  # bytes generated and written at a time
LAYERS_PER_SHARD = 2
PROMPT = [1, 415, 5565, 302, 4843, 349, 5465, 28723]  # eight ids under 32000
RUNS = {"disk": 0, "resident4": 4, "resident8": 8}  # run -> layers whose experts stay in memory


def checkpoint_tensors(config: MixtralConfig) -> list[tuple[str, torch.Size, torch.dtype]]:
    """Every tensor of the int8 checkpoint (names, shapes, dtypes) from the model quantised on
    the meta device: what ``save_pretrained`` of a quantised model writes and ``load_model`` reads."""
    with torch.device("meta"):
        model = Mixtral(config).to(torch.bfloat16)
    quantize_model(model)
    tensors, _ = model_tensors(model)
    return [(name, t.shape, t.dtype) for name, t in tensors.items()]


class Int8Source:
    """Random int8 bytes fast enough to write 47 GB: a pool of ``POOL`` uniform int8 values
    (-127..127) drawn once; each chunk is a window of it at a random offset, its bits 1-6 XORed
    with a random byte (so windows differ), clamped to -127. Drawing 47 GB afresh would take longer
    than writing it (0.07-0.3 GB/s per core here)."""

    POOL = 1 << 28

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        pool = rng.integers(-127, 128, self.POOL + CHUNK, dtype=np.int8)
        self.pool = pool

    def chunk(self, n: int) -> np.ndarray:
        start = int(self.rng.integers(0, self.POOL))
        out = self.pool[start : start + n].copy()
        out.view(np.uint8)[:] ^= np.uint8(self.rng.integers(0, 256)) & np.uint8(0x7E)
        return np.maximum(out, -127, out=out)


def fill(f, name: str, shape: torch.Size, dtype: torch.dtype, rng: np.random.Generator, src: Int8Source) -> None:
    """Write one tensor's bytes: random int8 weights (``Int8Source``), bfloat16 row
    scales 1 / (74 sqrt(in)) (int8 of std 74 times that: weights of std 1/sqrt(in), as an init),
    norms of ones, other floats N(0, 0.02)."""
    numel = shape.numel()
    item = torch.empty((), dtype=dtype).element_size()
    done = 0
    while done < numel:
        n = min(numel - done, CHUNK // item)
        if dtype == torch.int8:
            f.write(src.chunk(n))
            done += n
            continue
        if name.endswith("_scale") or name.endswith(".scale"):
            fan_in = {"w2_scale": 14336}.get(name.rsplit(".", 1)[-1], 4096)
            t = torch.full((n,), 1.0 / (74 * fan_in**0.5), dtype=dtype)
        elif "norm" in name:
            t = torch.ones(n, dtype=dtype)
        else:
            t = torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.02).to(dtype)
        f.write(t.numpy().tobytes() if dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        done += n


def write_checkpoint(folder: Path, layers: int) -> float:
    """The int8 checkpoint of 8x7B's shapes with ``layers`` layers; returns seconds taken."""
    start = time.perf_counter()
    full = MixtralConfig.from_preset("mixtral-8x7b")
    config = MixtralConfig.from_dict({**full.to_dict(), "num_hidden_layers": layers})
    tensors = checkpoint_tensors(config)
    shards: dict[int, list] = {}
    for item in tensors:
        name = item[0]
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        shards.setdefault(layer // LAYERS_PER_SHARD if layer >= 0 else 0, []).append(item)
    folder.mkdir(parents=True, exist_ok=True)
    count = len(shards)
    weight_map, total = {}, 0
    rng = np.random.default_rng(0)
    src = Int8Source(rng)
    for i, items in sorted(shards.items()):
        file = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in items:
            n = shape.numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, dtype in items:
                fill(f, name, shape, dtype, rng, src)
        total += offset
        print(f"  wrote {file} ({offset / 1e9:.2f} GB)", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    data = {**config.to_hf_dict(), "model_type": "mixtral_lite", "architectures": ["MixtralLiteForCausalLM"]}
    data.update({"torch_dtype": "bfloat16", "dtype": "bfloat16"})
    data["quantization_config"] = QuantizationConfig("int8", DEFAULT_GROUP_SIZE, include_output=True).to_json()
    (folder / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    return time.perf_counter() - start


class _Tokenizer:
    """Ids in, ids out: the random model's tokens mean nothing."""

    vocab_size, eos_id = 32000, -1

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def run_one(folder: Path, on_disk: int | None, tokens: int, cache: int, dtype: str) -> dict:
    """One generate call in this process; ``on_disk``: layers whose experts stay on disk (None:
    everything resident)."""
    from mixtral_lite import generate, load_model

    torch.set_num_threads(2)
    start = time.perf_counter()
    placement = {} if on_disk is None else {"experts_on": "disk", "n_cpu_moe": on_disk, "expert_cache": cache}
    model = load_model(folder, dtype=dtype, progress=False, **placement)
    load_s = time.perf_counter() - start
    result = generate(model, _Tokenizer(), PROMPT, max_new_tokens=tokens)
    s = result.stats
    out = {
        "layers": model.config.num_hidden_layers,
        "on_disk": on_disk,
        "cache": cache,
        "dtype": dtype,
        "load_s": load_s,
        "prefill_s": s.prefill_time,
        "decode_tok_s": s.decode_tokens_per_s,
        "tokens": result.token_ids,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    d = s.as_dict().get("experts")
    if d is not None:
        out["read_gb_per_token"] = d["decode"]["bytes_read_per_token"] / 1e9
        out["hit_rate"] = d["decode"]["hit_rate"]
        out["prefill_read_gb"] = d["prefill"]["bytes_read"] / 1e9
    return out


def run_child(folder: Path, on_disk: int | None, tokens: int, cache: int, dtype: str = "bfloat16") -> dict:
    """``run_one`` in a fresh process: its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", str(folder), "--tokens", str(tokens), "--cache", str(cache)]
    cmd += ["--dtype", dtype]
    if on_disk is not None:
        cmd += ["--on-disk", str(on_disk)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def drop_page_cache_of(folder: Path) -> None:
    """Each run starts with the files out of the page cache (posix_fadvise DONTNEED), so reads are
    the disk's, not a previous run's."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, help="where the checkpoints go (~47 GB + ~6 GB)")
    p.add_argument(
        "--runs", default="check,disk,resident4,resident8", help="comma-separated: check, " + ", ".join(RUNS)
    )
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=32, help="layers of the large checkpoint (8x7B: 32)")
    p.add_argument("--check-layers", type=int, default=4, help="layers of the checkpoint both ways fit")
    p.add_argument("--out", type=Path, help="also write the results as JSON here (after every run)")
    p.add_argument("--cache", type=int, default=0, help="experts per disk layer kept in memory")
    p.add_argument("--delete", action="store_true", help="delete the checkpoints when done")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--on-disk", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args.child, args.on_disk, args.tokens, args.cache, args.dtype)))
        return
    if args.dir is None:
        p.error("--dir is required")
    runs = args.runs.split(",")
    rows: list[tuple[str, dict]] = []

    def record(label: str, result: dict) -> None:
        rows.append((label, result))
        print(json.dumps({"run": label, **result}), file=sys.stderr, flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps([{"run": k, **v} for k, v in rows], indent=1) + "\n")

    try:
        if "check" in runs:  # a few layers: both fit in memory, the greedy tokens must match
            n = args.check_layers
            small = args.dir / f"layers{n}"
            if not (small / "config.json").exists():
                print(f"writing {small} ({n} layers) ...", file=sys.stderr)
                print(f"  {write_checkpoint(small, n):.0f} s", file=sys.stderr)
            # float32 activations: the resident layers' fused kernel and the disk layers' per-expert
            # products sum in other orders; in bfloat16 that rounding could flip a near-tied token
            drop_page_cache_of(small)
            record(f"{n} layers, all resident (float32)", run_child(small, None, args.tokens, 0, "float32"))
            drop_page_cache_of(small)
            record(f"{n} layers, experts on disk (float32)", run_child(small, n, args.tokens, args.cache, "float32"))
            same = rows[-2][1]["tokens"] == rows[-1][1]["tokens"]
            print(f"{n} layers: greedy tokens with experts on disk equal the resident model's: {same}")
            if not same:
                raise SystemExit(f"tokens differ: {rows[-2][1]['tokens']} vs {rows[-1][1]['tokens']}")
        full = args.dir / f"layers{args.layers}"
        if any(r in RUNS for r in runs):
            if not (full / "config.json").exists():
                print(f"writing {full} ({args.layers} layers) ...", file=sys.stderr)
                print(f"  {write_checkpoint(full, args.layers):.0f} s", file=sys.stderr)
            for r in runs:
                if r in RUNS:
                    resident = RUNS[r]
                    on_disk = args.layers - resident
                    drop_page_cache_of(full)
                    label = f"{args.layers} layers, {resident} resident, {on_disk} on disk"
                    record(label, run_child(full, on_disk, args.tokens, args.cache))
    finally:
        if args.delete and args.dir is not None and args.dir.exists():
            shutil.rmtree(args.dir)
    print(f"\n| run | peak RSS | load | prefill ({len(PROMPT)} tokens) | decode | expert bytes read / token | hits |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        read = f"{r['read_gb_per_token']:.2f} GB" if "read_gb_per_token" in r else "-"
        hits = f"{r['hit_rate']:.0%}" if "hit_rate" in r else "-"
        print(
            f"| {label} | {r['peak_rss_gb']:.2f} GB | {r['load_s']:.1f} s | {r['prefill_s']:.1f} s | "
            f"{r['decode_tok_s']:.3f} tok/s | {read} | {hits} |"
        )


if __name__ == "__main__":
    main()
