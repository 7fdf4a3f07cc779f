"""Int8 weight-only products in Triton: the experts' (reading only the experts some row chose)
and a plain matrix's (read once for every row of a decode batch).

Decoding a few rows of an int8 MoE layer has to read each chosen expert's int8 weights once and
no other expert's: the sync-free PyTorch dispatches either run every expert (``each``: all E read)
or write float copies of the chosen ones (``gather``). Here one program per (expert, output tile)
loads the routing ids [N, K] (a few hundred bytes), exits without touching the weights when no
row chose its expert, and otherwise streams its int8 tile once, multiplies with float32
accumulation (the int8 weights cast to the activations' dtype, exact for |q| <= 127), applies the
per-row scale after the product and writes the (token, slot) pairs that chose it. No host sync,
static shapes: CUDA graphs and ``torch.compile`` see one op (``ops.py`` registers these launchers
as custom ops).

Rows are (token, slot) pairs, P = N*K: every pair belongs to exactly one expert, so each output
row is written by one program per tile and nothing is accumulated across programs. Pairs of other
experts ride along as zero rows of the tile product (compute is spare at decode sizes; bandwidth
is not).

``interpret=True`` runs the same kernels in Triton's interpreter on CPU tensors (the tests).

Axis legend: N tokens, K experts per token, P = N*K pairs, E experts, D hidden, F intermediate.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Tiles: small output tiles give enough programs to keep every SM streaming when only 2 of 8
# experts are chosen; the reduction tile is one 128-byte line of int8 weights per row.
GATE_UP_TILE = 32  # F outputs per program
DOWN_TILE = 32  # D outputs per program
LINEAR_TILE = 32  # outputs per program of a plain int8 matrix
REDUCE_TILE = 128  # inputs per loop step
MIN_PAIRS_TILE = 16  # tl.dot's smallest M
FP_FUSION = True  # multiply-adds contracted (Triton's default so far; said, so 3.9 does not warn)


@triton.jit
def _add(a, b):  # (the only jit helper: a reduction's combine function, which the interpreter runs too)
    return a + b


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [N, D] activations
    w1_ptr,  # [E, F, D] int8
    s1_ptr,  # [E, F]
    w3_ptr,  # [E, F, D] int8
    s3_ptr,  # [E, F]
    idx_ptr,  # [P] expert of each pair
    h_ptr,  # [P, F] out: silu(x w1^T s1) * (x w3^T s3) of each pair's token
    P,
    D,
    F,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,  # the products' operand dtype (see ``_dot_dtype``)
    PRECISION: tl.constexpr,
):
    e = tl.program_id(0)
    pairs = tl.arange(0, BLOCK_P)
    mine = tl.load(idx_ptr + pairs, mask=pairs < P, other=-1) == e  # the routing ids: a few bytes
    if tl.reduce(mine.to(tl.int32), 0, _add) == 0:  # no row chose this expert: its weights stay unread
        return
    rows = pairs // K
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = fs < F
    base = e.to(tl.int64) * F * D
    acc1 = tl.full((BLOCK_P, BLOCK_F), 0.0, tl.float32)
    acc3 = tl.full((BLOCK_P, BLOCK_F), 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        xt = tl.load(x_ptr + rows[:, None] * D + ds[None, :], mask=mine[:, None] & d_ok[None, :], other=0.0).to(DOT)
        w_off = base + fs[:, None] * D + ds[None, :]
        w_ok = f_ok[:, None] & d_ok[None, :]
        w1t = tl.load(w1_ptr + w_off, mask=w_ok, other=0).to(DOT)
        w3t = tl.load(w3_ptr + w_off, mask=w_ok, other=0).to(DOT)
        acc1 = tl.dot(xt, tl.trans(w1t), acc1, input_precision=PRECISION)
        acc3 = tl.dot(xt, tl.trans(w3t), acc3, input_precision=PRECISION)
    a = acc1 * tl.load(s1_ptr + e * F + fs, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    b = acc3 * tl.load(s3_ptr + e * F + fs, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    h = a / (1.0 + tl.exp(-a)) * b  # silu(a) * b (builtins only: the interpreter runs them)
    tl.store(h_ptr + pairs[:, None] * F + fs[None, :], h.to(h_ptr.dtype.element_ty), mask=mine[:, None] & f_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr,  # [P, F] each pair's input
    w2_ptr,  # [E, D, F] int8
    s2_ptr,  # [E, D]
    idx_ptr,  # [P]
    y_ptr,  # [P, D] float32 out: h w2^T s2 of each pair
    P,
    D,
    F,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    e = tl.program_id(0)
    pairs = tl.arange(0, BLOCK_P)
    mine = tl.load(idx_ptr + pairs, mask=pairs < P, other=-1) == e  # the routing ids: a few bytes
    if tl.reduce(mine.to(tl.int32), 0, _add) == 0:
        return
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    base = e.to(tl.int64) * D * F
    acc = tl.full((BLOCK_P, BLOCK_D), 0.0, tl.float32)
    for f0 in range(0, F, BLOCK_F):
        fs = f0 + tl.arange(0, BLOCK_F)
        f_ok = fs < F
        ht = tl.load(h_ptr + pairs[:, None] * F + fs[None, :], mask=mine[:, None] & f_ok[None, :], other=0.0).to(DOT)
        wt = tl.load(w2_ptr + base + ds[:, None] * F + fs[None, :], mask=d_ok[:, None] & f_ok[None, :], other=0)
        acc = tl.dot(ht, tl.trans(wt.to(DOT)), acc, input_precision=PRECISION)
    y = acc * tl.load(s2_ptr + e * D + ds, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + pairs[:, None] * D + ds[None, :], y, mask=mine[:, None] & d_ok[None, :])


@triton.jit
def _linear_kernel(
    x_ptr,  # [M, N_IN] activations
    w_ptr,  # [N_OUT, N_IN] int8
    s_ptr,  # [N_OUT]
    y_ptr,  # [M, N_OUT] out, in x's dtype
    M,
    N_OUT,
    N_IN,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    outs = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = outs < N_OUT
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    acc = tl.full((BLOCK_M, BLOCK_O), 0.0, tl.float32)
    for i0 in range(0, N_IN, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        i_ok = cols < N_IN
        xt = tl.load(x_ptr + ms[:, None] * N_IN + cols[None, :], mask=m_ok[:, None] & i_ok[None, :], other=0.0).to(DOT)
        w_off = outs[:, None].to(tl.int64) * N_IN + cols[None, :]
        wt = tl.load(w_ptr + w_off, mask=o_ok[:, None] & i_ok[None, :], other=0).to(DOT)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    y = acc * tl.load(s_ptr + outs, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + ms[:, None] * N_OUT + outs[None, :], y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :]
    )


@functools.cache
def _interpreted(kernel):
    """The same kernel run by Triton's interpreter (numpy on the host: CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel.fn)


