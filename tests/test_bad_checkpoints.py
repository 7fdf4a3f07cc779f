"""Bad checkpoint folders: each fails with a UserError naming the file or key, expected vs got,
before any weight is read or any model returned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_hf_model, save_mistral_layout
from safetensors.torch import load_file, save_file

from mixtral_lite import load_model
from mixtral_lite.errors import UserError
from mixtral_lite.weights.checkpoint import Checkpoint

Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def hf():
    return make_hf_model(seed=7)


@pytest.fixture(scope="module")
def good(hf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def good_sharded(hf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if any weight data is read: the error must come from headers alone."""

    def read(self, key):
        raise AssertionError(f"weight data read ({key}) before the checkpoint was validated")

    monkeypatch.setattr(Checkpoint, "read", read)


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def rewrite(path: Path, edit) -> None:
    """Load model.safetensors, apply ``edit(state)`` and write it back."""
    f = path / "model.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f)


def fails(path: Path, match: str) -> str:
    with pytest.raises(UserError, match=match) as err:
        load_model(path)
    return str(err.value)


def test_not_a_folder(tmp_path):
    fails(tmp_path / "nope", "nope: not a folder")


def test_missing_config(good, tmp_path):
    path = copy(good, tmp_path)
    (path / "config.json").unlink()
    fails(path, r"no config.json \(Hugging Face\) or params.json \(Mistral\)")


