"""The CPU speed paths give the plain code's answer: float32 products for bfloat16 rows, the
dense top-k dispatch, the static-shape expert counts, and the automatic choice of dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral_lite.cpu import build
from mixtral_lite.cpu.modules import CpuAttention
from mixtral_lite.cpu.products import UPCAST_MIN_ROWS, UPCAST_ON_CPU, linear, swiglu
from mixtral_lite.model import experts as moe
from mixtral_lite.model.experts import (
    StackedExperts,
    dispatch_experts,
    experts_dense_topk,
    experts_per_token,
    experts_reference,
    experts_sorted,
)
from mixtral_lite.model.mixtral import Linear
from mixtral_lite.model.routing import route_topk

E, D, H = 8, 32, 48


def _rand(*shape: int, seed: int = 0, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def _experts(dtype: torch.dtype = torch.float32):
    return tuple(_rand(*s, seed=i, std=0.2).to(dtype) for i, s in enumerate([(E, H, D), (E, D, H), (E, H, D)]))


def _routing(n: int, k: int = 2, seed: int = 5):
    idx, weights = route_topk(_rand(n, E, seed=seed), k)
    return _rand(n, D, seed=seed + 1), idx, weights


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 16])
def test_linear_bfloat16_rows(rows: int) -> None:
    """Few rows: the bfloat16 kernel itself (bit for bit); from UPCAST_MIN_ROWS rows on a CPU without
    native bfloat16, float32 products rounded once to bfloat16 (bit for bit)."""
    x, w = _rand(rows, 64).bfloat16(), _rand(40, 64, seed=1).bfloat16()
    out = linear(x, w)
    upcast = torch.bfloat16 in UPCAST_ON_CPU and rows >= UPCAST_MIN_ROWS
    expected = F.linear(x.float(), w.float()).bfloat16() if upcast else F.linear(x, w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    # either way within one bfloat16 rounding (2^-8 relative) of the float32 product
    ref = F.linear(x.float(), w.float())
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-3)


def test_linear_float32_is_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the compiled few-row kernel (tests/test_native.py), a product too small to split is
    ``F.linear`` itself."""

    monkeypatch.setattr(build, "available", lambda: False)
    x, w = _rand(5, 64), _rand(40, 64, seed=1)
    assert torch.equal(linear(x, w), F.linear(x, w))
    layer = Linear(64, 40)
    with torch.no_grad():
        layer.weight.copy_(w)
    assert torch.equal(layer(x), F.linear(x, w))
    assert layer.bias is None and isinstance(layer, torch.nn.Linear)


@pytest.mark.parametrize(("t", "s", "causal"), [(1, 9, False), (3, 12, False), (6, 6, True)])
def test_attention_bfloat16_runs_in_float32(t: int, s: int, causal: bool) -> None:
    """bfloat16 attention on the CPU is float32 attention rounded once (bit for bit through SDPA;
    within one bfloat16 rounding where decoding takes the C kernel, whose exp differs in the last
    float32 bit), within bfloat16 rounding of the plain bfloat16 kernel."""
    q, k, v = (
        _rand(2, 4, t, 16).bfloat16(),
        _rand(2, 2, s, 16, seed=1).bfloat16(),
        _rand(2, 2, s, 16, seed=2).bfloat16(),
    )
    mask = None if causal else torch.zeros(2, 1, t, s).bfloat16().masked_fill(_rand(2, 1, t, s, seed=3) > 1.0, -1e4)
    att = CpuAttention.__new__(CpuAttention)  # attend() reads the head counts only
    att.n_heads, att.n_kv_heads = 4, 2
    out = att.attend(q, k, v, mask, is_causal=causal)
    m32 = None if mask is None else mask.float()
    f32 = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=m32, is_causal=causal, enable_gqa=True
    )
    assert out.dtype == torch.bfloat16
    if causal:
        assert torch.equal(out, f32.bfloat16())
    else:
        torch.testing.assert_close(out.float(), f32.bfloat16().float(), rtol=2**-7, atol=1e-6)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out.float(), plain.float(), rtol=2**-6, atol=2e-2)


def test_linear_keeps_gradients() -> None:
    x = _rand(6, 16).bfloat16().requires_grad_()
    w = _rand(8, 16, seed=1).bfloat16().requires_grad_()
    linear(x, w).float().sum().backward()
    assert x.grad is not None and w.grad is not None and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("n", [1, 3, 20])
