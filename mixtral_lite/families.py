"""The other MoE checkpoint families: their Hugging Face ``config.json`` read into the fields of
``MixtralConfig`` (keyword arguments; ``config.MixtralConfig.from_hf_dict`` builds the config).

Each family is configuration of the one reference model: OLMoE (q/k norm over the whole
projection, ``clip_qkv``), Qwen2-MoE (q/k/v biases, a gated shared expert, dense layers), Qwen3-MoE
(per-head q/k norm, dense layers), DeepSeek-V2/V3 (multi-head latent attention, shared experts,
softmax or sigmoid scoring, group-limited routing, dense first layers, YaRN). The family is found
from ``model_type``, or from ``architectures`` when that is missing, by exact name.

A setting that changes the computation and is not implemented is refused with its key named,
never ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ConfigError

# architectures[0] -> model_type, for configs without a model_type
ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


def model_type_of(data: dict[str, Any], source: str) -> str | None:
    """``model_type``, or the family named by ``architectures`` (exact names); both must agree."""
    model_type = data.get("model_type")
    archs = data.get("architectures")
    arch_type = None
    if isinstance(archs, list) and len(archs) == 1 and archs[0] in ARCHITECTURES:
        arch_type = ARCHITECTURES[archs[0]]
    if model_type is None:
        return arch_type
    if arch_type is not None and model_type in ARCHITECTURES.values() and arch_type != model_type:
        raise ConfigError(f"{source}: model_type {model_type!r} and architectures {archs} name different families")
    return model_type


def _get(data: dict[str, Any], key: str, default: Any) -> Any:
    value = data.get(key, default)
    return default if value is None else value


def _refuse(data: dict[str, Any], source: str, checks: dict[str, Callable[[Any], bool]]) -> None:
    """Refuse every key whose value the check says this model does not compute."""
    for key, unsupported in checks.items():
        if key in data and unsupported(data[key]):
            raise ConfigError(
                f"{source}: {key}: {data[key]!r:.120} is not implemented by this model; refusing to run it "
                "with another computation than it was trained with"
            )


def _rope(data: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the YaRN section from ``rope_theta`` + ``rope_scaling`` (hub files) or
    ``rope_parameters`` (what transformers 5.x writes)."""
    params = data.get("rope_parameters")
    scaling = data.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters: expected an object, got {params!r:.80}")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling: expected an object or null, got {scaling!r:.80}")
    merged = {**(scaling or {}), **(params or {})}
    theta = data.get("rope_theta", merged.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise ConfigError(f"{source}: rope type {rope_type!r} is not implemented (expected 'default' or 'yarn')")
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor: {merged['partial_rotary_factor']} is not implemented")
    yarn: dict[str, Any] = {"rope_type": "yarn"}
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if merged.get(key) is not None:
            yarn[key] = merged[key]
    for key in ("attention_factor", "truncate"):
        if merged.get(key) is not None:
            yarn[key] = merged[key]
    if "original_max_position_embeddings" not in yarn:
        raise ConfigError(f"{source}: rope_scaling: yarn needs original_max_position_embeddings")
    return theta, yarn


def _eos(data: dict[str, Any], source: str) -> int:
    eos = data.get("eos_token_id")
    if isinstance(eos, list):
        if not eos:
            raise ConfigError(f"{source}: eos_token_id: expected an id or a non-empty list of ids, got []")
        eos = eos[0]
    return 0 if eos is None else eos


def _common(data: dict[str, Any], source: str, family: str) -> dict[str, Any]:
    _refuse(data, source, {"hidden_act": lambda v: v != "silu"})
    if data.get("quantization_config") is not None:  # DeepSeek-V3's hub weights are fp8 with block scales
        raise ConfigError(
            f"{source}: quantization_config: {data['quantization_config']!r:.80} checkpoints are not read here; "
            "convert the weights to bfloat16 first"
        )
    theta, yarn = _rope(data, source)
    heads = _get(data, "num_attention_heads", 32)
    return {
        "family": family,
        "vocab_size": _get(data, "vocab_size", 32000),
        "hidden_size": _get(data, "hidden_size", 4096),
        "num_hidden_layers": _get(data, "num_hidden_layers", 32),
        "num_attention_heads": heads,
        "num_key_value_heads": _get(data, "num_key_value_heads", heads),
        "head_dim": data.get("head_dim"),
        "rms_norm_eps": _get(data, "rms_norm_eps", 1e-6),
        "rope_theta": theta,
        "rope_scaling": yarn,
        "max_position_embeddings": _get(data, "max_position_embeddings", 4096),
        "tie_word_embeddings": _get(data, "tie_word_embeddings", False),
        "bos_token_id": data.get("bos_token_id"),
        "eos_token_id": _eos(data, source),
    }


def read_olmoe(data: dict[str, Any], source: str) -> dict[str, Any]:
    _refuse(data, source, {"attention_bias": bool})
    out = _common(data, source, "olmoe")
    out["intermediate_size"] = _get(data, "intermediate_size", 1024)
    out["attention"] = {"qk_norm": "full", "clip_qkv": data.get("clip_qkv")}
    out["moe"] = {
        "num_experts": _get(data, "num_experts", _get(data, "num_local_experts", 64)),
        "num_experts_per_tok": _get(data, "num_experts_per_tok", 8),
        "norm_topk_prob": _get(data, "norm_topk_prob", False),
    }
    return out


def _qwen(data: dict[str, Any], source: str, family: str) -> dict[str, Any]:
    out = _common(data, source, family)
    out["intermediate_size"] = _get(data, "moe_intermediate_size", 1408)
    moe = {
        "num_experts": _get(data, "num_experts", _get(data, "num_local_experts", 60)),
        "num_experts_per_tok": _get(data, "num_experts_per_tok", 4),
        "norm_topk_prob": _get(data, "norm_topk_prob", False),
        "dense_intermediate_size": _get(data, "intermediate_size", 5632),
        "sparse_step": _get(data, "decoder_sparse_step", 1),
        "dense_layers": list(_get(data, "mlp_only_layers", [])),
    }
    out["moe"] = moe
    if family == "qwen2_moe":
        types = data.get("layer_types") or []
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        if sliding or (data.get("use_sliding_window") and not types):
            raise ConfigError(
                f"{source}: layer_types / use_sliding_window: sliding-window layers ({sliding or 'some'}) are not "
                "implemented for qwen2_moe"
            )
        out["sliding_window"] = None
        out["attention"] = {"qkv_bias": _get(data, "qkv_bias", True)}
        shared = _get(data, "shared_expert_intermediate_size", 5632)
        if shared:
            moe.update(n_shared_experts=1, n_shared_intermediate=shared, shared_expert_gate=True)
    else:
        _refuse(data, source, {"attention_bias": bool})
        out["sliding_window"] = data.get("sliding_window") if data.get("use_sliding_window") else None
        out["attention"] = {"qk_norm": "head"}
    return out


def read_qwen2_moe(data: dict[str, Any], source: str) -> dict[str, Any]:
    return _qwen(data, source, "qwen2_moe")


def read_qwen3_moe(data: dict[str, Any], source: str) -> dict[str, Any]:
    return _qwen(data, source, "qwen3_moe")


def _deepseek(data: dict[str, Any], source: str, family: str) -> dict[str, Any]:
    _refuse(
        data,
        source,
        {
            "attention_bias": bool,
            "mlp_bias": bool,
            "moe_layer_freq": lambda v: v != 1,
            "pretraining_tp": lambda v: v > 1,
        },
    )
    out = _common(data, source, family)
    rope_dim = _get(data, "qk_rope_head_dim", 64)
    out["head_dim"] = rope_dim  # the rotary part; transformers sets head_dim so too
    out["intermediate_size"] = _get(data, "moe_intermediate_size", 1407 if family == "deepseek_v2" else 2048)
    out["attention"] = {
        "kv_lora_rank": _get(data, "kv_lora_rank", 512),
        "q_lora_rank": data.get("q_lora_rank"),
        "qk_nope_head_dim": _get(data, "qk_nope_head_dim", 128),
        "v_head_dim": _get(data, "v_head_dim", 128),
        "rope_interleave": True if family == "deepseek_v2" else _get(data, "rope_interleave", True),
    }
    n_shared = _get(data, "n_shared_experts", 0)
    moe: dict[str, Any] = {
        "num_experts": _get(data, "n_routed_experts", _get(data, "num_local_experts", 64)),
        "num_experts_per_tok": _get(data, "num_experts_per_tok", 6),
        "n_shared_experts": n_shared,
        "first_k_dense": _get(data, "first_k_dense_replace", 0),
        "dense_intermediate_size": _get(data, "intermediate_size", 11008),
        "routed_scaling_factor": float(_get(data, "routed_scaling_factor", 1.0)),
        "router_float32": True,
    }
    if family == "deepseek_v2":
        _refuse(data, source, {"scoring_func": lambda v: v != "softmax", "norm_topk_prob": bool})
        method = _get(data, "topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"{source}: topk_method: expected 'greedy' or 'group_limited_greedy', got {method!r}")
        moe["norm_topk_prob"] = False  # transformers' DeepSeek-V2 router never renormalises
        if method == "group_limited_greedy":
            moe.update(n_group=_get(data, "n_group", 1), topk_group=_get(data, "topk_group", 1), group_score_topk=1)
    else:
        _refuse(data, source, {"scoring_func": lambda v: v != "sigmoid"})
        moe.update(
            score_func="sigmoid",
            bias_balancing=True,  # e_score_correction_bias: a selection-only bias
            norm_topk_prob=_get(data, "norm_topk_prob", True),
            n_group=_get(data, "n_group", 1),
            topk_group=_get(data, "topk_group", 1),
        )
    out["moe"] = moe
    return out


def read_deepseek_v2(data: dict[str, Any], source: str) -> dict[str, Any]:
    return _deepseek(data, source, "deepseek_v2")


def read_deepseek_v3(data: dict[str, Any], source: str) -> dict[str, Any]:
    return _deepseek(data, source, "deepseek_v3")


READERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "olmoe": read_olmoe,
    "qwen2_moe": read_qwen2_moe,
    "qwen3_moe": read_qwen3_moe,
    "deepseek_v2": read_deepseek_v2,
    "deepseek_v3": read_deepseek_v3,
}

__all__ = ["ARCHITECTURES", "READERS", "model_type_of"]