def test_no_weights(good, tmp_path):
    path = copy(good, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    fails(path, "no weights: expected model.safetensors .* found config.json.*pytorch_model.bin.*not supported")


def test_invalid_config_json(good, tmp_path):
    path = copy(good, tmp_path)
    (path / "config.json").write_text('{"model_type": "mixtral",')
    fails(path, "config.json: invalid JSON")


def test_other_architecture(good, tmp_path):
    path = copy(good, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    fails(path, "config.json: model_type: expected 'mixtral' .*got 'llama'")


def test_index_names_missing_shard(good_sharded, tmp_path):
    path = copy(good_sharded, tmp_path)
    (path / "model-00003-of-00009.safetensors").unlink()
    fails(path, "model.safetensors.index.json: names shard model-00003-of-00009.safetensors, which is not in")


def test_invalid_index_json(good_sharded, tmp_path):
    path = copy(good_sharded, tmp_path)
    (path / "model.safetensors.index.json").write_text("{")
    fails(path, "model.safetensors.index.json: invalid JSON")


@pytest.mark.parametrize("name", ["../model-00001-of-00009.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_index_entry_outside_folder(good_sharded, tmp_path, name):
    path = copy(good_sharded, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"][Q1] = name
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(path, rf"weight_map\['{Q1}'\] = '{name}': expected a plain file name inside the folder")


def test_index_lists_key_in_the_wrong_shard(good_sharded, tmp_path):
    path = copy(good_sharded, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    actual = index["weight_map"][Q1]
    other = next(f for f in index["weight_map"].values() if f != actual)
    index["weight_map"][Q1] = other
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(path, f"{Q1} is listed in {other} but found in {actual}")


def test_key_in_two_shards(good_sharded, tmp_path):
    path = copy(good_sharded, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    a = path / index["weight_map"][Q1]
    b = next(path / f for f in index["weight_map"].values() if path / f != a)
    state = load_file(b)
    state[Q1] = load_file(a)[Q1]
    save_file(state, b)
    fails(path, f"{Q1} is also in")


def test_truncated_safetensors(good, tmp_path, no_reads):
    path = copy(good, tmp_path)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    fails(
        path,
        rf"model.safetensors: truncated: .* ends at byte {len(data):,} but the file has {len(data) - 1000:,} bytes",
    )


def test_corrupt_safetensors_header(good, tmp_path, no_reads):
    path = copy(good, tmp_path)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    fails(path, "model.safetensors: corrupt safetensors header")
    f.write_bytes(b"\x00\x10")
    fails(path, r"model.safetensors: truncated or not a safetensors file \(2 bytes\)")


def test_wrong_tensor_shape(good, tmp_path, no_reads):
    path = copy(good, tmp_path)
    rewrite(path, lambda s: s.update({Q1: torch.zeros(64, 63)}))
    fails(
        path,
        rf"model.safetensors: {Q1}: shape expected \[64, 64\] \(for layers.1.attention.wq.weight\), got \[64, 63\]",
    )


def test_wrong_expert_shape(good, tmp_path, no_reads):
    path = copy(good, tmp_path)
    key = "model.layers.0.block_sparse_moe.experts.2.w2.weight"
    rewrite(path, lambda s: s.update({key: torch.zeros(96, 64)}))
    fails(path, rf"{key}: shape expected \[64, 96\] \(for layers.0.feed_forward.w2\), got \[96, 64\]")


@pytest.mark.parametrize("dtype, name", [(torch.int32, "I32"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_unsupported_dtype(good, tmp_path, no_reads, dtype, name):
    path = copy(good, tmp_path)
    rewrite(path, lambda s: s.update({Q1: s[Q1].to(dtype)}))
    fails(path, rf"model.safetensors: {Q1}: unsupported dtype {name} \(expected one of F32, F16, BF16, F64\)")


def test_missing_keys(good, tmp_path, no_reads):
    path = copy(good, tmp_path)
    rewrite(path, lambda s: [s.pop(Q1), s.pop("model.layers.0.block_sparse_moe.experts.2.w1.weight")])
    msg = fails(path, "missing keys: ")
    assert Q1 in msg and "model.layers.0.block_sparse_moe.experts.2.w1.weight" in msg


def test_unexpected_keys(good, tmp_path, no_reads):
    path = copy(good, tmp_path)
    extra = "model.layers.2.self_attn.q_proj.weight"  # a third layer in a 2-layer config
    rewrite(path, lambda s: s.update({extra: s[Q1].clone(), "model.rotary.inv_freq": torch.ones(8)}))
    msg = fails(path, r"unexpected keys \(not part of this model\): ")
    assert extra in msg and "model.rotary.inv_freq" in msg


def test_same_tensor_from_two_layouts(good, tmp_path, no_reads):
    path = copy(good, tmp_path)
    rewrite(
        path,
        lambda s: s.update(
            {"model.layers.0.mlp.gate.weight": s["model.layers.0.block_sparse_moe.gate.weight"].clone()}
        ),
    )
    fails(path, "layers.0.feed_forward.gate.weight is already filled by")


def test_unsafe_pth(hf, tmp_path):
    save_mistral_layout(hf, tmp_path, "pth")
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    state["evil"] = Exploit()
    torch.save(state, tmp_path / "consolidated.00.pth")
    fails(tmp_path, r"consolidated.00.pth: refusing to unpickle: the file needs arbitrary Python objects")


class Exploit:
    """A pickled object that would run code on load (weights_only must refuse it)."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_corrupt_pth(hf, tmp_path):
    save_mistral_layout(hf, tmp_path, "pth")
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a zip file at all")
    fails(tmp_path, "consolidated.00.pth: not a readable PyTorch checkpoint")


def test_model_parallel_pth_shards(hf, tmp_path):
    save_mistral_layout(hf, tmp_path, "pth")
    shutil.copy(tmp_path / "consolidated.00.pth", tmp_path / "consolidated.01.pth")
    fails(tmp_path, "2 model-parallel shards .*expected one consolidated.00.pth")


def test_bad_params_json(hf, tmp_path):
    save_mistral_layout(hf, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    del params["n_layers"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    fails(tmp_path, r"params.json: missing field\(s\) \['n_layers'\]")


def test_mistral_wrong_shape(hf, tmp_path, no_reads):
    save_mistral_layout(hf, tmp_path)
    f = tmp_path / "consolidated.safetensors"
    state = load_file(f)
    state["layers.0.attention.wk.weight"] = torch.zeros(64, 64)
    save_file(state, f)
    fails(tmp_path, r"consolidated.safetensors: layers.0.attention.wk.weight: shape expected \[32, 64\]")
