"""The C kernel's int4 entries (``csrc/int4.c``): few-row products and the chosen experts of a few
rows with group-wise int4 weights (``model/quant4.py``'s format), unpacked in registers.

Each ``native_X`` has its rule ``use_native_X`` and equals the plain product (``quant4.
linear_int4_reference``: dequantise, multiply in float32) up to the rounding of the activations
to int8 per group (at most max|x_group| / 254 per element; AVX2) and the order of float32 sums.
"""

from __future__ import annotations

import torch

from . import build
from .build import loaded as _loaded
from .native import NATIVE_MAX_ROWS, int4_weights_ok

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _rows_ok(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.numel() == 0:
        return False
    if x.numel() > NATIVE_MAX_ROWS * x.shape[-1]:
        return False
    if (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
        return False
    return build.available()


def use_native_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> bool:
    """Whether x [..., I] @ w.T (w int4 [O, I]) should run through the kernel: CPU, float32 or
    bfloat16, at most ``NATIVE_MAX_ROWS`` rows, the weights in the kernel's layout, no autograd."""
    return packed.dim() == 2 and int4_weights_ok(packed, scale, offset, x.shape[-1]) and _rows_ok(x)


def native_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``linear_int4(x, packed, scale, offset)`` for at most ``NATIVE_MAX_ROWS`` rows of x [..., I]."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    o, i = packed.shape[0], x.shape[-1]
    y = torch.empty(rows.shape[0], o, dtype=x.dtype)
    rc = _loaded().few_rows_int4(
        packed.data_ptr(), scale.data_ptr(), offset.data_ptr(), rows.data_ptr(), y.data_ptr(),
        rows.shape[0], o, i, i // scale.shape[-1], _DTYPES[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"native kernel few_rows_int4 failed for {rows.shape[0]} rows -> {o} ({x.dtype})")
    return y.view(*x.shape[:-1], o)


Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes, scale, offset


def use_native_experts_int4(x: torch.Tensor, parts: tuple[Parts, Parts, Parts], idx: torch.Tensor) -> bool:
    """Whether the chosen int4 experts of x [N, D] (``parts``: w1, w2, w3 as (codes, scale,
    offset), stacked [E, ...]) should run as one call: as ``use_native_int4``, one group size."""
    (q1, s1, b1), (q2, s2, b2), (q3, s3, b3) = parts
    if x.dim() != 2 or q1.dim() != 3 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        return False
    e, i, _ = q1.shape
    d = x.shape[1]
    if q3.shape != q1.shape or q2.shape != (e, d, i // 2) or not _rows_ok(x):
        return False
    if not (int4_weights_ok(q1, s1, b1, d) and int4_weights_ok(q3, s3, b3, d) and int4_weights_ok(q2, s2, b2, i)):
        return False
    return d // s1.shape[-1] == i // s2.shape[-1] == d // s3.shape[-1]


def native_experts_int4(
    x: torch.Tensor, parts: tuple[Parts, Parts, Parts], idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_k weights[n, k] * expert_{idx[n, k]}(x[n])`` in one call (``experts_per_token``'s
    result, rounded as its ops round)."""
    (q1, s1, b1), (q2, s2, b2), (q3, s3, b3) = parts
    e, i, _ = q1.shape
    n, d = x.shape
    rows = x.contiguous()
    ids = idx.to(torch.int64).contiguous()
    rw = weights.to(torch.float32).contiguous()
    y = torch.empty(n, d, dtype=x.dtype)
    rc = _loaded().few_rows_experts_int4(
        *(t.data_ptr() for t in (q1, s1, b1, q3, s3, b3, q2, s2, b2)), e, ids.data_ptr(), rw.data_ptr(),
        idx.shape[1], rows.data_ptr(), y.data_ptr(), n, d, i, d // s1.shape[-1], _DTYPES[x.dtype],
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"native kernel few_rows_experts_int4 failed for x {tuple(x.shape)}")
    return y


__all__ = ["native_experts_int4", "native_int4", "use_native_experts_int4", "use_native_int4"]
