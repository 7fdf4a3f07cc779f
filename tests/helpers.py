"""Shared test helpers: tiny transformers checkpoints, loading them, and writing other layouts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from mixtral_lite import Mixtral, load_model
from mixtral_lite.weights.checkpoint import half_to_interleaved
from mixtral_lite.weights.keymap import map_key
from mixtral_lite.weights.saving import write_safetensors


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
    """Load a checkpoint folder with ``mixtral_lite.load_model`` (float32 on the CPU)."""
    return load_model(path, progress=False)


def save_mistral_layout(hf_model, folder: Path, fmt: str = "safetensors", permute: bool = True) -> Path:
    """Write a transformers Mixtral in the original Mistral layout: params.json, original key names,
    wq/wk rows back in the interleaved-pair RoPE order (``permute=False`` skips that, for tests that
    prove it matters). ``fmt``: "safetensors" (consolidated.safetensors) or "pth" (consolidated.00.pth).
    """
    c = hf_model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    heads = {"wq": c.num_attention_heads, "wk": c.num_key_value_heads}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in _hub_state(hf_model).items():
        target = map_key(key)
        name = target.name
        if target.expert is not None:  # layers.L.feed_forward.wN -> layers.L.feed_forward.experts.E.wN.weight
            prefix, proj = name.rsplit(".", 1)
            name = f"{prefix}.experts.{target.expert}.{proj}.weight"
        proj = name.split(".")[-2]
        if permute and name.startswith("layers.") and proj in heads:
            tensor = half_to_interleaved(tensor, heads[proj])
        state[name] = tensor.contiguous()
    params = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "head_dim": head_dim,
        "hidden_dim": c.intermediate_size,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "norm_eps": c.rms_norm_eps,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_parameters["rope_theta"],
        "moe": {"num_experts": c.num_local_experts, "num_experts_per_tok": c.num_experts_per_tok},
    }
    (folder / "params.json").write_text(json.dumps(params))
    if fmt == "pth":
        torch.save(state, folder / "consolidated.00.pth")
    else:
        write_safetensors(folder / "consolidated.safetensors", state.items())
    return folder


def _hub_state(hf_model) -> dict[str, torch.Tensor]:
    """The hub-layout state dict of a transformers model (what its save_pretrained writes)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        return load_file(str(Path(tmp) / "model.safetensors"))
