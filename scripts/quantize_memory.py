"""Peak memory of quantising while loading: a >= 1 GB bfloat16 folder into an int4 (or int8) model.

Writes a random bfloat16 Mixtral checkpoint (hub layout) to a temporary folder, warms the page
cache, then in a fresh subprocess per run loads it with ``load_model(quantize=MODE)`` (each
weight quantised as it arrives) and, for contrast, loads it whole and quantises afterwards
(``quantize_model``). Peak memory is the child's VmHWM (file pages mapped by the loader count too)
minus its resident size after the imports. Prints the peak against the quantised model's bytes
plus the largest bfloat16 tensor, the bound the loader promises (<= 1.2x).

    python scripts/quantize_memory.py                 # ~1.2 GB bfloat16, int4
    python scripts/quantize_memory.py --mode int4-hqq --layers 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixtral_lite import Mixtral, MixtralConfig, save_pretrained  # noqa: E402

CHILD = textwrap.dedent(
    """
    import json, sys, time, torch

    def status(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    how, path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(2)
    from mixtral_lite import load_model, quantize_model
    imports = status("VmRSS")
    start = time.perf_counter()
    if how == "while-loading":
        model = load_model(path, dtype=torch.bfloat16, quantize=mode, progress=False, cpu_kernels=False)
    else:
        model = quantize_model(load_model(path, dtype=torch.bfloat16, progress=False, cpu_kernels=False), mode)
    seconds = time.perf_counter() - start
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    print(json.dumps({
        "imports": imports, "peak": status("VmHWM"), "seconds": seconds,
        "model_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }))
    """
)


def make_checkpoint(folder: Path, layers: int) -> tuple[int, int]:
    """A random bfloat16 checkpoint; returns (its bytes, the largest tensor's bytes in our model)."""
    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        moe={"num_experts": 8, "num_experts_per_tok": 2},
    )
    torch.manual_seed(0)
    model = Mixtral(config).to(torch.bfloat16)
    save_pretrained(model, folder, max_shard_size="500MB")
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return sum(sizes), max(sizes)


def run_child(how: str, folder: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, how, str(folder), mode], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{how} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (6: about 1.2 GB of bfloat16)")
    parser.add_argument("--mode", default="int4", help="quantize mode (default int4)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a new folder in /tmp)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="mixtral_lite_quantize_memory_", dir="/tmp"))
    try:
        if not (folder / "config.json").exists():
            total, largest = make_checkpoint(folder, args.layers)
        else:
            total, largest = sum(f.stat().st_size for f in folder.glob("*.safetensors")), 0
        for f in sorted(folder.glob("*.safetensors")):  # warm the page cache
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        print(f"checkpoint: {folder}, {total / 1e9:.2f} GB bfloat16, largest tensor {largest / 1e6:.0f} MB")
        print(f"{'how':<16} {'peak - imports GB':>18} {'model GB':>9} {'bound GB':>9} {'peak / bound':>13} {'s':>6}")
        for how in ("while-loading", "after-loading"):
            runs = [run_child(how, folder, args.mode) for _ in range(args.repeats)]
            peak = max(r["peak"] - r["imports"] for r in runs)
            model = runs[0]["model_bytes"]
            bound = model + largest
            seconds = min(r["seconds"] for r in runs)
            cells = f"{peak / 1e9:>18.3f} {model / 1e9:>9.3f} {bound / 1e9:>9.3f} {peak / bound:>13.2f}"
            print(f"{how:<16} {cells} {seconds:>6.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
