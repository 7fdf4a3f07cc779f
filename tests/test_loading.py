"""load_model: every layout gives transformers' logits; dtype, device, ties, progress, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import make_hf_model, save_mistral_layout
from safetensors.torch import save_file

from mixtral_lite import KVCache, Mixtral, count_parameters, load_model
from mixtral_lite.errors import UserError
from mixtral_lite.model.mixtral import apply_rotary, inverse_frequencies, rotary_cos_sin
from mixtral_lite.weights.checkpoint import half_to_interleaved, interleaved_to_half, read_safetensors_header
from mixtral_lite.weights.device_map import layer_devices

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
TOL = 1e-4  # float32 logits of O(10): only summation order differs between the implementations


@pytest.fixture(scope="module")
def hf():
    return make_hf_model(seed=3)


@pytest.fixture(scope="module")
def hf_logits(hf):
    with torch.no_grad():
        return hf(IDS).logits


def logits(model: Mixtral) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_hf_single_file(hf, hf_logits, tmp_path):
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = load_model(tmp_path)
    assert not model.training
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert max_diff(logits(model), hf_logits) <= TOL


def test_hf_sharded(hf, hf_logits, tmp_path):
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 5 and (tmp_path / "model.safetensors.index.json").is_file()
    assert max_diff(logits(load_model(tmp_path)), hf_logits) <= TOL


def test_transformers5_fused_experts(hf, hf_logits, tmp_path):
    """The in-memory names of transformers 5.x: mlp.gate, mlp.experts.gate_up_proj [E, 2I, D], down_proj."""
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path)
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(model.layers[1].feed_forward.w1, gate_up[:, :96])
    assert torch.equal(model.layers[1].feed_forward.w3, gate_up[:, 96:])
    assert max_diff(logits(model), hf_logits) <= TOL


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_mistral_original_layout(hf, hf_logits, tmp_path, fmt):
    save_mistral_layout(hf, tmp_path, fmt)
    model = load_model(tmp_path)
    assert max_diff(logits(model), hf_logits) <= TOL


def test_mistral_layout_without_permutation_gives_other_logits(hf, hf_logits, tmp_path):
    """The wq/wk row permutation matters: skipping it when writing moves the logits far away."""
    save_mistral_layout(hf, tmp_path, permute=False)
    assert max_diff(logits(load_model(tmp_path)), hf_logits) > 0.1


def test_rope_permutation_direction(hf, tmp_path):
    """Original-layout wq/wk with interleaved-pair RoPE (mistral-inference's complex rotation) give the
    same attention scores as our loaded weights with half-split RoPE: the loader converts the right way."""
    save_mistral_layout(hf, tmp_path)
    from safetensors.torch import load_file

    orig = load_file(str(tmp_path / "consolidated.safetensors"))
    model = load_model(tmp_path)
    heads, kv, hd, t = 4, 2, 16, 7
    x = torch.randn(t, 64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(t)

    # mistral-inference: view pairs as complex numbers, multiply by e^{i pos freq}.
    freqs = 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
    cis = torch.polar(torch.ones(t, hd // 2), pos[:, None].float() * freqs)  # [T, hd/2]

    def rope_pairs(y, n):
        yc = torch.view_as_complex(y.view(t, n, hd // 2, 2))
        return torch.view_as_real(yc * cis[:, None]).reshape(t, n, hd)

    q0 = rope_pairs(x @ orig["layers.0.attention.wq.weight"].T, heads)
    k0 = rope_pairs(x @ orig["layers.0.attention.wk.weight"].T, kv)
    scores_orig = torch.einsum("thd,shd->hts", q0, k0.repeat_interleave(heads // kv, 1))

    att = model.layers[0].attention
    cos, sin = rotary_cos_sin(pos[None], inverse_frequencies(hd, 10000.0), torch.float32)
    with torch.no_grad():
        q1 = apply_rotary(att.wq(x).view(1, t, heads, hd).transpose(1, 2), cos, sin)[0]  # [H, T, hd]
        k1 = apply_rotary(att.wk(x).view(1, t, kv, hd).transpose(1, 2), cos, sin)[0]
    scores_ours = torch.einsum("htd,hsd->hts", q1, k1.repeat_interleave(heads // kv, 0))
    assert max_diff(scores_ours, scores_orig) <= 1e-4 * scores_orig.abs().max().item()


def test_permutation_helpers_are_inverse():
    w = torch.randn(4 * 16, 64)
    assert torch.equal(interleaved_to_half(half_to_interleaved(w, 4), 4), w)
    assert not torch.equal(half_to_interleaved(w, 4), w)


def test_dtype_cast_per_tensor(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    fp32 = load_model(tmp_path)
    bf16 = load_model(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(fp32.state_dict().items(), bf16.state_dict().items(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name
    assert load_model(tmp_path, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(UserError, match="dtype: expected"):
        load_model(tmp_path, dtype="int8")


def test_tied_embeddings_without_lm_head(tmp_path):
    hf = make_hf_model(seed=4, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.output.weight is model.tok_embeddings.weight
    count_parameters(model)  # the tied tensor is counted once (raises on a mismatch)
    with torch.no_grad():
        assert max_diff(logits(model), hf(IDS).logits) <= TOL


def test_cpu_kernels_installed_by_default(hf, tmp_path):
    """load_model installs the CPU kernels for a CPU model (``cpu_kernels=False``: the reference
    modules); both give the same logits."""
    hf.save_pretrained(tmp_path)
    a, b = load_model(tmp_path), load_model(tmp_path, cpu_kernels=False)
    assert type(a).__name__ == "CpuMixtral" and type(b) is Mixtral
    assert "accelerated" in str(a.cpu_kernels) and not hasattr(b, "cpu_kernels")
    torch.testing.assert_close(logits(a), logits(b), rtol=1e-5, atol=1e-5)


def test_explicit_device_map_on_cpu(hf, hf_logits, tmp_path):
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, device_map={"0": "cpu", "1": "cpu"})
    assert layer_devices(model) == [torch.device("cpu")] * 2
    cache = KVCache(model.config, 2, 16, device=layer_devices(model))
    with torch.no_grad():
        out = model(IDS, cache=cache, slots=torch.arange(IDS.shape[1]))
    assert max_diff(out, hf_logits) <= TOL


def test_device_errors(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="pass one of them"):
        load_model(tmp_path, device="meta", device_map="auto")
    with pytest.raises(UserError, match="device"):
        load_model(tmp_path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            load_model(tmp_path, device="cuda:0")
        with pytest.raises(UserError, match="no CUDA GPU"):
            load_model(tmp_path, device_map="auto")


def test_progress_bar(hf, tmp_path, capfd):
    hf.save_pretrained(tmp_path)
    capfd.readouterr()
    load_model(tmp_path, progress=True)
    assert f"Loading {tmp_path.name}" in capfd.readouterr().err
    load_model(tmp_path)  # stderr is not a terminal here: silent
    load_model(tmp_path, progress=False)
    assert capfd.readouterr().err == ""


def test_quantize_argument(hf, tmp_path):
    """quantize="int8" gives int8 attention and expert weights, the same parameter count, and
    logits within 10% of the float model's range (the quality cost is measured by the benchmark)."""
    hf.save_pretrained(tmp_path)
    plain = load_model(tmp_path)
    model = load_model(tmp_path, quantize="int8")
    assert model.layers[0].attention.wq.weight.dtype == torch.int8
    assert model.layers[0].feed_forward.w1.dtype == torch.int8
    assert count_parameters(model).total == count_parameters(plain).total
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(ids), model(ids)
    assert (a - b).abs().max().item() <= 0.10 * a.abs().max().item()
    with pytest.raises(UserError, match="quantize"):
        load_model(tmp_path, quantize="int4")


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from mixtral_lite import load_model
    def status(field):  # bytes; VmHWM is this process's peak (ru_maxrss can carry the parent's across exec)
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    before = status("VmRSS")
    quantize = sys.argv[2] if len(sys.argv) > 2 else None
    model = load_model(sys.argv[1], dtype=torch.bfloat16, quantize=quantize, progress=False)
    done = model.quantization["bytes_after"] if quantize else None
    print(json.dumps({"before": before, "peak": status("VmHWM"), "model": done}))
    """
)


def _load_peak(tmp_path, intermediate_size: int, max_shard_size: str, quantize: str | None = None):
    """A random float32 checkpoint written to ``tmp_path`` and loaded in bfloat16 (``quantize``: as
    it streams) in a fresh process: (float32 bytes, peak RSS growth, largest file tensor, quantised
    model bytes or None)."""
    from mixtral_lite import MixtralConfig, save_pretrained

    config = MixtralConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=intermediate_size,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        moe={"num_experts": 8, "num_experts_per_tok": 2},
    )
    model = Mixtral(config)
    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    save_pretrained(model, tmp_path, max_shard_size=max_shard_size)
    del model
    src = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), *([quantize] if quantize else [])],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    r = json.loads(out.stdout)
    largest = max(t.nbytes for f in tmp_path.glob("*.safetensors") for t in read_safetensors_header(f))
    return fp32_bytes, r["peak"] - r["before"], largest, r["model"]


def test_peak_memory_is_model_plus_one_tensor(tmp_path):
    """Loading 160 MB of float32 into bfloat16 raises the peak RSS by the 80 MB bf16 model plus at most
    one source tensor (16 MB here) and 40 MB of slack, far below the 160 MB a float32 copy would cost."""
    fp32_bytes, grown, largest, _ = _load_peak(tmp_path, 1024, "60MB")
    assert 150e6 < fp32_bytes < 170e6
    print(f"fp32 {fp32_bytes / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB, peak RSS grew {grown / 1e6:.1f} MB")
    assert grown <= fp32_bytes / 2 + largest + 40e6


def test_int8_load_never_holds_the_float_model(tmp_path):
    """``quantize="int8"`` quantises each weight as it arrives, on the device it loads to: 300 MB of
    float32 raise the peak RSS by the int8 model, the quantiser's float32 working copies of one
    tensor (four of the largest) and 30 MB of slack, below the 157 MB bfloat16 model that loading
    first and quantising after held (and that freed tensors left in glibc's heap held as well)."""
    fp32_bytes, grown, largest, int8_bytes = _load_peak(tmp_path, 2048, "100MB", quantize="int8")
    print(
        f"fp32 {fp32_bytes / 1e6:.1f} MB, int8 model {int8_bytes / 1e6:.1f} MB, largest {largest / 1e6:.1f} MB, "
        f"peak RSS grew {grown / 1e6:.1f} MB"
    )
    assert grown <= int8_bytes + 4 * largest + 30e6 < fp32_bytes / 2


def _variant_config():
    from mixtral_lite import MixtralConfig

    data = MixtralConfig.from_preset("tiny").to_dict()
    data["moe"].update(n_shared_experts=1, bias_balancing=True)
    return MixtralConfig.from_dict(data)


def test_own_names_for_mixtral_lite_checkpoints(tmp_path):
    """A variant checkpoint (model_type mixtral_lite) may use our own parameter names: each maps to itself."""
    from mixtral_lite.weights.saving import write_safetensors

    model = Mixtral(_variant_config()).eval()
    write_safetensors(tmp_path / "model.safetensors", model.state_dict().items())
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    again = load_model(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_own_names_refused_for_plain_mixtral(tmp_path):
    """model_type mixtral means hub names: our own names there are unexpected keys."""
    from mixtral_lite import MixtralConfig
    from mixtral_lite.weights.saving import write_safetensors

    model = Mixtral(MixtralConfig.from_preset("tiny"))
    write_safetensors(tmp_path / "model.safetensors", model.state_dict().items())
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    with pytest.raises(UserError, match=r"unexpected keys \(not part of this model\): tok_embeddings.weight"):
        load_model(tmp_path)
