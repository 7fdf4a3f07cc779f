"""Parameter counts from the config: total, active per token, and a breakdown.

Active = every parameter a token's forward pass reads: all of attention, norms, router, shared
experts and dense layers, the ``num_experts_per_tok`` routed experts it is sent to, and the
embedding row table and lm_head counted in full (the usual convention; a token reads one
embedding row but the whole lm_head).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import MixtralConfig


@dataclass
class ParamCount:
    total: int
    active: int
    breakdown: dict[str, int] = field(default_factory=dict)  # total per part
    active_breakdown: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "active": self.active,
            "breakdown": self.breakdown,
            "active_breakdown": self.active_breakdown,
            "active_means": ACTIVE_MEANS,
        }


ACTIVE_MEANS = (
    "parameters read for one token: attention, norms, router, shared/dense FFNs, the top-k routed "
    "experts of each layer, plus the full embedding table and lm_head"
)


def count_parameters(config_or_model: MixtralConfig | nn.Module) -> ParamCount:
    """Count from the config; for a model, also check the count against its tensors' ``numel()``."""
    if isinstance(config_or_model, MixtralConfig):
        return _from_config(config_or_model)
    model = config_or_model
    config = getattr(model, "config", None)
    if not isinstance(config, MixtralConfig):
        raise TypeError(f"count_parameters: expected a MixtralConfig or Mixtral, got {type(model).__name__}")
    counted = _from_config(config)
    actual = sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once
    quantized = sum(b.numel() for b in model.buffers() if b.dtype == torch.int8)  # int8 weights
    offload = getattr(model, "offload", None)  # experts held in host memory or on disk (``offload``)
    one_layer = config.num_experts * 3 * config.hidden_size * config.intermediate_size
    elsewhere = 0 if offload is None else len(offload.placement.offloaded) * one_layer
    if actual + quantized + elsewhere != counted.total:
        held = actual + quantized + elsewhere
        raise ValueError(f"parameter count: config says {counted.total:,}, the model holds {held:,}")
    return counted


def attention_parameters(c: MixtralConfig) -> int:
    """One layer's attention: the projections (and biases, q/k norms; latent attention's LoRA
    projections and norms)."""
    d, hd, h, kv, a = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.attention
    if a.latent:
        qk = a.qk_nope_head_dim + hd
        q = d * h * qk if a.q_lora_rank is None else d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * h * qk
        kv_part = d * (a.kv_lora_rank + hd) + a.kv_lora_rank + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv_part + h * a.v_head_dim * d
    n = d * hd * (h * 2 + kv * 2)
    if a.qkv_bias:
        n += (h + 2 * kv) * hd
    if a.qk_norm == "full":
        n += (h + kv) * hd
    elif a.qk_norm == "head":
        n += 2 * hd
    return n


def _from_config(c: MixtralConfig) -> ParamCount:
    d, i = c.hidden_size, c.intermediate_size
    moe = c.moe
    n_layers = c.num_hidden_layers
    n_dense = sum(c.is_dense_layer(layer) for layer in range(n_layers))
    n_moe = n_layers - n_dense
    expert = 3 * d * i
    shared = 3 * d * c.shared_intermediate_size + (d if moe.shared_expert_gate else 0)
    parts = {
        "embeddings": c.vocab_size * d,
        "attention": n_layers * attention_parameters(c),
        "experts": n_moe * moe.num_experts * expert,
        "shared_experts": n_moe * shared if moe.n_shared_experts else 0,
        "dense_ffn": n_dense * 3 * d * c.dense_intermediate_size,
        "router": n_moe * d * (moe.num_experts + (moe.num_groups if moe.kind == "hierarchical" else 0)),
        "norms": (2 * n_layers + 1) * d,
        "lm_head": 0 if c.tie_word_embeddings else c.vocab_size * d,
    }
    active_parts = dict(parts)
    if moe.kind != "soft":  # soft routing runs every expert on every token
        groups = moe.top_k_groups if moe.kind == "hierarchical" else 1  # top-k inside each chosen group
        active_parts["experts"] = n_moe * groups * moe.num_experts_per_tok * expert
    parts = {
        k: v for k, v in parts.items() if v or k in ("embeddings", "attention", "experts", "router", "norms", "lm_head")
    }
    active_parts = {k: active_parts[k] for k in parts}
    return ParamCount(sum(parts.values()), sum(active_parts.values()), parts, active_parts)
