"""save_pretrained: transformers loads what we write with identical logits; shards, dtypes, variants."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_hf_model
from safetensors.torch import load_file

from mixtral_lite import Mixtral, MixtralConfig, load_model, save_pretrained
from mixtral_lite.errors import UserError
from mixtral_lite.weights.saving import parse_size, write_safetensors

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_hf_model(seed=5).save_pretrained(path)
    return load_model(path)


def hf_load(path, dtype=torch.float32):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_transformers_loads_single_file(ours, tmp_path):
    files = save_pretrained(ours, tmp_path)
    assert sorted(f.name for f in files) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        diff = (hf_load(tmp_path)(IDS).logits - ours(IDS)).abs().max().item()
    assert diff <= 1e-4  # float32, summation order only


def test_transformers_loads_shards(ours, tmp_path):
    save_pretrained(ours, tmp_path, max_shard_size="120KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    sizes = [sum(t.numel() * t.element_size() for t in load_file(tmp_path / s).values()) for s in shards]
    assert max(sizes) <= 120_000 and sum(sizes) == index["metadata"]["total_size"]
    with torch.no_grad():
        diff = (hf_load(tmp_path)(IDS).logits - ours(IDS)).abs().max().item()
    assert diff <= 1e-4


def test_round_trip_is_exact(ours, tmp_path):
    save_pretrained(ours, tmp_path, max_shard_size="200KB")
    again = load_model(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_hub_key_names_and_config(ours, tmp_path):
    save_pretrained(ours, tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert len(keys) == 3 + 2 * (4 + 2 + 1 + 4 * 3)  # embed, norm, head; per layer 4 attn, 2 norms, gate, 12 experts
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["torch_dtype"] == config["dtype"] == "float32"


def test_bfloat16_model(ours, tmp_path):
    model16 = Mixtral(ours.config)
    model16.load_state_dict(ours.state_dict())
    model16.to(torch.bfloat16).eval()
    save_pretrained(model16, tmp_path)
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    theirs = hf_load(tmp_path, dtype=torch.bfloat16)
    assert theirs.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        same = torch.equal(theirs.lm_head.weight, model16.output.weight)
    assert same


def test_tied_embeddings_written_once(tmp_path):
    hf = make_hf_model(seed=6, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "in")
    model = load_model(tmp_path / "in")
    save_pretrained(model, tmp_path / "out")
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
    with torch.no_grad():
        assert (hf_load(tmp_path / "out")(IDS).logits - model(IDS)).abs().max().item() <= 1e-4


def test_routing_variant_round_trip(tmp_path):
    """Variant extras (shared experts, selection bias, hierarchical gate, dense first layer) survive."""
    config = MixtralConfig.from_preset("tiny")
    config.moe.n_shared_experts = 1
    config.moe.bias_balancing = True
    config.moe.first_k_dense = 1
    config.moe.dense_intermediate_size = 64
    config = MixtralConfig.from_dict(config.to_dict())  # re-validate
    model = Mixtral(config).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(len(name))))
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral_lite"
    again = load_model(tmp_path, cpu_kernels=False)  # the reference modules on both sides
    assert again.config == config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_stale_shards_are_removed(ours, tmp_path):
    save_pretrained(ours, tmp_path, max_shard_size="50KB")
    (tmp_path / "notes.txt").write_text("keep me")
    save_pretrained(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    load_model(tmp_path)


def test_write_safetensors_matches_the_library(tmp_path):
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.tensor([True, False, True]),
        "d": torch.randn(2, 3, 4)[:, 1],  # not contiguous
        "e": torch.zeros(0, 4),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors.items())
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(UserError, match="max_shard_size"):
            parse_size(bad)
