"""Quantised checkpoints: quantising while loading gives exactly what quantising after loading
gives, a saved int8/int4 model loads back without the original (same buffers, same logits), and
the format is validated as strictly as every other layout."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_hf_model
from safetensors.torch import load_file, save_file

from mixtral_lite import load_model, quantize_model, save_pretrained
from mixtral_lite.commands.info import describe
from mixtral_lite.errors import UserError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qc")
    make_hf_model(
        seed=0, std=0.1, num_hidden_layers=2, vocab_size=256, hidden_size=64, intermediate_size=128
    ).save_pretrained(path)
    return path


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["int8", "int4", "int4-hqq", "int4-mixed", "int4-mixed-hqq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantise_while_loading_equals_quantise_after(folder, mode: str, dtype: torch.dtype) -> None:
    streamed = load_model(folder, dtype=dtype, quantize=mode, group_size=32, progress=False)
    after = quantize_model(load_model(folder, dtype=dtype, progress=False), mode, group_size=32)
    a, b = _state(streamed), _state(after)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert streamed.quantized == mode and type(streamed.layers[0].feed_forward) is type(after.layers[0].feed_forward)
    assert streamed.quantization["bytes_after"] == after.quantization["bytes_after"]


@pytest.mark.parametrize("mode", ["int8", "int4", "int4-hqq"])
def test_quantise_while_loading_in_row_blocks_equals_quantise_after(tmp_path, mode: str) -> None:
    """An output head of 5,000 rows is quantised from the file's view in blocks of rows (its file
    pages dropped as it goes); bit-equal to quantising the loaded model, HQQ's per-block stop too."""
    make_hf_model(
        seed=1, std=0.1, num_hidden_layers=1, vocab_size=5000, hidden_size=64, intermediate_size=128
    ).save_pretrained(tmp_path)
    streamed = load_model(tmp_path, dtype=torch.bfloat16, quantize=mode, group_size=32, progress=False)
    after = quantize_model(load_model(tmp_path, dtype=torch.bfloat16, progress=False), mode, group_size=32)
    a, b = _state(streamed), _state(after)
    assert a.keys() == b.keys() and a["output.weight"].shape[0] == 5000
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode", ["int8", "int4-hqq", "int4-mixed-hqq"])
def test_saved_quantised_model_loads_back(folder, tmp_path, mode: str) -> None:
    model = load_model(folder, dtype=torch.bfloat16, quantize=mode, progress=False)
    out = tmp_path / "q"
    save_pretrained(model, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral_lite"
    assert config["quantization_config"] == {
        "quant_method": "mixtral_lite", "mode": mode, "group_size": 64, "include_output": True, "format": 1,
    }  # fmt: skip
    stored = load_file(out / "model.safetensors")
    assert stored["layers.0.feed_forward.w1"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
    back = load_model(out, dtype=torch.bfloat16, progress=False)
    assert back.quantized == mode
    a, b = _state(model), _state(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(UserError, match="already quantised"):
        load_model(out, quantize="int4", progress=False)
    report = describe(out)
    assert report["problems"] == []


def _saved(folder, tmp_path):
    out = tmp_path / "q"
    save_pretrained(load_model(folder, quantize="int4", progress=False), out)
    return out


def test_missing_scale_is_a_clear_error(folder, tmp_path) -> None:
    out = _saved(folder, tmp_path)
    state = load_file(out / "model.safetensors")
    del state["layers.1.feed_forward.w2_scale"]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing keys: layers\.1\.feed_forward\.w2_scale"):
        load_model(out, progress=False)


def test_wrong_code_dtype_and_shape(folder, tmp_path) -> None:
    out = _saved(folder, tmp_path)
    state = load_file(out / "model.safetensors")
    state["layers.0.feed_forward.w1"] = state["layers.0.feed_forward.w1"].to(torch.int8)
    state["layers.0.attention.wq.scale"] = state["layers.0.attention.wq.scale"][:32].contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError) as exc:
        load_model(out, progress=False)
    assert "layers.0.feed_forward.w1: dtype expected U8, got I8" in str(exc.value)
    assert "layers.0.attention.wq.scale: shape expected [64, 1] (for layers.0.attention.wq.scale), got [32, 1]" in str(
        exc.value
    )


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
        ({"quant_method": "mixtral_lite", "mode": "int3", "group_size": 64, "include_output": True, "format": 1},
         "mode expected one of int8, int4"),
        ({"quant_method": "mixtral_lite", "mode": "int4", "group_size": 48, "include_output": True, "format": 1},
         "group_size expected a positive multiple of 32, got 48"),
        ({"quant_method": "mixtral_lite", "mode": "int4", "group_size": 64, "include_output": True, "format": 2},
         "format expected 1, got 2"),
        ([1], "expected an object, got list"),
    ],
)  # fmt: skip
def test_bad_quantization_config(folder, tmp_path, entry, message: str) -> None:
    out = _saved(folder, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = entry
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json: quantization_config: " + message):
        load_model(out, progress=False)


def test_float_folder_with_quantization_config_is_refused(folder, tmp_path) -> None:
    """The float weights under hub names do not match the quantised model: strict, not skipped."""
    out = tmp_path / "f"
    save_pretrained(load_model(folder, progress=False), out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mixtral_lite", "mode": "int8", "group_size": 64, "include_output": True, "format": 1,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="q_proj.weight: dtype expected I8, got F32"):
        load_model(out, progress=False)
