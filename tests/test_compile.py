"""The decode step compiles as one graph on the CPU (``fullgraph=True``: a graph break fails) and
gives the eager step's logits (float32, <= 1e-4); so does the int8 model's step."""

from __future__ import annotations

import pytest
import torch

from mixtral_lite import KVCache, Mixtral, MixtralConfig
from mixtral_lite.cpu import build, gemv, install_cpu_kernels
from mixtral_lite.cpu.layout import is_column_major
from mixtral_lite.generation.generate import compile_decode_step, decode_step, prefill
from mixtral_lite.model.quant import quantize_model

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    moe={"num_experts": 4, "num_experts_per_tok": 2},
)


def _model(seed: int = 0) -> Mixtral:
    model = Mixtral(MixtralConfig.from_dict(CONFIG)).eval()
    model.reset_parameters(std=0.2, generator=torch.Generator().manual_seed(seed))
    return model


def _steps(model: Mixtral, decode_fn, b: int, n: int) -> list[torch.Tensor]:
    """Prefill 5 tokens per row, then n greedy decode steps; the logits of every step."""
    ids = torch.randint(3, 64, (b, 5), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.config, b, 5 + n, dtype=model.dtype)
    tok = prefill(model, ids, cache, None).argmax(-1)
    slot, pos = torch.tensor([5]), torch.full((b, 1), 5)
    out = []
    for _ in range(n):
        logits = decode_fn(model, tok[:, None], cache, slot, pos)
        out.append(logits)
        tok = logits.argmax(-1)
        slot += 1
        pos += 1
    return out


@pytest.mark.parametrize("b", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_compiled_decode_step_matches_eager(b: int) -> None:
    """b=1: the per-token expert loop (ids via .item()); b=3: every expert on every token."""
    torch._dynamo.reset()
    model = _model()
    eager = _steps(model, decode_step, b, 4)
    compiled = _steps(model, compile_decode_step("cpu"), b, 4)  # fullgraph=True: raises on a graph break
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_int8_decode_step_matches_eager() -> None:
    torch._dynamo.reset()
    model = quantize_model(_model().to(torch.bfloat16))
    eager = _steps(model, decode_step, 1, 3)
    compiled = _steps(model, compile_decode_step("cpu"), 1, 3)
    for e, c in zip(eager, compiled, strict=True):  # bfloat16 logits of size ~1: a few bf16 ulps
        torch.testing.assert_close(c.float(), e.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_matches_eager_without_the_kernel(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads, without the C kernel: eager decoding splits float32 products over them (and
    runs both experts of a token in one product); the compiled step runs PyTorch's ops on the
    weights stored row-major, and gives the same logits."""
    torch._dynamo.reset()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(gemv, "SPLIT_MIN_OUT", 1)
    monkeypatch.setattr(build, "available", lambda: False)
    try:
        model = _model().to(dtype)
        install_cpu_kernels(model)
        assert is_column_major(model.layers[0].feed_forward.w1) == (dtype == torch.float32)
        eager = _steps(model, decode_step, 1, 3)
        compiled = _steps(model, compile_decode_step("cpu"), 1, 3)
        assert all(p.is_contiguous() for p in model.parameters())
        tol = 1e-4 if dtype == torch.float32 else 0.05
        for e, c in zip(eager, compiled, strict=True):
            torch.testing.assert_close(c.float(), e.float(), rtol=tol, atol=tol)
    finally:
        torch.set_num_threads(before)