def _kernel(kernel, interpret: bool):
    return _interpreted(kernel) if interpret else kernel


def _check(what: str, ok: bool, *tensors: torch.Tensor, names: str) -> None:
    """Shapes and layout the kernels index by (host metadata only: no sync)."""
    shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(names.split(), tensors, strict=True))
    if not ok:
        raise ValueError(f"{what}: shapes {shapes} do not fit")
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError(f"{what}: expected contiguous tensors, got {shapes}")


def _pairs_tile(p: int) -> int:
    return max(MIN_PAIRS_TILE, triton.next_power_of_2(p))


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _dot_dtype(dtype: torch.dtype, interpret: bool):
    """The activations' dtype (tensor cores for bf16/fp16). The interpreter multiplies bfloat16 as
    its raw uint16 bits (Triton 3.9, numpy has no bfloat16), so there bf16 operands go in as
    float32: the same numbers (bf16 and int8 are exact in float32, and a bf16 product is exact in
    float32 as the tensor cores form it), accumulated in float32 either way."""
    if dtype not in _TL:
        raise ValueError(f"int8 MoE kernel: expected activations in {', '.join(map(str, _TL))}, got {dtype}")
    return tl.float32 if interpret and dtype == torch.bfloat16 else _TL[dtype]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # (only float32 operands read it: no tf32 rounding)


