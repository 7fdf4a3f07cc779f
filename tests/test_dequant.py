"""The kernel's weight conversions for many-row products (``cpu/dequant.py``) against the plain
ones (``q.to(dtype)``, ``quant4.dequantize4(...).to(dtype)``), bit for bit, and the tiled int8/int4
products of many rows against the product with the whole converted matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral_lite.cpu import build, products
from mixtral_lite.cpu.dequant import dequantize_int4, dequantize_int8, native_int4_ok, native_int8_ok
from mixtral_lite.model.quant import quantize_per_channel
from mixtral_lite.model.quant4 import dequantize4, quantize4

needs_kernel = pytest.mark.skipif(not build.available(), reason="native kernel unavailable here")
DTYPES = [torch.float32, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_conversion_is_the_plain_one_bit_for_bit(dtype: torch.dtype, group: int) -> None:
    g = _gen(group)
    packed, scale, offset = quantize4(torch.randn(3, 40, 256, generator=g) * 0.05, group)  # stacked experts
    assert native_int4_ok(packed, scale, offset, dtype)
    assert torch.equal(
        _bits(dequantize_int4(packed, scale, offset, dtype)), _bits(dequantize4(packed, scale, offset).to(dtype))
    )
    # every finite float16 scale and offset, down to subnormals: the product and the sum each rounded
    bits = torch.randint(0, 1 << 16, (2, 40, 256 // group), generator=g, dtype=torch.int32).to(torch.int16)
    s, b = bits.view(torch.float16).clone()
    s[~s.isfinite()], b[~b.isfinite()] = 1.5, -0.25
    codes = torch.randint(0, 256, (40, 128), generator=g, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(_bits(dequantize_int4(codes, s, b, dtype)), _bits(dequantize4(codes, s, b).to(dtype)))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_conversion_is_exact(dtype: torch.dtype) -> None:
    q = torch.randint(-128, 128, (5, 48, 96), generator=_gen(1), dtype=torch.int32).to(torch.int8)
    assert native_int8_ok(q, dtype)
    assert torch.equal(dequantize_int8(q, dtype), q.to(dtype))
    out = torch.empty(q.shape, dtype=dtype)
    assert dequantize_int8(q, dtype, out) is out and torch.equal(out, q.to(dtype))


def test_conversion_into_a_wrong_buffer_is_refused() -> None:
    q = torch.zeros(16, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"shape \(16, 32\), got torch.bfloat16 \(32, 16\)"):
        dequantize_int8(q, torch.bfloat16, torch.empty(32, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [True, False])
def test_many_row_products_tile_by_tile_equal_the_whole_matrix(dtype: torch.dtype, kernel: bool, monkeypatch) -> None:
    """Tiles of 16 rows (88 outputs: five whole tiles and a partial one), through the kernel's
    conversions or the plain ones, against one product with the whole converted matrix."""
    if kernel and not build.available():
        pytest.skip("native kernel unavailable here")
    monkeypatch.setattr(products, "TILE_BYTES", 16 * 256 * 4)
    if not kernel:
        monkeypatch.setattr(products, "native_int4_ok", lambda *a: False)
        monkeypatch.setattr(products, "native_int8_ok", lambda *a: False)
    g = _gen(7)
    w = torch.randn(88, 256, generator=g) * 0.05
    x = torch.randn(2, 20, 256, generator=g).to(dtype)  # more rows than the few-row kernel takes
    packed, scale, offset = quantize4(w, 64)
    wide = torch.float32 if dtype in products.UPCAST_ON_CPU or dtype == torch.float32 else dtype
    whole = products.linear(x.to(wide), dequantize4(packed, scale, offset).to(wide)).to(dtype)
    torch.testing.assert_close(products.linear_int4(x, packed, scale, offset), whole, rtol=1e-6, atol=1e-6)
    q, s = quantize_per_channel(w, dtype)
    whole8 = (products.linear(x.to(wide), q.to(wide)).float() * s.float()).to(dtype)
    torch.testing.assert_close(products.linear_int8(x, q, s), whole8, rtol=1e-6, atol=1e-6)


def test_whole_matrix_fits_one_tile() -> None:
    """A matrix within TILE_BYTES is converted once, no output copy (the bench shape's experts)."""
    packed, scale, offset = quantize4(torch.randn(48, 64, generator=_gen(3)) * 0.05, 32)
    x = torch.randn(20, 64, generator=_gen(4))
    ref = F.linear(x, dequantize4(packed, scale, offset))
    torch.testing.assert_close(products.linear_int4(x, packed, scale, offset), ref, rtol=1e-5, atol=1e-5)
