"""Config constructors and the errors bad configs give."""

from __future__ import annotations

import json

import pytest

from mixtral_lite import ConfigError, MixtralConfig, MoEConfig
from mixtral_lite.config import available_presets


def test_presets_exist_and_match_reference():
    assert {"mixtral-8x7b", "mixtral-8x22b", "tiny", "bench"} <= set(available_presets())
    c = MixtralConfig.from_preset("mixtral-8x7b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (4096, 14336, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 128)
    assert (c.num_experts, c.num_experts_per_tok, c.rope_theta, c.max_position_embeddings) == (8, 2, 1e6, 32768)
    c = MixtralConfig.from_preset("mixtral-8x22b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size) == (6144, 16384, 56, 32768)


def test_unknown_preset_is_exact_not_fuzzy():
    with pytest.raises(ConfigError, match="unknown preset 'mixtral-8x7'"):
        MixtralConfig.from_preset("mixtral-8x7")


def _hf(**overrides):
    data = {
        "model_type": "mixtral",
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "rope_theta": 1e6,
        "max_position_embeddings": 512,
    }
    data.update(overrides)
    return data


def test_hf_config_top_level_rope_theta(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_hf(rope_theta=5e5)))
    c = MixtralConfig.from_pretrained(tmp_path)
    assert c.rope_theta == 5e5 and c.head_dim == 16 and c.num_experts == 4


def test_hf_config_rope_parameters(tmp_path):
    data = _hf()
    del data["rope_theta"]
    data["rope_parameters"] = {"rope_theta": 2e5, "rope_type": "default"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    assert MixtralConfig.from_pretrained(path).rope_theta == 2e5


def test_transformers_written_config_reads_back(tmp_path):
    from helpers import hf_tiny_config

    hf = hf_tiny_config(sliding_window=7, rope_theta=12345.0)
    hf.save_pretrained(tmp_path)
    c = MixtralConfig.from_pretrained(tmp_path)
    assert (c.sliding_window, c.rope_theta, c.num_key_value_heads, c.vocab_size) == (7, 12345.0, 2, 128)


def test_mistral_params_json(tmp_path):
    params = {
        "dim": 4096,
        "n_layers": 32,
        "head_dim": 128,
        "hidden_dim": 14336,
        "n_heads": 32,
        "n_kv_heads": 8,
        "norm_eps": 1e-5,
        "vocab_size": 32000,
        "rope_theta": 1e6,
        "moe": {"num_experts": 8, "num_experts_per_tok": 2},
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    c = MixtralConfig.from_pretrained(tmp_path)
    assert c == MixtralConfig.from_preset("mixtral-8x7b")


def test_round_trip_through_hf_dict():
    c = MixtralConfig.from_preset("tiny")
    assert MixtralConfig.from_hf_dict(c.to_hf_dict()) == c
    assert MixtralConfig.from_dict(c.to_dict()) == c
    v = MixtralConfig.from_preset("tiny")
    v.moe = MoEConfig(num_experts=4, num_experts_per_tok=1, kind="hard")
    assert v.to_hf_dict()["model_type"] == "mixtral_lite"
    assert MixtralConfig.from_hf_dict(v.to_hf_dict()) == v


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(num_attention_heads=5, head_dim=None), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_experts_per_tok=5), "moe.num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(intermediate_size=-4), "intermediate_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(num_local_experts=0), "moe.num_experts"),
        (dict(model_type="llama"), "model_type"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    ],
)
def test_bad_values_name_the_field(tmp_path, overrides, field):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_hf(**overrides)))
    with pytest.raises(ConfigError) as info:
        MixtralConfig.from_pretrained(path)
    assert field in str(info.value) and str(path) in str(info.value)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        MixtralConfig.from_pretrained(path)
    with pytest.raises(ConfigError, match="no config.json or params.json"):
        MixtralConfig.from_pretrained(tmp_path / "..")
    with pytest.raises(ConfigError, match="no such file"):
        MixtralConfig.from_pretrained(tmp_path / "missing.json")


def test_unknown_fields_in_our_form_are_refused():
    with pytest.raises(ConfigError, match="unknown field"):
        MixtralConfig.from_dict({"hidden_sise": 64})
