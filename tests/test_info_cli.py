"""`mixtral-lite info`: describes a folder from its config and headers alone, problems included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_hf_model, save_mistral_layout
from safetensors.torch import load_file, save_file

from mixtral_lite import MixtralConfig, count_parameters
from mixtral_lite.cli import main
from mixtral_lite.weights.checkpoint import Checkpoint

N_TENSORS = 3 + 2 * (4 + 2 + 1 + 4 * 3)  # embed, norm, head; per layer: attention, norms, gate, 4 experts x 3


@pytest.fixture(scope="module")
def hf():
    return make_hf_model(seed=8)


@pytest.fixture(scope="module")
def sharded(hf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture
def no_reads(monkeypatch):
    def read(self, key):
        raise AssertionError(f"info read weight data ({key})")

    monkeypatch.setattr(Checkpoint, "read", read)


def info(capsys, path: Path, *args: str) -> tuple[int, str, str]:
    code = main(["info", "--model", str(path), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_report_of_a_sharded_folder(sharded, capsys, no_reads):
    code, out, _ = info(capsys, sharded, "--json")
    assert code == 0
    r = json.loads(out)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert r["layout"] == f"Hugging Face, sharded (model.safetensors.index.json, {len(shards)} shards)"
    assert [f["name"] for f in r["files"]] == shards
    assert sum(f["bytes"] for f in r["files"]) == sum((sharded / s).stat().st_size for s in shards)
    assert r["key_names"] == ["Hugging Face hub"]
    assert r["tensors"] == N_TENSORS and r["dtypes"] == {"F32": N_TENSORS}
    counts = count_parameters(MixtralConfig.from_pretrained(sharded))
    assert r["parameters"] == {"total": counts.total, "active_per_token": counts.active, "in_files": counts.total}
    assert r["total_bytes"] == 4 * counts.total
    assert (r["config"]["layers"], r["config"]["experts"], r["config"]["experts_per_token"]) == (2, 4, 2)
    assert r["model_type"] == "mixtral" and r["config_dtype"] == "float32"
    assert r["problems"] == []


def test_text_report(sharded, capsys, no_reads):
    code, out, _ = info(capsys, sharded)
    assert code == 0
    assert "layout:      Hugging Face, sharded" in out
    assert f"tensors:     {N_TENSORS}, dtypes: F32 ({N_TENSORS})" in out
    assert "2 layers, hidden 64, 4 heads / 2 kv heads (head_dim 16), 4 experts of 96, top-2" in out
    assert "problems:    none (the folder loads)" in out


def test_mistral_layout(hf, tmp_path, capsys, no_reads):
    save_mistral_layout(hf, tmp_path, "pth")
    code, out, _ = info(capsys, tmp_path, "--json")
    r = json.loads(out)
    assert code == 0 and r["problems"] == []
    assert r["layout"] == "original Mistral (consolidated.00.pth + params.json)"
    assert r["key_names"] == ["Mistral original"] and r["config_file"] == "params.json"


def test_lists_every_problem(sharded, tmp_path, capsys):
    path = tmp_path / "broken"
    path.mkdir()
    for f in sharded.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    missing_shard = index["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    (path / missing_shard).unlink()
    q_file = path / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    state = load_file(q_file)
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][:32].clone()
    save_file(state, q_file)
    code, out, _ = info(capsys, path)
    assert code == 1
    assert f"names shard {missing_shard}, which is not in" in out
    assert f"{missing_shard:<40}    MISSING" in out
    assert (
        "model.layers.0.self_attn.q_proj.weight: shape expected [64, 64] (for layers.0.attention.wq.weight), got" in out
    )
    assert "missing keys: " in out and "model.layers.1.self_attn.o_proj.weight" in out


def test_not_a_checkpoint_exits_2(tmp_path, capsys):
    code, out, err = info(capsys, tmp_path)
    assert code == 2 and out == ""
    assert err.startswith("mixtral-lite info: error: ") and "no config.json" in err


def test_console_script(sharded):
    """The installed entry point runs info the same way (python -m mixtral_lite)."""
    out = subprocess.run(
        [sys.executable, "-m", "mixtral_lite", "info", "--model", str(sharded)], capture_output=True, text=True
    )
    assert out.returncode == 0 and "problems:    none" in out.stdout
