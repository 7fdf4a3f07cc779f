"""The fastest CPU product for each shape: what the accelerated modules call instead of ``F.linear``.

A few rows (decoding) go through the C kernel (``native.py``); many float32 rows through oneDNN
(``onednn.py``); few float32 rows without the kernel through one weight block per thread
(``gemv.py``); on a CPU without bfloat16/float16 matrix units, several reduced-precision rows
multiply in float32 (docs/performance.md has the measurements behind each rule). Each function
equals its reference (``F.linear``, ``model.quant.linear_int8``, ``model.experts.swiglu``) up to
the order of float32 additions; the tests tie them.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..model.quant4 import dequantize4
from .dequant import dequantize_int4, dequantize_int8, native_int4_ok, native_int8_ok
from .gemv import split_linear, split_parts
from .native import (
    native_int8,
    native_linear,
    native_swiglu,
    native_swiglu_int8,
    use_native,
    use_native_int8,
    use_native_swiglu,
    use_native_swiglu_int8,
)
from .native4 import native_int4, use_native_int4
from .onednn import onednn_linear, use_onednn


def has_matrix_units(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (oneDNN on AVX-512 BF16, AMX, FP16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


# Reduced-precision dtypes whose CPU products of several rows run in float32: without matrix units
# a bfloat16 product costs about one matrix-vector product per row, while converting the weight to
# float32 costs about as much as 2-3 rows.
UPCAST_ON_CPU = tuple(d for d in (torch.bfloat16, torch.float16) if not has_matrix_units(d))
UPCAST_MIN_ROWS = 4
# Rows from which int8 products convert the weight and multiply like ``linear`` instead: the cost
# of PyTorch's int8 kernel grows with the rows.
INT8_UPCAST_MIN_ROWS = 32
HAS_INT8_MM = hasattr(torch, "_weight_int8pack_mm")
# PyTorch's CPU ``_weight_int8pack_mm`` reads the inner dimension in blocks of 16: other widths
# crash the process (measured: 8, 24, 40 segfault; 16, 32, 48 run). Such products dequantise.
INT8_MM_INNER_MULTIPLE = 16
_FAST_ACT = (torch.bfloat16, torch.float16)
# Many-row int8/int4 products convert the weight a tile of rows at a time into one reused buffer and
# multiply each tile at once: the tile is still in the cache when the GEMM reads it, and no
# matrix-sized tensor is allocated (a fresh one costs more in page faults than the conversion).
TILE_BYTES = 8 << 20
_scratch = threading.local()


def _tile_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's conversion buffer of ``dtype``, at least ``numel`` elements."""
    buf = getattr(_scratch, str(dtype), None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_scratch, str(dtype), buf)
    return buf


