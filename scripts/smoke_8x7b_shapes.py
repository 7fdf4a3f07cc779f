"""Smoke test at real scale: a 1-layer checkpoint with Mixtral-8x7B's exact tensor shapes.

Writes random bfloat16 weights (3.4 GB) in the hub's key layout and shard naming
(``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json`` + ``config.json``),
describes the folder as ``mixtral-lite info`` does, loads it with ``load_model``, checks every shape
and the parameter count against Mixtral-8x7B's per-layer numbers, and runs one forward pass.
Takes about a minute on two CPU cores; not part of ``make test``.

    python scripts/smoke_8x7b_shapes.py                  # CPU, bfloat16, checkpoint in /tmp
    python scripts/smoke_8x7b_shapes.py --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixtral_lite import Mixtral, MixtralConfig, count_parameters, load_model  # noqa: E402
from mixtral_lite.commands.info import describe, format_report  # noqa: E402
from mixtral_lite.weights.keymap import hf_items  # noqa: E402
from mixtral_lite.weights.saving import parse_size, write_safetensors  # noqa: E402

# Hub tensor shapes of one Mixtral-8x7B layer and the ends (REFERENCE.md).
HUB_SHAPES = {
    "model.embed_tokens.weight": (32000, 4096),
    "lm_head.weight": (32000, 4096),
    "model.norm.weight": (4096,),
    "model.layers.0.input_layernorm.weight": (4096,),
    "model.layers.0.post_attention_layernorm.weight": (4096,),
    "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
    "model.layers.0.self_attn.k_proj.weight": (1024, 4096),
    "model.layers.0.self_attn.v_proj.weight": (1024, 4096),
    "model.layers.0.self_attn.o_proj.weight": (4096, 4096),
    "model.layers.0.block_sparse_moe.gate.weight": (8, 4096),
    **{f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": (14336, 4096) for e in range(8)},
    **{f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight": (14336, 4096) for e in range(8)},
    **{f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight": (4096, 14336) for e in range(8)},
}
# Per layer: attention 41,943,040 + 8 experts x 176,160,768 + router 32,768 + norms 8,192;
# embedding and lm_head 131,072,000 each; final norm 4,096.
EXPECTED_PARAMS = 41_943_040 + 8 * 176_160_768 + 32_768 + 8_192 + 2 * 131_072_000 + 4_096


def write_checkpoint(folder: Path, config: MixtralConfig, shard_size: int) -> list[Path]:
    """Random bf16 tensors in hub layout, generated shard by shard (one shard in memory at a time)."""
    with torch.device("meta"):
        meta = Mixtral(config)
    keys = [(k, tuple(t.shape)) for k, t in hf_items(dict(meta.state_dict()))]
    assert dict(keys) == HUB_SHAPES, "the key table no longer gives the hub layout"
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in keys:
        n = 2 * torch.Size(shape).numel()
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += n
    g = torch.Generator().manual_seed(0)
    weight_map, files = {}, []
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = []
        for key, shape in shard:
            if key.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, generator=g, dtype=torch.bfloat16).mul_(0.02)
            tensors.append((key, t))
            weight_map[key] = name
        files.append(write_safetensors(folder / name, tensors))
        del tensors
    index = {"metadata": {"total_size": sum(f.stat().st_size for f in files)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps({**config.to_hf_dict(), "torch_dtype": "bfloat16"}, indent=2))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shard-size", default="1GB", help="shard size (the hub uses about 5GB)")
    parser.add_argument("--dir", default=None, help="checkpoint folder (default: a new folder in /tmp)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    config = MixtralConfig.from_preset("mixtral-8x7b")
    config.num_hidden_layers = 1
    folder = Path(args.dir or tempfile.mkdtemp(prefix="mixtral_lite_8x7b_1layer_", dir="/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        files = write_checkpoint(folder, config, parse_size(args.shard_size))
        total = sum(f.stat().st_size for f in files)
        print(f"wrote {len(files)} shards, {total / 1e9:.2f} GB, in {time.perf_counter() - t0:.1f} s: {folder}\n")

        report = describe(folder)
        print(format_report(report), "\n")
        assert not report["problems"], report["problems"]

        t0 = time.perf_counter()
        model = load_model(folder, dtype=torch.bfloat16, device=args.device)
        seconds = time.perf_counter() - t0
        print(f"loaded in {seconds:.1f} s ({total / seconds / 1e9:.2f} GB/s) on {model.device}, {model.dtype}")

        n = sum(p.numel() for p in model.parameters())
        counted = count_parameters(model).total  # also checks the model's tensors against the config
        assert n == counted == EXPECTED_PARAMS, (n, counted, EXPECTED_PARAMS)
        assert tuple(model.layers[0].feed_forward.w1.shape) == (8, 14336, 4096)
        assert tuple(model.layers[0].feed_forward.w2.shape) == (8, 4096, 14336)
        print(f"parameters: {n:,} (expected {EXPECTED_PARAMS:,})")

        ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28705, 28770]], device=model.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(ids)
        assert logits.shape == (1, 8, 32000) and torch.isfinite(logits).all()
        print(f"forward: logits {tuple(logits.shape)} {logits.dtype}, finite, {time.perf_counter() - t0:.2f} s")
        print("OK")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
