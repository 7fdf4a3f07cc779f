"""Shared test helpers: tiny transformers checkpoints and loading them without the full loader."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mixtral_lite import Mixtral, MixtralConfig
from mixtral_lite.keymap import map_key


def hf_tiny_config(**overrides):
    from transformers import MixtralConfig as HFConfig

    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    kwargs.update(overrides)
    return HFConfig(**kwargs)


def make_hf_model(seed: int = 0, std: float = 0.2, **overrides):
    """A random transformers Mixtral with weights large enough that logits are far from ties."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(hf_tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    return model


def load_hf_folder(path: Path) -> Mixtral:
    """Load a single-file HF checkpoint through the key table (the loader tests cover the rest)."""
    config = MixtralConfig.from_pretrained(path)
    model = Mixtral(config)
    params = dict(model.named_parameters())
    for key, tensor in load_file(str(Path(path) / "model.safetensors")).items():
        target = map_key(key)
        dest = params[target.name] if target.expert is None else params[target.name][target.expert]
        with torch.no_grad():
            dest.copy_(tensor)
    return model.eval()
