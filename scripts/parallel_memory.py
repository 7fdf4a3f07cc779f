"""Per-rank memory while loading: single process vs ``--tp N`` vs ``--ep N`` (torchrun, gloo/nccl).

Without --model, writes a random bfloat16 checkpoint (about 0.9 GB, 4 shards: hidden 1024, 8 experts
of 3584, 4 layers, vocab 32000) to a temporary folder first. Each configuration runs in fresh
processes; each rank resets its peak-RSS counter (/proc/self/clear_refs) just before loading and
reports:

  load peak   the highest resident set size during loading, minus the resident size just before
  resident    resident set size after loading, minus the same baseline (what the shard keeps)
  params      bytes of the parameters this rank holds (its device memory on a GPU: also reported)
  split       the part of params that tensor / expert parallelism divides (attention and experts;
              embeddings, norms, router and lm head are replicated on every rank)

Usage:
  python scripts/parallel_memory.py [--model DIR] [--n 2] [--dtype bfloat16] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMALL = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rope_theta=1e6,
    model_type="mixtral",
    torch_dtype="bfloat16",
)


def make_checkpoint(folder: Path) -> None:
    """A random Hugging Face layout checkpoint, one shard per layer plus one for the embeddings."""
    from safetensors.torch import save_file

    from mixtral_lite import Mixtral, MixtralConfig
    from mixtral_lite.weights.keymap import hf_items

    config = MixtralConfig.from_hf_dict(SMALL)
    with torch.device("meta"):
        model = Mixtral(config)
    g = torch.Generator().manual_seed(0)
    shards: dict[str, list[str]] = {}
    for name in dict(model.named_parameters()):
        m = name.split(".")
        shard = f"layer{m[1]}" if m[0] == "layers" else "embed"
        shards.setdefault(shard, []).append(name)
    weight_map = {}
    for i, (_, names) in enumerate(sorted(shards.items())):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        params = dict(model.named_parameters())
        for name in names:
            shape = params[name].shape
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
            for key, part in hf_items({name: t.to(torch.bfloat16)}):
                tensors[key] = part.contiguous()
        save_file(tensors, str(folder / file))
        weight_map.update({k: file for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(SMALL))


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def measure(folder: str, tp: int, ep: int, dtype: str, device: str) -> None:
    """One configuration, in this process (under torchrun for tp * ep > 1): print one JSON line per rank."""
    import torch.distributed as dist

    from mixtral_lite.parallel import init_parallel, load_parallel, shutdown
    from mixtral_lite.weights.loading import load_model

    state = init_parallel(tp, ep, device)
    before = _status()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    if state.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(state.device)
    start = time.perf_counter()
    if state.distributed:
        model = load_parallel(folder, state, dtype=dtype)
    else:
        model = load_model(folder, dtype=dtype, device=state.device)
    seconds = time.perf_counter() - start
    after = _status()
    named = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    params = sum(p.numel() * p.element_size() for _, p in named)
    split = sum(p.numel() * p.element_size() for n, p in named if ".attention.w" in n or ".feed_forward.w" in n)
    row = {
        "config": f"tp{tp}-ep{ep}" if state.distributed else "single",
        "rank": state.rank,
        "baseline": before["VmRSS"],
        "load_peak": after["VmHWM"] - before["VmRSS"],
        "resident": after["VmRSS"] - before["VmRSS"],
        "anon": after["RssAnon"] - before["RssAnon"],
        "params": params,
        "split": split,
        "device_peak": torch.cuda.max_memory_allocated(state.device) if state.device.type == "cuda" else None,
        "seconds": seconds,
    }
    rows = [None] * state.world_size
    if state.distributed:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if state.is_main:
        for r in rows:
            print("ROW " + json.dumps(r), flush=True)
    shutdown(state)


def run_config(folder: Path, n: int, tp: int, ep: int, dtype: str, device: str) -> list[dict]:
    script = [str(Path(__file__).resolve()), "--measure", str(folder), "--tp", str(tp), "--ep", str(ep)]
    script += ["--dtype", dtype, "--device", device]
    if tp * ep == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print("$ " + " ".join(["python" if c == sys.executable else c for c in cmd]), file=sys.stderr)
    return [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (default: write a random 0.9 GB one to a temp folder)")
    p.add_argument("--n", type=int, default=2, help="ranks for --tp N and --ep N (default 2)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args.measure, args.tp, args.ep, args.dtype, args.device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else Path(tmp)
        if not args.model:
            make_checkpoint(folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        rows = run_config(folder, 1, 1, 1, args.dtype, args.device)
        rows += run_config(folder, args.n, args.n, 1, args.dtype, args.device)
        rows += run_config(folder, args.n, 1, args.n, args.dtype, args.device)
    single = rows[0]
    print(f"checkpoint: {size / 2**20:,.0f} MiB of safetensors, loaded as {args.dtype} on {args.device}")
    print(f"{'config':>10} {'rank':>4} {'load peak MiB':>14} {'resident MiB':>13} {'params MiB':>11} "
          f"{'split MiB':>10} {'split vs single':>16} {'peak vs single':>15} {'load s':>7}")  # fmt: skip
    for r in rows:
        print(
            f"{r['config']:>10} {r['rank']:>4} {r['load_peak'] / 2**20:>14,.0f} {r['resident'] / 2**20:>13,.0f} "
            f"{r['params'] / 2**20:>11,.0f} {r['split'] / 2**20:>10,.0f} {r['split'] / single['split']:>16.3f} "
            f"{r['load_peak'] / single['load_peak']:>15.3f} {r['seconds']:>7.2f}"
        )
    print("baseline RSS before loading (torch + process group), MiB: " + ", ".join(
        f"{r['config']}/{r['rank']}={r['baseline'] / 2**20:,.0f}" for r in rows))  # fmt: skip


if __name__ == "__main__":
    main()
