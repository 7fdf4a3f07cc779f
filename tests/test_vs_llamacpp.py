"""The llama.cpp side-by-side's own arithmetic: the bytes a decode step reads from a GGUF file are
counted as ``active_weight_bytes`` counts ours, and the table states each ratio and its range.
(Running llama.cpp itself is the script's job, not the test suite's.)"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mixtral_lite.bench.llamacpp import gguf_active_bytes

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_gguf_active_bytes_counts_like_ours(tmp_path: Path) -> None:
    v, d, i, e, k = 64, 16, 24, 4, 2
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    tensors = {
        "token_embd.weight": np.ones((v, d), np.float32),
        "output.weight": np.ones((v, d), np.float32),
        "blk.0.attn_q.weight": np.ones((d, d), np.float32),
        "blk.0.ffn_gate_exps.weight": np.ones((e, i, d), np.float32),
        "blk.0.ffn_down_exps.weight": np.ones((e, d, i), np.float32),
        "blk.0.ffn_gate_inp.weight": np.ones((e, d), np.float32),
    }
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected = 4 * (d + v * d + d * d + 2 * k * i * d + e * d)  # one embedding row; k of e experts
    assert gguf_active_bytes(path, k, e, v) == expected


def test_table_states_ratios_ranges_and_skips() -> None:
    import vs_llamacpp

    row = {
        "shape": "bench", "precision": "bf16", "skipped": None, "ours_bytes": 100, "theirs_bytes": 50,
        "ours": {"prefill": [200.0, 300.0, 250.0], "decode": [10.0, 20.0, 30.0]},
        "theirs": {"prefill": [100.0, 100.0, 100.0], "decode": [10.0, 10.0, 10.0]},
        "check": {"same": 32, "n": 32, "against": "ours bfloat16", "max_dlogprob": 0.01},
    }  # fmt: skip
    skipped = {**row, "precision": "f32", "skipped": "needs ~12.4 GiB, 8.0 GiB available"}
    result = {
        "bandwidth_gb_s": 2000 / 1e9,
        "llamacpp": {"version": "v"},
        "machine": {"cpu": "cpu"},
        "settings": {"threads": 2, "rounds": 3},
        "rows": [row, skipped],
    }
    table = vs_llamacpp.format_table(result)
    assert "250.0 / 100.0 (2.50x [2.00-3.00])" in table  # medians, their ratio, per-round range
    assert "20.0 / 10.0 (2.00x [1.00-3.00])" in table
    assert "100% / 25%" in table  # 20 tok/s x 100 B / 2000 B/s; 10 x 50 / 2000
    assert "32/32 vs ours bfloat16" in table and "skipped: needs ~12.4 GiB" in table
