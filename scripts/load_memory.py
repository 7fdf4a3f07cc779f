"""Peak resident memory and load speed: mixtral_lite.load_model vs transformers' from_pretrained.

Writes a random float32 Mixtral checkpoint of about 1.3 GB (hub layout, 500 MB shards) to a
temporary folder, warms the page cache, then loads it into bfloat16 with each loader in a fresh
subprocess (several times; the fastest run's time, the highest peak). Peak memory is the child's
VmHWM (its own high-water mark: ru_maxrss can carry the parent's across exec). Prints a table and
deletes the checkpoint unless --keep.

    python scripts/load_memory.py            # ~1.3 GB checkpoint in /tmp
    python scripts/load_memory.py --layers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
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

    loader, path = sys.argv[1], sys.argv[2]
    if loader == "mixtral_lite":
        from mixtral_lite import load_model
        load = lambda: load_model(path, dtype=torch.bfloat16, progress=False)
    else:
        from transformers import MixtralForCausalLM
        from transformers.utils import logging
        logging.disable_progress_bar()
        load = lambda: MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    imports = status("VmRSS")
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}, {p.dtype for p in params}
    print(json.dumps({
        "imports": imports,
        "peak": status("VmHWM"),
        "seconds": seconds,
        "model_bytes": sum(p.numel() * p.element_size() for p in params),
    }))
    """
)


def make_checkpoint(folder: Path, layers: int) -> int:
    """A random float32 checkpoint; returns its parameter count."""
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
    model = Mixtral(config)
    save_pretrained(model, folder, max_shard_size="500MB")
    return sum(p.numel() for p in model.parameters())


def run_child(loader: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, loader, str(folder)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{loader} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3, help="decoder layers (3: about 1.3 GB of float32)")
    parser.add_argument("--repeats", type=int, default=2, help="loads per loader")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a new folder in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = parser.parse_args()

    folder = Path(args.dir or tempfile.mkdtemp(prefix="mixtral_lite_load_memory_", dir="/tmp"))
    try:
        start = time.perf_counter()
        n_params = make_checkpoint(folder, args.layers)
        files = sorted(folder.glob("*.safetensors"))
        file_bytes = sum(f.stat().st_size for f in files)
        print(
            f"checkpoint: {folder} ({len(files)} shards, {file_bytes / 1e9:.2f} GB float32, "
            f"{n_params / 1e6:.0f}M parameters, written in {time.perf_counter() - start:.0f} s)"
        )
        for f in files:  # warm the page cache
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        results = {}
        for loader in ("mixtral_lite", "transformers"):
            runs = [run_child(loader, folder) for _ in range(args.repeats)]
            results[loader] = {
                "imports": min(r["imports"] for r in runs),
                "peak": max(r["peak"] for r in runs),
                "seconds": min(r["seconds"] for r in runs),
                "model_bytes": runs[0]["model_bytes"],
            }
        bf16 = results["mixtral_lite"]["model_bytes"]
        print(f"bfloat16 model: {bf16 / 1e9:.2f} GB; float32 files: {file_bytes / 1e9:.2f} GB\n")
        header = ("loader", "peak RSS GB", "after imports GB", "peak - imports GB", "load s", "GB/s (files)")
        rows = [header]
        for loader, r in results.items():
            rows.append(
                (
                    loader,
                    f"{r['peak'] / 1e9:.2f}",
                    f"{r['imports'] / 1e9:.2f}",
                    f"{(r['peak'] - r['imports']) / 1e9:.2f}",
                    f"{r['seconds']:.2f}",
                    f"{file_bytes / r['seconds'] / 1e9:.2f}",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for i, row in enumerate(rows):
            print(
                "  ".join(
                    c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
            if i == 0:
                print("  ".join("-" * w for w in widths))
        ours, theirs = results["mixtral_lite"], results["transformers"]
        print(
            f"\nmixtral_lite peak = after-imports + {(ours['peak'] - ours['imports']) / bf16:.2f} x the bf16 model "
            f"({(ours['peak'] - ours['imports']) / file_bytes:.2f} x the float32 files); "
            f"peak vs transformers: {ours['peak'] / theirs['peak']:.2f}x"
        )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
