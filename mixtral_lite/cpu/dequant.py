"""Quantised weights converted to bfloat16/float32 for many-row products (prefill), in one pass.

Many rows multiply faster through PyTorch's GEMM on a converted weight than through a few-row
kernel, and the conversion is then what int8/int4 prefill pays on top of bfloat16. The plain
conversions (``q.to(dtype)``, ``quant4.dequantize4(...).to(dtype)``) run several elementwise
passes over float32 temporaries of the whole matrix; the kernel's ``convert_int8`` /
``convert_int4`` (``csrc/convert.c``) write each element once, with the same bits. Without the
kernel, or for weights outside its layout, the plain conversion runs.
"""

from __future__ import annotations

import torch

from ..model.quant4 import dequantize4
from . import build
from .native import int4_weights_ok

_OUT = {torch.float32: 0, torch.bfloat16: 1}


def _checked(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(
            f"dequantize: out expected a contiguous CPU {dtype} tensor of shape {tuple(shape)}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def native_int8_ok(q: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``dequantize_int8(q, dtype)`` runs in the kernel."""
    return dtype in _OUT and q.device.type == "cpu" and q.is_contiguous() and q.numel() % 16 == 0 and build.available()


def native_int4_ok(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``dequantize_int4(packed, scale, offset, dtype)`` runs in the kernel."""
    ok = dtype in _OUT and packed.device.type == "cpu" and int4_weights_ok(packed, scale, offset, packed.shape[-1] * 2)
    return ok and build.available()


def dequantize_int8(q: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``q.to(dtype)`` for int8 codes (exact in bfloat16 and float32), into ``out`` if given (a
    contiguous tensor of q's shape and ``dtype``: reusing one spares the page faults of a new one)."""
    if not native_int8_ok(q, dtype):
        return q.to(dtype) if out is None else out.copy_(q)
    out = torch.empty(q.shape, dtype=dtype) if out is None else _checked(out, q.shape, dtype)
    rc = build.loaded().convert_int8(q.data_ptr(), out.data_ptr(), q.numel(), _OUT[dtype], torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native kernel convert_int8 failed for {tuple(q.shape)}")
    return out


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``dequantize4(packed, scale, offset).to(dtype)``: int4 codes [..., O, I/2] to [..., O, I], into
    ``out`` if given (as ``dequantize_int8``)."""
    i = packed.shape[-1] * 2
    if not native_int4_ok(packed, scale, offset, dtype):
        w = dequantize4(packed, scale, offset)
        return w.to(dtype) if out is None else out.copy_(w)
    shape = (*packed.shape[:-1], i)
    out = torch.empty(shape, dtype=dtype) if out is None else _checked(out, shape, dtype)
    rows = packed.numel() // packed.shape[-1]
    rc = build.loaded().convert_int4(
        packed.data_ptr(), scale.data_ptr(), offset.data_ptr(), out.data_ptr(), rows, i, i // scale.shape[-1],
        _OUT[dtype], torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"native kernel convert_int4 failed for {tuple(packed.shape)}")
    return out


__all__ = ["dequantize_int4", "dequantize_int8", "native_int4_ok", "native_int8_ok"]