def _tiled(x: torch.Tensor, rows: int, dtype: torch.dtype, convert) -> torch.Tensor:
    """x [..., I] @ w.T -> [..., rows] in ``dtype``, w [rows, I] produced tile by tile by
    ``convert(o0, o1, out)`` (rows o0..o1 of w into ``out``, [o1 - o0, I] of ``dtype``)."""
    i = x.shape[-1]
    x2 = x.reshape(-1, i).to(dtype)
    tile = max(16, TILE_BYTES // (i * torch.tensor([], dtype=dtype).element_size()) // 16 * 16)
    if tile >= rows:
        w = _tile_buffer(rows * i, dtype)[: rows * i].view(rows, i)
        convert(0, rows, w)
        return linear(x2, w).view(*x.shape[:-1], rows)
    y = torch.empty(x2.shape[0], rows, dtype=dtype)
    buf = _tile_buffer(tile * i, dtype)
    for o0 in range(0, rows, tile):
        o1 = min(rows, o0 + tile)
        w = buf[: (o1 - o0) * i].view(o1 - o0, i)
        convert(o0, o1, w)
        y[:, o0:o1] = linear(x2, w)
    return y.view(*x.shape[:-1], rows)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias) on the CPU by the fastest route for x's rows and dtype."""
    if use_native(x, w):  # decoding: a few rows at memory speed
        return native_linear(x, w)
    if x.dtype in UPCAST_ON_CPU and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]:
        return F.linear(x.float(), w.float()).to(x.dtype)
    if use_onednn(x, w):  # many float32 rows
        return onednn_linear(x, w)
    parts = split_parts(x, w)
    if parts > 1:  # few float32 rows without the kernel: one block of the weight per thread
        return split_linear(x, w, parts)
    return F.linear(x, w)


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., I] @ (q * scale)^T -> [..., O] in x's dtype, reading the int8 weights directly.

    Float32 activations go through bfloat16 for PyTorch's int8 kernel (it has no float32 path); the
    per-weight rounding error of int8 is the larger of the two. Many rows (prefill) convert the
    weight instead and multiply like ``linear``.
    """
    if use_native_int8(x, q, scale):  # decoding: the C kernel
        return native_int8(x, q, scale)
    if not HAS_INT8_MM or not q.is_contiguous() or q.shape[-1] % INT8_MM_INNER_MULTIPLE:
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    rows = x.numel() // x.shape[-1]
    if rows < INT8_UPCAST_MIN_ROWS and x.dtype == scale.dtype and x.dtype in _FAST_ACT and x.is_contiguous():
        if x.dim() == 2:
            return torch._weight_int8pack_mm(x, q, scale)
        y = torch._weight_int8pack_mm(x.view(rows, x.shape[-1]), q, scale)
        return y.view(*x.shape[:-1], q.shape[0])
    if rows >= INT8_UPCAST_MIN_ROWS:  # int8 -> bfloat16/float16 is exact (|q| <= 127)
        units = x.dtype in _FAST_ACT and x.dtype not in UPCAST_ON_CPU
        dtype = x.dtype if units else torch.float32
        if native_int8_ok(q, dtype):
            y = _tiled(x, q.shape[0], dtype, lambda o0, o1, out: dequantize_int8(q[o0:o1], dtype, out))
        else:
            y = linear(x.to(dtype), q.to(dtype))
        return (y.float() * scale.float()).to(x.dtype)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    act = x2 if x2.dtype in _FAST_ACT else x2.to(torch.bfloat16)
    y = torch._weight_int8pack_mm(act.contiguous(), q, scale.to(act.dtype))
    return y.to(x.dtype).view(*shape[:-1], q.shape[0])


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x [..., I] @ w.T for int4 weights: a few rows through the C kernel (codes unpacked in
    registers); more rows dequantise the weight once and multiply like ``linear`` (in float32
    where bfloat16 has no matrix units)."""
    if use_native_int4(x, packed, scale, offset):
        return native_int4(x, packed, scale, offset)
    units = x.dtype in _FAST_ACT and x.dtype not in UPCAST_ON_CPU
    dtype = x.dtype if units else torch.float32
    if native_int4_ok(packed, scale, offset, dtype):

        def convert(o0: int, o1: int, out: torch.Tensor) -> None:
            dequantize_int4(packed[o0:o1], scale[o0:o1], offset[o0:o1], dtype, out)

        return _tiled(x, packed.shape[0], dtype, convert).to(x.dtype)
    return linear(x.to(dtype), dequantize4(packed, scale, offset).to(dtype)).to(x.dtype)


def swiglu_int4(x: torch.Tensor, parts: tuple) -> torch.Tensor:
    """One int4 expert (``parts``: w1, w2, w3 as (codes, scale, offset))."""
    p1, p2, p3 = parts
    return linear_int4(F.silu(linear_int4(x, *p1)) * linear_int4(x, *p3), *p2)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """``experts.swiglu``: one kernel call for a few rows, else three fast products."""
    if use_native_swiglu(x, w1, w2, w3):
        return native_swiglu(x, w1, w2, w3)
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


def swiglu_int8(x: torch.Tensor, qs: tuple[torch.Tensor, ...], ss: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One int8 expert (q1, q2, q3 with scales s1, s2, s3): one kernel call for a few rows."""
    if use_native_swiglu_int8(x, qs, ss):
        return native_swiglu_int8(x, qs, ss)
    (q1, q2, q3), (s1, s2, s3) = qs, ss
    return linear_int8(F.silu(linear_int8(x, q1, s1)) * linear_int8(x, q3, s3), q2, s2)


__all__ = [
    "HAS_INT8_MM",
    "UPCAST_ON_CPU",
    "has_matrix_units",
    "linear",
    "linear_int4",
    "linear_int8",
    "swiglu",
    "swiglu_int4",
    "swiglu_int8",
]
