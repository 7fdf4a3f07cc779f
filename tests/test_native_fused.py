"""The kernel's fused decoding entries (``native.py``): attention against the cache, every chosen
expert of a few rows, and the q/k/v projections with the rotary embedding. Each is tied to the
plain PyTorch code it replaces, and the model takes them exactly where intended."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral_lite import MixtralConfig
from mixtral_lite.cpu import build, install_cpu_kernels, modules, native
from mixtral_lite.cpu.layer import LayerPlan
from mixtral_lite.model import experts as moe
from mixtral_lite.model import mixtral as model
from mixtral_lite.model import quant
from mixtral_lite.model.cache import KVCache
from mixtral_lite.model.experts import StackedExperts
from mixtral_lite.model.routing import route_topk

pytestmark = pytest.mark.skipif(not build.available(), reason="native kernel unavailable here")
DTYPES = [torch.float32, torch.bfloat16]


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 160, 64), (3, 4, 4, 2, 37, 20), (2, 6, 3, 8, 50, 16)])
def test_attention_equals_sdpa_in_float32(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """The model's reference: SDPA on float32 copies, rounded once (bfloat16: bit for bit here;
    float32: up to the order of the sums). q may be a transposed view; grouped heads; masked keys."""
    b, h, kv, t, s, hd = shape
    q = _rand(b, t, h, hd, dtype=dtype).transpose(1, 2)  # [B, H, T, hd], as the projections give it
    k, v = _rand(b, kv, s, hd, seed=1, dtype=dtype), _rand(b, kv, s, hd, seed=2, dtype=dtype)
    keep = torch.rand(b, 1, t, s, generator=torch.Generator().manual_seed(3)) < 0.6
    keep[..., 0] = True
    mask = _additive(keep, dtype)
    assert native.use_native_attention(q, k, v, mask)
    y = native.native_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(), enable_gqa=True)
    assert y.shape == (b, h, t, hd) and y.dtype == dtype
    if dtype == torch.bfloat16:
        ulp = ref.abs() * 2.0**-8
        assert ((y.float() - ref).abs() <= ulp + 1e-6).all()
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    att = modules.CpuAttention.__new__(modules.CpuAttention)  # attend() reads the head counts only
    att.n_heads, att.n_kv_heads = h, kv
    torch.testing.assert_close(att.attend(q, k, v, mask, is_causal=False), y, rtol=0, atol=0)


def test_attention_rules() -> None:
    q, k = _rand(1, 4, 1, 8), _rand(1, 2, 10, 8)
    mask = _additive(torch.ones(1, 1, 1, 10, dtype=torch.bool), torch.float32)
    assert native.use_native_attention(q, k, k, mask)
    assert not native.use_native_attention(q, k, k, None)  # causal without a cache: SDPA
    assert not native.use_native_attention(q, k, k, mask.bool())  # boolean mask
    assert not native.use_native_attention(q.bfloat16(), k, k, mask)  # mixed dtypes
    assert not native.use_native_attention(_rand(1, 4, 9, 8), k, k, _additive(torch.ones(1, 1, 9, 10).bool(), q.dtype))
    assert not native.use_native_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, mask)
    assert not native.use_native_attention(_rand(1, 3, 1, 8), k, k, mask)  # 3 heads over 2 groups
    assert not native.use_native_attention(q.requires_grad_(), k, k, mask)


def _experts(e: int, d: int, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(_rand(*s, seed=k, dtype=dtype) * 0.2 for k, s in ((1, (e, i, d)), (2, (e, d, i)), (3, (e, i, d))))


def _per_token(x: torch.Tensor, one, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The plain loop of ``moe.experts_per_token``: one expert call per (token, choice)."""
    rows = []
    for n in range(x.shape[0]):
        acc = None
        for e, w in zip(idx[n].tolist(), weights[n].tolist(), strict=True):
            y = one(x[n : n + 1], e) * w
            acc = y if acc is None else acc + y
        rows.append(acc)
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_k", [(1, 2), (3, 2), (8, 2), (5, 1), (4, 3)])
def test_experts_equal_the_per_token_loop(dtype: torch.dtype, rows_k: tuple[int, int]) -> None:
    """Bit for bit the per-token loop of single-expert calls, float and int8 weights, also when rows
    share an expert (they then run through it together)."""
    n, k = rows_k
    e, d, i = 6, 64, 80
    ws = _experts(e, d, i, dtype)
    x = _rand(n, d, seed=4, dtype=dtype)
    logits = _rand(n, e, seed=5)
    logits[:, 0] += 10  # every row picks expert 0: a shared expert
    idx, weights = route_topk(logits, k)
    assert native.use_native_experts(x, ws, None, idx)
    y = native.native_experts(x, ws, None, idx, weights)
    assert torch.equal(
        y, _per_token(x, lambda r, j: native.native_swiglu(r, ws[0][j], ws[1][j], ws[2][j]), idx, weights)
    )
    q = [quant.quantize_per_channel(w.float(), dtype) for w in ws]
    qs, ss = tuple(a for a, _ in q), tuple(s for _, s in q)
    assert native.use_native_experts(x, qs, ss, idx)
    y8 = native.native_experts(x, qs, ss, idx, weights)

    def one8(r: torch.Tensor, j: int) -> torch.Tensor:
        return native.native_swiglu_int8(r, tuple(a[j] for a in qs), tuple(s[j] for s in ss))

    assert torch.equal(y8, _per_token(x, one8, idx, weights))
    ref = moe.experts_reference(x.double(), StackedExperts(*(w.double() for w in ws)), idx, weights.double())
    torch.testing.assert_close(y.double(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


def test_experts_rules_and_errors() -> None:
    ws = _experts(4, 16, 24, torch.float32)
    x, idx = _rand(2, 16), torch.tensor([[0, 1], [2, 3]])
    assert native.use_native_experts(x, ws, None, idx)
    assert not native.use_native_experts(_rand(9, 16), ws, None, idx.repeat(5, 1)[:9])  # many rows
    assert not native.use_native_experts(x.bfloat16(), ws, None, idx)  # mixed dtypes
    assert not native.use_native_experts(x, (ws[0].transpose(1, 2), ws[1], ws[2]), None, idx)
    with pytest.raises(RuntimeError, match="few_rows_experts"):
        native.native_experts(x, ws, None, torch.tensor([[0, 4], [1, 2]]), torch.ones(2, 2))  # expert 4 of 4


def test_moe_layer_takes_the_experts_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed MoE layer runs a decoding row's chosen experts in one kernel call."""
    calls: list[int] = []
    real = native.native_experts
    monkeypatch.setattr(modules, "native_experts", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    config = MixtralConfig.from_preset("tiny")
    layer = model.SparseMoE(config).bfloat16()
    with torch.no_grad():
        for w in (layer.w1, layer.w2, layer.w3, layer.gate.weight):
            w.copy_(_rand(*w.shape, seed=w.numel()) * 0.2)
    x = _rand(1, config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        ref, ref_logits = layer(x)
        install_cpu_kernels(layer)
        y, logits = layer(x)
    assert calls == [1] and torch.equal(logits, ref_logits)
    torch.testing.assert_close(y.float(), ref.float(), rtol=0.02, atol=0.02)


def _projections(dtype: torch.dtype, int8: bool, d: int = 96, h: int = 4, kv: int = 2, hd: int = 16):
    ws = [_rand(n * hd, d, seed=s, dtype=dtype) * 0.2 for s, n in ((1, h), (2, kv), (3, kv))]
    if int8:
        return tuple(quant.quantize_per_channel(w.float(), dtype) for w in ws)
    return tuple((w, None) for w in ws)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("bt", [(1, 1), (8, 1), (2, 3)])
def test_qkv_equals_projections_then_rotary(dtype: torch.dtype, int8: bool, bt: tuple[int, int]) -> None:
    """Bit for bit: the three products (the kernel's own single products) then ``apply_rotary``."""
    b, t = bt
    hd = 16
    projections = _projections(dtype, int8, hd=hd)
    x = _rand(b, t, 96, seed=7, dtype=dtype)
    positions = torch.randint(0, 4000, (b, t), generator=torch.Generator().manual_seed(8))
    cos, sin = model.rotary_cos_sin(positions, model.inverse_frequencies(hd, 1e6), dtype)
    assert native.use_native_qkv(x, projections, cos, hd)
    q, k, v = native.native_qkv(x, projections, cos, sin, hd)

    def plain(w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        return native.native_linear(x, w) if s is None else native.native_int8(x, w, s)

    for got, (w, s), rotate in zip((q, k, v), projections, (True, True, False), strict=True):
        ref = plain(w, s)
        if rotate:
            heads = ref.view(b, t, -1, hd).transpose(1, 2)
            ref = model.apply_rotary(heads, cos, sin).transpose(1, 2).reshape(b, t, -1)
        assert torch.equal(got, ref)


def test_qkv_rules() -> None:
    projections = _projections(torch.float32, False)
    x = _rand(1, 1, 96)
    cos, _ = model.rotary_cos_sin(
        torch.zeros(1, 1, dtype=torch.long), model.inverse_frequencies(16, 1e6), torch.float32
    )
    assert native.use_native_qkv(x, projections, cos, 16)
    assert not native.use_native_qkv(_rand(1, 9, 96), projections, cos, 16)  # many rows
    assert not native.use_native_qkv(x, projections, cos.bfloat16(), 16)
    mixed = (projections[0], _projections(torch.float32, True)[1], projections[2])
    assert not native.use_native_qkv(x, mixed, cos, 16)  # float and int8 weights mixed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_decoding_with_and_without_the_fused_calls_agrees(
    dtype: torch.dtype, quantize: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model decodes the same logits with the CPU kernels installed (each layer in one call; with
    the one-call layer declined, its attention half in one call and the experts in another) as the
    reference model it was before installing."""
    config = MixtralConfig.from_preset("tiny")
    torch.manual_seed(0)
    net = model.Mixtral(config).to(dtype).eval()
    if quantize:
        quant.quantize_model(net, quantize)
    ids = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))

    def run() -> list[torch.Tensor]:
        cache = KVCache(config, 2, 12, dtype=dtype)
        out = [net(ids, cache=cache, slots=torch.arange(5))[:, -1]]
        nxt = out[0].argmax(-1, keepdim=True)
        for pos in range(5, 9):
            logits = net(nxt, cache=cache, slots=torch.tensor([pos]))[:, -1]
            out.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
        return out

    calls: dict[str, int] = {}
    for name in ("native_attention_block", "native_experts", "native_attention"):
        real = getattr(modules, name)
        monkeypatch.setattr(
            modules, name, lambda *a, _f=real, _n=name, **k: calls.update({_n: calls.get(_n, 0) + 1}) or _f(*a, **k)
        )
    real_run = LayerPlan.run

    def layer_run(*a):
        out = real_run(*a)
        calls["layer"] = calls.get("layer", 0) + (out is not None)
        return out

    monkeypatch.setattr(LayerPlan, "run", layer_run)
    n = 4 * config.num_hidden_layers  # decode steps x layers
    layers = config.num_hidden_layers
    with torch.no_grad():
        plain = run()  # the reference modules
        assert calls == {}
        install_cpu_kernels(net)
        layered = run()  # each layer in one call
        # the prefill (2 x 5 rows) is over the row limit for products, not for attention (5 queries a row)
        assert calls == {"layer": n, "native_attention": layers}
        calls.clear()
        monkeypatch.setattr(modules.CpuBlock, "_plan", lambda *a: None)
        halves = run()  # the attention half in one call, the experts in one call
        assert calls == {"native_attention_block": n, "native_experts": n, "native_attention": layers}
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for z, a, c in zip(layered, halves, plain, strict=True):
        # the one-call layer's router: the same experts, probabilities from expf (last-bit differences)
        torch.testing.assert_close(z.float(), a.float(), rtol=tol, atol=tol)
        assert torch.equal(z.argmax(-1), a.argmax(-1))
        torch.testing.assert_close(a.float(), c.float(), rtol=0.02, atol=0.02)
        if not (quantize and dtype == torch.bfloat16):  # the reference rounds int8 products to bfloat16
            assert torch.equal(a.argmax(-1), c.argmax(-1))
