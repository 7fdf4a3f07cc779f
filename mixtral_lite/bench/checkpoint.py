"""The benchmark's random checkpoint, written by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import MixtralConfig
from .options import Options


def bench_config(opts: Options) -> MixtralConfig:
    config = MixtralConfig.from_preset(opts.preset)
    if opts.layers is not None:
        config = MixtralConfig.from_dict({**config.to_dict(), "num_hidden_layers": opts.layers})
    return config


def make_checkpoint(folder: Path, config: MixtralConfig, *, seed: int, std: float) -> Path:
    """Write a random transformers checkpoint with peaked logits (reused when one with the same
    recipe exists).

    Matrices are N(0, std) and norms ones, except that the embeddings are N(0, 50 * std), larger
    than what the layers add to the residual stream, and the output head is a scaled copy of the
    embedding table with its rows permuted: every token then has one successor whose logit leads
    by many standard deviations, while every layer still runs at full cost. Greedy tokens are thus
    far from ties, so implementations that round differently (bfloat16, int8) can be held to the
    same answer.
    """
    try:
        from transformers import MixtralConfig as HFConfig
        from transformers import MixtralForCausalLM
    except ImportError:  # --ours-only without transformers: the same recipe, written by our own model
        return _make_checkpoint_ours(folder, config, seed=seed, std=std)

    recipe = {"config": config.to_hf_dict(), "seed": seed, "std": std, "kind": "peaked-successor"}
    meta = folder / "bench_recipe.json"
    if meta.exists() and json.loads(meta.read_text()) == recipe:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        hf = MixtralForCausalLM(HFConfig(**config.to_hf_dict()))
    hf = hf.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        emb = hf.model.embed_tokens.weight
        emb.mul_(50.0)
        if not config.tie_word_embeddings:
            successor = torch.randperm(config.vocab_size, generator=gen)  # token v is followed by successor[v]
            head = torch.empty_like(emb)
            head[successor] = emb * (std / emb.std())  # row successor[v] points at v's embedding
            hf.lm_head.weight.copy_(head)
    hf.save_pretrained(folder)
    meta.write_text(json.dumps(recipe))
    return folder


def _make_checkpoint_ours(
    folder: Path, config: MixtralConfig, *, seed: int, std: float, dtype: torch.dtype = torch.float32
) -> Path:
    """``make_checkpoint``'s recipe on our ``Mixtral`` (other random draws, the same statistics),
    the weights made in ``dtype`` from the start (built on the meta device, then allocated)."""
    from ..model.mixtral import Mixtral
    from ..weights.saving import save_pretrained

    kind = "peaked-successor-ours" + ("" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}")
    recipe = {"config": config.to_hf_dict(), "seed": seed, "std": std, "kind": kind}
    meta = folder / "bench_recipe.json"
    if meta.exists() and json.loads(meta.read_text()) == recipe:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = Mixtral(config)
    model = model.to(dtype).to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        emb = model.tok_embeddings.weight
        emb.mul_(50.0)
        if not config.tie_word_embeddings:
            successor = torch.randperm(config.vocab_size, generator=gen)
            head = torch.empty_like(emb)
            head[successor] = emb * (std / emb.std())
            model.output.weight.copy_(head)
    save_pretrained(model, folder)
    meta.write_text(json.dumps(recipe))
    return folder


def make_checkpoint_direct(folder: Path, config: MixtralConfig, *, seed: int, std: float, dtype: torch.dtype) -> Path:
    """``make_checkpoint``'s recipe with the weights drawn in ``dtype`` (bfloat16) from the start,
    never as float32: for shapes (8x7B-sized layers) whose float32 copy would not fit in memory.
    Written by our ``save_pretrained`` in the hub layout, which transformers and llama.cpp's
    converter read (reused when one with the same recipe exists)."""
    return _make_checkpoint_ours(folder, config, seed=seed, std=std, dtype=dtype)


def warm_page_cache(folder: Path) -> None:
    """Read the checkpoint once so both loaders start from the page cache."""
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
