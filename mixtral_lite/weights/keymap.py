"""The tables that map checkpoint key names to this model's parameter names: one per layout
(Mixtral's hub layout, the original Mistral one) and one per other family (``TABLES``).

Our names follow the original Mistral checkpoints; the experts are stacked per layer
(``feed_forward.w1`` [E, I, D]), so a per-expert file key maps to one slice of a stacked parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

import torch


class Target(NamedTuple):
    name: str  # our parameter name
    expert: int | None  # index into a stacked expert parameter, or None for the whole tensor


# (file key pattern, our name template); {L} layer, {E} expert.
HF_TABLE: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(?P<L>\d+)\.input_layernorm\.weight", "layers.{L}.attention_norm.weight"),
    (r"model\.layers\.(?P<L>\d+)\.post_attention_layernorm\.weight", "layers.{L}.ffn_norm.weight"),
    (r"model\.layers\.(?P<L>\d+)\.self_attn\.q_proj\.weight", "layers.{L}.attention.wq.weight"),
    (r"model\.layers\.(?P<L>\d+)\.self_attn\.k_proj\.weight", "layers.{L}.attention.wk.weight"),
    (r"model\.layers\.(?P<L>\d+)\.self_attn\.v_proj\.weight", "layers.{L}.attention.wv.weight"),
    (r"model\.layers\.(?P<L>\d+)\.self_attn\.o_proj\.weight", "layers.{L}.attention.wo.weight"),
    (r"model\.layers\.(?P<L>\d+)\.block_sparse_moe\.gate\.weight", "layers.{L}.feed_forward.gate.weight"),
    (r"model\.layers\.(?P<L>\d+)\.block_sparse_moe\.experts\.(?P<E>\d+)\.w1\.weight", "layers.{L}.feed_forward.w1"),
    (r"model\.layers\.(?P<L>\d+)\.block_sparse_moe\.experts\.(?P<E>\d+)\.w2\.weight", "layers.{L}.feed_forward.w2"),
    (r"model\.layers\.(?P<L>\d+)\.block_sparse_moe\.experts\.(?P<E>\d+)\.w3\.weight", "layers.{L}.feed_forward.w3"),
    # Routing variants (model_type "mixtral_lite"): hierarchical top gate, DeepSeekMoE shared experts,
    # selection bias, and the dense FFN of the first layers.
    (r"model\.layers\.(?P<L>\d+)\.block_sparse_moe\.group_gate\.weight", "layers.{L}.feed_forward.group_gate.weight"),
    (r"model\.layers\.(?P<L>\d+)\.block_sparse_moe\.expert_bias", "layers.{L}.feed_forward.expert_bias"),
    (r"model\.layers\.(?P<L>\d+)\.block_sparse_moe\.shared\.w1\.weight", "layers.{L}.feed_forward.shared.w1.weight"),
    (r"model\.layers\.(?P<L>\d+)\.block_sparse_moe\.shared\.w2\.weight", "layers.{L}.feed_forward.shared.w2.weight"),
    (r"model\.layers\.(?P<L>\d+)\.block_sparse_moe\.shared\.w3\.weight", "layers.{L}.feed_forward.shared.w3.weight"),
    (r"model\.layers\.(?P<L>\d+)\.dense_mlp\.w1\.weight", "layers.{L}.feed_forward.w1.weight"),
    (r"model\.layers\.(?P<L>\d+)\.dense_mlp\.w2\.weight", "layers.{L}.feed_forward.w2.weight"),
    (r"model\.layers\.(?P<L>\d+)\.dense_mlp\.w3\.weight", "layers.{L}.feed_forward.w3.weight"),
    # transformers 5.x in-memory names (router ``mlp.gate``, experts fused per layer); see FUSED_TABLE.
    (r"model\.layers\.(?P<L>\d+)\.mlp\.gate\.weight", "layers.{L}.feed_forward.gate.weight"),
    (r"model\.layers\.(?P<L>\d+)\.mlp\.experts\.down_proj", "layers.{L}.feed_forward.w2"),  # [E, D, I]
]

# File keys holding several of our parameters, in equal chunks along ``dim`` of the file tensor:
# transformers 5.x ``gate_up_proj`` [E, 2I, D] is w1 (gate) then w3 (up).
FUSED_TABLE: list[tuple[str, int, tuple[str, ...]]] = [
    (
        r"model\.layers\.(?P<L>\d+)\.mlp\.experts\.gate_up_proj",
        1,
        ("layers.{L}.feed_forward.w1", "layers.{L}.feed_forward.w3"),
    ),
]

MISTRAL_TABLE: list[tuple[str, str]] = [
    (r"tok_embeddings\.weight", "tok_embeddings.weight"),
    (r"norm\.weight", "norm.weight"),
    (r"output\.weight", "output.weight"),
    (r"layers\.(?P<L>\d+)\.attention_norm\.weight", "layers.{L}.attention_norm.weight"),
    (r"layers\.(?P<L>\d+)\.ffn_norm\.weight", "layers.{L}.ffn_norm.weight"),
    (r"layers\.(?P<L>\d+)\.attention\.(?P<P>w[qkvo])\.weight", "layers.{L}.attention.{P}.weight"),
    (r"layers\.(?P<L>\d+)\.feed_forward\.gate\.weight", "layers.{L}.feed_forward.gate.weight"),
    (r"layers\.(?P<L>\d+)\.feed_forward\.experts\.(?P<E>\d+)\.(?P<P>w[123])\.weight", "layers.{L}.feed_forward.{P}"),
]


# ---- the other families' Hugging Face layouts ---------------------------------------------------
# Each table is built from the pieces its family has; {E} is an expert of the hub's per-expert
# keys, and the fused transformers 5.x keys (``mlp.experts.gate_up_proj``) go through FUSED_TABLE.


def _layer_rows(*rows: tuple[str, str]) -> list[tuple[str, str]]:
    return [(r"model\.layers\.(?P<L>\d+)\." + p, "layers.{L}." + t) for p, t in rows]


_TOP = HF_TABLE[:3]  # embeddings, final norm, lm_head
_NORMS = _layer_rows(
    (r"input_layernorm\.weight", "attention_norm.weight"),
    (r"post_attention_layernorm\.weight", "ffn_norm.weight"),
)
_GQA = _layer_rows(*[(rf"self_attn\.{p}_proj\.weight", f"attention.w{p}.weight") for p in "qkvo"])
_QK_NORM = _layer_rows(
    (r"self_attn\.q_norm\.weight", "attention.q_norm.weight"),
    (r"self_attn\.k_norm\.weight", "attention.k_norm.weight"),
)
_QKV_BIAS = _layer_rows(*[(rf"self_attn\.{p}_proj\.bias", f"attention.w{p}.bias") for p in "qkv"])
_EXPERTS = _layer_rows(
    (r"mlp\.gate\.weight", "feed_forward.gate.weight"),
    (r"mlp\.experts\.(?P<E>\d+)\.gate_proj\.weight", "feed_forward.w1"),
    (r"mlp\.experts\.(?P<E>\d+)\.up_proj\.weight", "feed_forward.w3"),
    (r"mlp\.experts\.(?P<E>\d+)\.down_proj\.weight", "feed_forward.w2"),
    (r"mlp\.experts\.down_proj", "feed_forward.w2"),  # transformers 5.x in memory, [E, D, I]
)
_DENSE = _layer_rows(
    (r"mlp\.gate_proj\.weight", "feed_forward.w1.weight"),
    (r"mlp\.up_proj\.weight", "feed_forward.w3.weight"),
    (r"mlp\.down_proj\.weight", "feed_forward.w2.weight"),
)


def _shared(module: str) -> list[tuple[str, str]]:
    return _layer_rows(
        (rf"mlp\.{module}\.gate_proj\.weight", "feed_forward.shared.w1.weight"),
        (rf"mlp\.{module}\.up_proj\.weight", "feed_forward.shared.w3.weight"),
        (rf"mlp\.{module}\.down_proj\.weight", "feed_forward.shared.w2.weight"),
    )


_MLA = _layer_rows(
    (r"self_attn\.q_proj\.weight", "attention.wq.weight"),
    (r"self_attn\.q_a_proj\.weight", "attention.wq_a.weight"),
    (r"self_attn\.q_a_layernorm\.weight", "attention.q_norm.weight"),
    (r"self_attn\.q_b_proj\.weight", "attention.wq_b.weight"),
    (r"self_attn\.kv_a_proj_with_mqa\.weight", "attention.wkv_a.weight"),
    (r"self_attn\.kv_a_layernorm\.weight", "attention.kv_norm.weight"),
    (r"self_attn\.kv_b_proj\.weight", "attention.wkv_b.weight"),
    (r"self_attn\.o_proj\.weight", "attention.wo.weight"),
)

OLMOE_TABLE = _TOP + _NORMS + _GQA + _QK_NORM + _EXPERTS
QWEN3_MOE_TABLE = _TOP + _NORMS + _GQA + _QK_NORM + _EXPERTS + _DENSE
QWEN2_MOE_TABLE = (
    _TOP + _NORMS + _GQA + _QKV_BIAS + _EXPERTS + _DENSE + _shared("shared_expert")
    + _layer_rows((r"mlp\.shared_expert_gate\.weight", "feed_forward.shared_gate.weight"))
)  # fmt: skip
DEEPSEEK_V2_TABLE = _TOP + _NORMS + _MLA + _EXPERTS + _DENSE + _shared("shared_experts")
DEEPSEEK_V3_TABLE = DEEPSEEK_V2_TABLE + _layer_rows(
    (r"mlp\.gate\.e_score_correction_bias", "feed_forward.expert_bias")  # selection-only bias
)

# layout -> table: "hf" is Mixtral's hub layout, "mistral" the original one, the rest by family.
TABLES: dict[str, list[tuple[str, str]]] = {
    "hf": HF_TABLE,
    "mistral": MISTRAL_TABLE,
    "olmoe": OLMOE_TABLE,
    "qwen2_moe": QWEN2_MOE_TABLE,
    "qwen3_moe": QWEN3_MOE_TABLE,
    "deepseek_v2": DEEPSEEK_V2_TABLE,
    "deepseek_v3": DEEPSEEK_V3_TABLE,
}
_COMPILED = {name: [(re.compile(p + r"\Z"), t) for p, t in table] for name, table in TABLES.items()}


def layout_of(family: str) -> str:
    """The key table of a Hugging Face checkpoint of ``family``."""
    return "hf" if family == "mixtral" else family


def map_key(key: str, layout: str = "hf") -> Target | None:
    """Our target for a file key, or None when the key is not part of a checkpoint of ``layout``."""
    for pattern, template in _COMPILED[layout]:
        m = pattern.match(key)
        if m:
            groups = m.groupdict()
            expert = groups.pop("E", None)
            return Target(template.format(**groups), None if expert is None else int(expert))
    return None


class Chunk(NamedTuple):
    target: Target
    dim: int  # axis of the file tensor that is split
    index: int  # which of ``count`` equal chunks goes to ``target``
    count: int


_FUSED = [(re.compile(p + r"\Z"), dim, ts) for p, dim, ts in FUSED_TABLE]


def map_key_chunks(key: str, layout: str = "hf") -> list[Chunk] | None:
    """Every (target, chunk) a file key feeds: one whole-tensor chunk, or several for a fused key."""
    target = map_key(key, layout)
    if target is not None:
        return [Chunk(target, 0, 0, 1)]
    if layout == "mistral":
        return None
    for pattern, dim, templates in _FUSED:
        m = pattern.match(key)
        if m:
            names = [t.format(**m.groupdict()) for t in templates]
            return [Chunk(Target(name, None), dim, i, len(names)) for i, name in enumerate(names)]
    return None


_STACKED = re.compile(r"layers\.(\d+)\.feed_forward\.(w[123])\Z")
_INVERSE = {t: p for p, t in HF_TABLE}


def hf_items(state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> Hugging Face hub key names, stacked experts split back into one per expert."""
    for name, tensor in state_dict.items():
        m = _STACKED.match(name)
        if m:
            layer, proj = m.groups()
            for e in range(tensor.shape[0]):
                yield f"model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}.weight", tensor[e]
            continue
        hf = _to_hf_name(name)
        if hf is None:
            raise KeyError(f"{name}: no Hugging Face key for this parameter")
        yield hf, tensor


def _to_hf_name(name: str) -> str | None:
    m = re.match(r"layers\.(\d+)\.(.+)\Z", name)
    if m is None:
        for pattern, template in HF_TABLE:
            if template == name:
                return pattern.replace("\\.", ".")
        return None
    layer, rest = m.groups()
    for pattern, template in HF_TABLE:
        if template.startswith("layers.{L}.") and template[len("layers.{L}.") :] == rest:
            return re.sub(r"\(\?P<L>\\d\+\)", layer, pattern).replace("\\.", ".")
    return None
