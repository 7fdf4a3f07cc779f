"""Tiny checkpoints of the other MoE families (OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3), built
with transformers' own classes and saved with ``save_pretrained``, and a tiny byte-level BPE
``tokenizer.json`` (the kind these families ship) with chat-template special tokens."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the Qwen templates' shape (system prompt, turns, generation prompt).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# DeepSeek's shape: bos once, system text bare, "User: " / "Assistant: " turns, eos after answers.
DEEPSEEK = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# OLMoE-Instruct's (Tulu) shape, with a namespace, loop controls and whitespace control.
TULU = (
    "{% set ns = namespace(n=0) %}"
    "{% for message in messages %}{% set ns.n = ns.n + 1 %}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>\n' + message['content'] | trim + '\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{%- else -%}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}{%- endif -%}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)

CORPUS = [
    "The experts of a mixture each see the tokens their router sends them.",
    "User: what is a latent cache? Assistant: keys and values from a small latent.",
    "system prompts, several turns, a generation prompt: templates render them all.",
    "Qwen, OLMoE and DeepSeek ship byte-level BPE tokenizers.",
]


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def vocab_size() -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json()).get_vocab_size(with_added_tokens=True)


def write_tokenizer(folder: Path, template: str | None = CHATML, **tokens: str | None) -> Path:
    """tokenizer.json + tokenizer_config.json (ChatML special tokens; ``tokens`` override them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_tokenizer_json())
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **tokens}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _base() -> dict[str, dict]:
    v = vocab_size()
    common = dict(vocab_size=v, hidden_size=64, max_position_embeddings=256, eos_token_id=2, bos_token_id=None)
    deepseek = dict(
        common,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
    )
    return {
        "olmoe": dict(
            common,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
        ),
        "qwen3_moe": dict(
            common,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
        "qwen2_moe": dict(
            common,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
        ),
        "deepseek_v2": dict(deepseek, q_lora_rank=None, topk_method="greedy"),
        "deepseek_v3": dict(deepseek, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    }


CLASSES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}

# name -> (family, overrides of the family's tiny base config)
CASES = {
    "olmoe": ("olmoe", {}),
    "olmoe-clip-norm-mha": ("olmoe", dict(clip_qkv=1.0, norm_topk_prob=True, num_key_value_heads=4)),
    "qwen3-dense1": ("qwen3_moe", {}),
    "qwen3-gqa4-step2-nonorm": (
        "qwen3_moe",
        dict(num_key_value_heads=1, norm_topk_prob=False, mlp_only_layers=[], decoder_sparse_step=2),
    ),
    "qwen2-shared-dense0": ("qwen2_moe", {}),
    "qwen2-step2-mha-norm": (
        "qwen2_moe",
        dict(decoder_sparse_step=2, mlp_only_layers=[], num_key_value_heads=4, norm_topk_prob=True),
    ),
    "dsv2-greedy": ("deepseek_v2", {}),
    "dsv2-group-qlora-yarn": (
        "deepseek_v2",
        dict(
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            q_lora_rank=24,
            routed_scaling_factor=1.5,
            rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        ),
    ),
    "dsv3-group-qlora": ("deepseek_v3", {}),
    "dsv3-nogroup-halves-yarn": (
        "deepseek_v3",
        dict(
            n_group=1,
            topk_group=1,
            q_lora_rank=None,
            rope_interleave=False,
            n_shared_experts=2,
            norm_topk_prob=False,
            rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        ),
    ),
}


def make_family_model(family: str, seed: int = 0, std: float = 0.2, **overrides):
    """A random transformers model of ``family``: weights N(0, std), norm weights in [0.5, 1.5]
    (so q/k norms matter), DeepSeek-V3's selection bias random too."""
    import transformers

    config_name, model_name = CLASSES[family]
    config = getattr(transformers, config_name)(**{**_base()[family], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model


def make_case(name: str, seed: int = 0):
    family, overrides = CASES[name]
    return make_family_model(family, seed=seed, **overrides)
