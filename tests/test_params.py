"""Parameter counts: exact headline numbers from the API and the CLI, checked against numel()."""

from __future__ import annotations

import json
import resource
import time

import pytest
import torch

from mixtral_lite import Mixtral, MixtralConfig, count_parameters
from mixtral_lite.cli import main

EXPECTED = {
    "mixtral-8x7b": (46_702_792_704, 12_879_925_248),
    "mixtral-8x22b": (140_630_071_296, 39_161_468_928),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_headline_numbers(preset):
    counts = count_parameters(MixtralConfig.from_preset(preset))
    assert (counts.total, counts.active) == EXPECTED[preset]
    assert sum(counts.breakdown.values()) == counts.total
    assert sum(counts.active_breakdown.values()) == counts.active


def test_8x7b_layer_pieces_match_reference():
    c = MixtralConfig.from_preset("mixtral-8x7b")
    parts = count_parameters(c).breakdown
    assert parts["attention"] == 32 * 41_943_040
    assert parts["experts"] == 32 * 8 * 176_160_768
    assert parts["router"] == 32 * 32_768
    assert parts["norms"] == 32 * 8_192 + 4_096
    assert parts["embeddings"] == parts["lm_head"] == 131_072_000


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_meta_device_model_is_instant_and_agrees(preset):
    config = MixtralConfig.from_preset(preset)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.device("meta"):
        model = Mixtral(config)
    elapsed = time.perf_counter() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[preset][0]
    assert count_parameters(model).total == EXPECTED[preset][0]  # checks numel() internally
    assert elapsed < 5.0  # generous: it takes ~0.1 s; a real allocation of 93 GB could not finish
    assert grown_mb < 200


def test_tied_embeddings_count_once():
    config = MixtralConfig.from_preset("tiny")
    config.tie_word_embeddings = True
    model = Mixtral(config)
    counts = count_parameters(model)
    assert counts.breakdown["lm_head"] == 0
    assert counts.total == sum(p.numel() for p in model.parameters())


def test_cli_table_and_json(capsys):
    assert main(["params", "--preset", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46,702,792,704" in out and "12,879,925,248" in out and "active means" in out
    assert main(["params", "--preset", "mixtral-8x22b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["total"], data["active"]) == EXPECTED["mixtral-8x22b"]


def test_cli_config_and_model_sources(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MixtralConfig.from_preset("mixtral-8x7b").to_hf_dict()))
    assert main(["params", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == EXPECTED["mixtral-8x7b"][0]
    assert main(["params", "--model", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == EXPECTED["mixtral-8x7b"][1]


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["params", "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preset 'nope'" in err
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert main(["params", "--model", str(tmp_path)]) == 2
    assert "model_type" in capsys.readouterr().err


def test_console_entry_point_runs():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "mixtral_lite", "params", "--preset", "mixtral-8x22b"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "140,630,071,296" in proc.stdout and "39,161,468,928" in proc.stdout
