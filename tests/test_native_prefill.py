"""The kernel's attention for many query rows (``native.native_prefill_attention``,
``csrc/attention.c``): tied to SDPA on float32 copies, and taken by the model where intended."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral_lite import MixtralConfig
from mixtral_lite.cpu import build, install_cpu_kernels, modules, native
from mixtral_lite.model import mixtral as model
from mixtral_lite.model.cache import KVCache

pytestmark = pytest.mark.skipif(not build.available(), reason="native kernel unavailable here")
DTYPES = [torch.float32, torch.bfloat16]


def _rand(*shape: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: the reference's value up to the order of the sums; bfloat16: one rounding of it."""
    assert y.dtype == dtype and y.shape == ref.shape
    if dtype == torch.bfloat16:
        assert ((y.double() - ref).abs() <= ref.abs() * 2.0**-8 + 1e-6).all()
    else:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 2, 64, 64), (2, 4, 4, 37, 16), (1, 6, 3, 130, 32), (1, 4, 1, 9, 128)])
def test_causal_equals_sdpa(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Causal attention without a cache (T == S): grouped heads, row counts that are not a multiple
    of the kernel's 8-row tiles, q as the transposed view the projections give."""
    b, h, kv, t, hd = shape
    q = _rand(b, t, h, hd, seed=0, dtype=dtype).transpose(1, 2)
    k, v = _rand(b, kv, t, hd, seed=1, dtype=dtype), _rand(b, kv, t, hd, seed=2, dtype=dtype)
    assert native.use_native_prefill_attention(q, k, v, None, True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    _check(native.native_prefill_attention(q, k, v, None), ref, dtype)
    att = modules.CpuAttention.__new__(modules.CpuAttention)  # attend() reads the head counts only
    att.n_heads, att.n_kv_heads = h, kv
    _check(att.attend(q, k, v, None, is_causal=True), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_equals_sdpa(dtype: torch.dtype) -> None:
    """An additive mask against a longer cache: unwritten slots at the end, left padding, a sliding
    window and scattered holes; keys past the last visible one are never read."""
    b, h, kv, t, s, hd = 3, 4, 2, 40, 75, 32
    q = _rand(b, t, h, hd, seed=3, dtype=dtype).transpose(1, 2)
    k, v = _rand(b, kv, s, hd, seed=4, dtype=dtype), _rand(b, kv, s, hd, seed=5, dtype=dtype)
    slots = torch.arange(s)
    keep = slots[None, None, :] <= slots[None, :t, None] + 10  # queries at slots 10..49
    keep = keep & (slots[None, None, :] >= torch.tensor([0, 4, 0])[:, None, None])  # row 1: 4 pads
    keep[2] &= slots[None, :] > slots[:t, None] + 10 - 16  # row 2: a window of 16
    keep[0, :, 3] = False  # a hole
    mask = torch.zeros(b, 1, t, s, dtype=dtype).masked_fill_(~keep[:, None], float("-inf"))
    k[:, :, 60:] = float("nan")  # never visible: must not reach the result
    v[:, :, 60:] = float("nan")
    assert native.use_native_prefill_attention(q, k, v, mask, False)
    y = native.native_prefill_attention(q, k, v, mask)
    kd, vd = k.double().nan_to_num(), v.double().nan_to_num()
    ref = F.scaled_dot_product_attention(q.double(), kd, vd, attn_mask=mask.double(), enable_gqa=True)
    _check(y, ref, dtype)


def test_rules() -> None:
    q, k = _rand(1, 4, 20, 16, seed=0, dtype=torch.float32), _rand(1, 2, 20, 16, seed=1, dtype=torch.float32)
    mask = torch.zeros(1, 1, 20, 20)
    assert native.use_native_prefill_attention(q, k, k, None, True)
    assert native.use_native_prefill_attention(q, k, k, mask, False)
    assert not native.use_native_prefill_attention(q[:, :, :8], k[:, :, :8], k[:, :, :8], None, True)  # decode
    assert not native.use_native_prefill_attention(q, k, k, None, False)  # neither mask nor causal
    assert not native.use_native_prefill_attention(q, k[:, :, :10], k[:, :, :10], None, True)  # causal, T != S
    assert not native.use_native_prefill_attention(q[..., :12], k[..., :12], k[..., :12], None, True)  # hd 12
    assert not native.use_native_prefill_attention(q, k, k, mask.bool(), False)
    assert not native.use_native_prefill_attention(q.bfloat16(), k, k, None, True)
    assert not native.use_native_prefill_attention(q.requires_grad_(), k, k, None, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_prefill_with_and_without_the_kernel(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole-model prefill (no cache: causal; with a cache: masked) with the kernels installed gives
    the reference model's (SDPA's) logits."""
    config = MixtralConfig.from_preset("tiny")
    torch.manual_seed(0)
    net = model.Mixtral(config).to(dtype).eval()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = []
    real = native.native_prefill_attention
    monkeypatch.setattr(modules, "native_prefill_attention", lambda *a: calls.append(1) or real(*a))

    def run() -> list[torch.Tensor]:
        cache = KVCache(config, 2, 30, dtype=dtype)
        return [net(ids), net(ids, cache=cache, slots=torch.arange(24))]

    with torch.no_grad():
        plain = run()  # the reference modules
        install_cpu_kernels(net)
        fast = run()
        assert len(calls) == 2 * config.num_hidden_layers
    tol = 1e-4 if dtype == torch.float32 else 0.03
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