def test_dense_topk_matches_reference(n: int) -> None:
    w1, w2, w3 = _experts()
    x, idx, weights = _routing(n)
    out = experts_dense_topk(x, StackedExperts(w1, w2, w3), idx, weights)
    torch.testing.assert_close(
        out, experts_reference(x, StackedExperts(w1, w2, w3), idx, weights), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("fn", [experts_sorted, experts_per_token])
def test_bfloat16_fast_experts_close_to_float32(fn) -> None:
    """bfloat16 weights and activations (segments of many rows run in float32 on such CPUs): within
    bfloat16 rounding of the float32 reference on the same (bfloat16-valued) inputs."""
    w = _experts(torch.bfloat16)
    x, idx, weights = _routing(40 if fn is experts_sorted else 3)
    x = x.bfloat16()
    out = fn(x, _FastExperts(*w), idx, weights)
    ref = experts_reference(x.float(), StackedExperts(*(t.float() for t in w)), idx, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.02 * ref.abs().max().item())


class _FastExperts(StackedExperts):
    """Stacks whose per-expert product is the CPU backend's (``CpuSparseMoE.expert``)."""

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return swiglu(x, self.w1[e], self.w2[e], self.w3[e])


def test_sorted_counts_with_idle_experts() -> None:
    """Experts that receive no token (counts of 0 from the static-shape count) are skipped."""
    w1, w2, w3 = _experts()
    logits = _rand(6, E, seed=2)
    logits[:, 3:] = -1e9  # only experts 0, 1, 2 are chosen
    idx, weights = route_topk(logits, 2)
    x = _rand(6, D, seed=3)
    torch.testing.assert_close(
        experts_sorted(x, StackedExperts(w1, w2, w3), idx, weights),
        experts_reference(x, StackedExperts(w1, w2, w3), idx, weights),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("n", "compiling", "expected"),
    [
        (1, False, "per_token"),
        (4, False, "per_token"),
        (5, False, "sorted"),
        (1, True, "per_token"),
        (9, True, "per_token"),
        (17, True, "dense"),
    ],
)
def test_auto_dispatch_on_cpu(monkeypatch, n: int, compiling: bool, expected: str) -> None:
    """CPU: few tokens (N*K <= E) loop over their experts (under compile too: ids via .item());
    many sort, or run every expert under compile (no data-dependent shapes)."""
    w1, w2, w3 = _experts()
    x, idx, weights = _routing(n)
    experts = StackedExperts(w1, w2, w3)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: compiling)
        assert moe.choose_dispatch(x, experts, idx) == expected
    out = dispatch_experts(x, experts, idx, weights, expected)
    torch.testing.assert_close(out, experts_reference(x, experts, idx, weights), rtol=1e-5, atol=1e-5)


def test_unknown_dispatch_is_an_error() -> None:
    w1, w2, w3 = _experts()
    x, idx, weights = _routing(2)
    with pytest.raises(ValueError, match="dense"):
        dispatch_experts(x, StackedExperts(w1, w2, w3), idx, weights, "fastest")


def test_cpu_layout_keeps_names_shapes_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the compiled few-row kernel, float32 matrices become column-major, bfloat16 ones
    row-major; nothing else changes, and the model computes the same logits (float32: the BLAS
    kernel differs, <= 1e-5)."""
    from mixtral_lite import Mixtral, MixtralConfig
    from mixtral_lite.cpu.layout import cpu_layout, is_column_major

    config = MixtralConfig.from_dict(
        dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            moe={"num_experts": 4, "num_experts_per_tok": 2},
        )
    )
    model = Mixtral(config).eval()
    model.reset_parameters(std=0.2, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
    cpu_layout(model, kernel=False)
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert v.shape == before[k].shape and torch.equal(v, before[k]), k
    layer = model.layers[0]
    assert is_column_major(layer.attention.wq.weight) and is_column_major(layer.feed_forward.w1)
    assert is_column_major(layer.feed_forward.w1[1])  # each expert's slice too
    assert is_column_major(model.output.weight)
    assert model.tok_embeddings.weight.is_contiguous() and layer.feed_forward.gate.weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    cpu_layout(model.to(torch.bfloat16), kernel=False)  # after a dtype change: row-major again
    assert layer.attention.wq.weight.is_contiguous() and layer.feed_forward.w1.is_contiguous()