def gate_up(
    x: torch.Tensor,
    w1: torch.Tensor,
    s1: torch.Tensor,
    w3: torch.Tensor,
    s3: torch.Tensor,
    idx: torch.Tensor,
    *,
    interpret: bool = False,
) -> torch.Tensor:
    """x [N, D], int8 w1 w3 [E, F, D] with scales [E, F], idx [N, K] -> h [N*K, F] in x's dtype:
    each pair's ``silu(x w1^T s1) * (x w3^T s3)`` for its expert."""
    n, k = idx.shape
    e, f, d = w1.shape
    ok = x.shape == (n, d) and w3.shape == w1.shape and s1.shape == s3.shape == (e, f)
    _check("int8 MoE gate/up", ok, x, w1, s1, w3, s3, names="x w1 s1 w3 s3")
    p = n * k
    h = torch.empty(p, f, dtype=x.dtype, device=x.device)
    grid = (e, triton.cdiv(f, GATE_UP_TILE))
    _kernel(_gate_up_kernel, interpret)[grid](
        x.contiguous(),
        w1,
        s1,
        w3,
        s3,
        idx.reshape(-1).contiguous(),
        h,
        p,
        d,
        f,
        K=k,
        BLOCK_P=_pairs_tile(p),
        BLOCK_F=GATE_UP_TILE,
        BLOCK_D=REDUCE_TILE,
        DOT=_dot_dtype(x.dtype, interpret),
        PRECISION=_precision(x.dtype),
        enable_fp_fusion=FP_FUSION,
    )
    return h


def down(
    h: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, idx: torch.Tensor, *, interpret: bool = False
) -> torch.Tensor:
    """h [P, F] (one row per pair of idx [N, K]), int8 w2 [E, D, F] with scales [E, D] -> y [P, D]
    float32: each pair's ``h w2^T s2`` for its expert."""
    p, f = h.shape
    e, d, _ = w2.shape
    _check("int8 MoE down", p == idx.numel() and w2.shape[2] == f and s2.shape == (e, d), h, w2, s2, names="h w2 s2")
    y = torch.empty(p, d, dtype=torch.float32, device=h.device)
    grid = (e, triton.cdiv(d, DOWN_TILE))
    _kernel(_down_kernel, interpret)[grid](
        h.contiguous(),
        w2,
        s2,
        idx.reshape(-1).contiguous(),
        y,
        p,
        d,
        f,
        BLOCK_P=_pairs_tile(p),
        BLOCK_D=DOWN_TILE,
        BLOCK_F=REDUCE_TILE,
        DOT=_dot_dtype(h.dtype, interpret),
        PRECISION=_precision(h.dtype),
        enable_fp_fusion=FP_FUSION,
    )
    return y


def linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, interpret: bool = False) -> torch.Tensor:
    """x [M, I] @ (q * scale)^T for int8 q [O, I] and scales [O] -> [M, O] in x's dtype: the matrix
    read once whatever M (``_weight_int8pack_mm`` reads it once per row; the cast fallback writes
    and reads a float copy)."""
    m, i = x.shape
    o = q.shape[0]
    _check("int8 linear", q.shape == (o, i) and scale.shape == (o,), x, q, scale, names="x q scale")
    y = torch.empty(m, o, dtype=x.dtype, device=x.device)
    _kernel(_linear_kernel, interpret)[(triton.cdiv(o, LINEAR_TILE),)](
        x.contiguous(),
        q,
        scale,
        y,
        m,
        o,
        i,
        BLOCK_M=_pairs_tile(m),
        BLOCK_O=LINEAR_TILE,
        BLOCK_I=REDUCE_TILE,
        DOT=_dot_dtype(x.dtype, interpret),
        PRECISION=_precision(x.dtype),
        enable_fp_fusion=FP_FUSION,
    )
    return y


__all__ = ["DOWN_TILE", "GATE_UP_TILE", "LINEAR_TILE", "REDUCE_TILE", "down", "gate_up", "linear"]
