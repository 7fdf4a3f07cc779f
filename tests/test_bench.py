"""The benchmark on the tiny preset: it runs end to end (both dtypes, int8, transformers), agrees
with transformers on every greedy token, and writes a table and JSON; the roofline's bytes per
token are the active weights counted by hand."""

from __future__ import annotations

import json

import torch

from mixtral_lite import Mixtral, MixtralConfig
from mixtral_lite.bench import Options, active_weight_bytes, format_table, run_benchmark
from mixtral_lite.model.quant import quantize_model


def test_active_weight_bytes_by_hand() -> None:
    c = MixtralConfig.from_preset("tiny")
    model = Mixtral(c)
    d, i, e, k, v = c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok, c.vocab_size
    attention = d * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer = attention + e * d + 2 * d + k * 3 * i * d  # + router, two norms, top-k experts
    expected = 4 * (c.num_hidden_layers * per_layer + v * d + d + d)  # float32; head, one embedding row, norm
    assert active_weight_bytes(model) == expected
    q = quantize_model(model.to(torch.bfloat16))
    assert active_weight_bytes(q) < expected / 2 / 1.5  # int8 (and bf16 scales) vs float32
    q4 = quantize_model(Mixtral(c).to(torch.bfloat16), "int4")
    # the packed codes (uint8, two per byte) count: 4.5 bits per quantised weight against int8's 8
    assert 0.5 * active_weight_bytes(q) < active_weight_bytes(q4) < active_weight_bytes(q)


def test_benchmark_runs_and_matches_transformers(tmp_path, capsys) -> None:
    opts = Options(
        preset="tiny",
        prompt_len=16,
        decode_prompt_len=4,
        new_tokens=6,
        batch=2,
        repeats=1,
        hf_impls=("eager",),
        hf_caches=("dynamic",),
        out=str(tmp_path / "bench.json"),
    )
    result = run_benchmark(opts)
    assert result["same_tokens_ok"], result["dtypes"]["bfloat16"]["same_tokens"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved["dtypes"]) == {"float32", "bfloat16"}
    for entry in saved["dtypes"].values():
        for who in ("ours", "theirs"):
            assert entry[who]["decode_b1_tok_s"] > 0 and entry[who]["prefill_tok_s"] > 0
        assert entry["roofline_tok_s"] > 0
    q = saved["dtypes"]["bfloat16"]
    assert q["int8_quality"]["greedy_agree_free"] >= 0.95 and q["int8"]["weights_mb"] < q["ours"]["weights_mb"]
    table = format_table(saved)
    assert "decode b1 (tok/s)" in table and "roofline" in table and "int8" in table
    assert "decode b1 (tok/s)" in capsys.readouterr().out
