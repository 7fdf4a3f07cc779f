"""The C kernel's entry points (``csrc/``): few-row products and the fused pieces of a decode step.

Decoding multiplies 1-8 rows of activations by each weight matrix, so its speed is the speed at
which the weights stream from memory; PyTorch's CPU kernels for that shape read well below the
bandwidth (docs/performance.md has the measurements). The C loops read each weight once for all
rows, convert bfloat16 or int8 in registers and spread the outputs over PyTorch's threads.

Each entry ``native_X`` has a rule ``use_native_X`` (whether these tensors fit it: CPU, float32 or
bfloat16, a few rows, contiguous weights, no autograd, not compiling) and equals the plain ops it
replaces up to the order of float32 additions, rounding where they round (bit for bit in bfloat16
given the same products); with AVX512-VNNI the int8 product rounds the activations to int16 (one
scale per row, error at most max|x| / 65534 per element). The tests tie each entry to its plain
ops. ``layer.py`` runs a whole decoder layer in one call; ``modules.py`` puts the entries to use.
"""

from __future__ import annotations

import math

import torch

from . import build
from .build import loaded as _loaded

NATIVE_MAX_ROWS = 8  # rows per product the kernel takes (more: PyTorch / oneDNN)
# float32 from 7 rows on: oneDNN's product is as fast (docs/performance.md)
FLOAT32_MAX_ROWS = 6
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's weight types (int8: 2, int4: 3)
_INT8 = 2
_INT4 = 3


def use_native(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w.T`` should run through the kernel: CPU, float32 or bfloat16 (x and w alike), at
    most ``NATIVE_MAX_ROWS`` rows (float32: ``FLOAT32_MAX_ROWS``), a row-major (contiguous) 2-D weight,
    no autograd, not compiling."""
    if x.device.type != "cpu" or w.dim() != 2 or x.dtype != w.dtype or x.dtype not in _DTYPES:
        return False
    limit = FLOAT32_MAX_ROWS if x.dtype == torch.float32 else NATIVE_MAX_ROWS
    if x.shape[-1] != w.shape[1] or x.numel() > limit * x.shape[-1] or x.numel() == 0:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    if torch.compiler.is_compiling() or not w.is_contiguous():
        return False
    return build.available()


def _run(fn: str, x: torch.Tensor, out_features: int, k: int, *before: int | None) -> torch.Tensor:
    """Call the kernel entry ``fn(*before, x, y, M, out_features, k, bf16, threads)`` on the rows of
    x [..., in] (the argument tail every few-row entry shares); returns y [..., out_features]."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(rows.shape[0], out_features, dtype=x.dtype)
    call = getattr(_loaded(), fn)
    rc = call(
        *before,
        rows.data_ptr(),
        y.data_ptr(),
        rows.shape[0],
        out_features,
        k,
        _DTYPES[x.dtype],
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"native kernel {fn} failed for {rows.shape[0]} rows -> {out_features} ({x.dtype})")
    return y.reshape(*x.shape[:-1], out_features)


def _call(w: torch.Tensor, wtype: int, scale: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if not w.is_contiguous():
        raise ValueError(f"native kernel: weight must be row-major (contiguous), got strides {w.stride()}")
    o, i = w.shape
    return _run("few_rows", x, o, i, w.data_ptr(), wtype, None if scale is None else scale.data_ptr())


def native_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias) for x [..., I] with at most ``NATIVE_MAX_ROWS`` rows, w [O, I]."""
    return _call(w, _DTYPES[w.dtype], None, x)


def use_native_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> bool:
    """Whether one SwiGLU expert (w1, w3 [I, D], w2 [D, I]) on x should run as one kernel call: as
    ``use_native`` for each of its three products."""
    return use_native(x, w1) and use_native(x, w3) and w2.is_contiguous() and w2.shape == w1.shape[::-1]


def native_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """``F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)`` in one call (one parallel region
    instead of three products and two elementwise ops), rounding in between as those ops would."""
    i, d = w1.shape
    ptrs = (w1.data_ptr(), w3.data_ptr(), w2.data_ptr())
    return _run("few_rows_swiglu", x, d, i, *ptrs, None, None, None, _DTYPES[w1.dtype])


def use_native_swiglu_int8(x: torch.Tensor, qs: tuple[torch.Tensor, ...], ss: tuple[torch.Tensor, ...]) -> bool:
    """Whether one int8 SwiGLU expert (q1, q3 [I, D], q2 [D, I] with scales [I], [I], [D]) on x
    should run as one kernel call: as ``use_native_int8`` for each of its three products."""
    (q1, q2, q3), (s1, s2, s3) = qs, ss
    if q2.shape != q1.shape[::-1] or q3.shape != q1.shape or s2.dtype != x.dtype or not s2.is_contiguous():
        return False
    return use_native_int8(x, q1, s1) and use_native_int8(x, q3, s3) and q2.is_contiguous()


def native_swiglu_int8(x: torch.Tensor, qs: tuple[torch.Tensor, ...], ss: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The int8 expert ``linear_int8(silu(linear_int8(x, q1, s1)) * linear_int8(x, q3, s3), q2, s2)``
    in one call, rounding in between as those ops would."""
    (q1, q2, q3), (s1, s2, s3) = qs, ss
    i, d = q1.shape
    ptrs = (q1.data_ptr(), q3.data_ptr(), q2.data_ptr(), s1.data_ptr(), s3.data_ptr(), s2.data_ptr())
    return _run("few_rows_swiglu", x, d, i, *ptrs, _INT8)


def use_native_rmsnorm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether RMSNorm of x [..., D] with weight w [D] should run through the kernel: CPU, float32 or
    bfloat16 (x and w alike), at most ``NATIVE_MAX_ROWS`` rows in float32 (more: PyTorch's one fused
    op), any number in bfloat16 (PyTorch: six passes), no autograd, not compiling."""
    if x.device.type != "cpu" or x.dtype != w.dtype or x.dtype not in _DTYPES or w.shape != x.shape[-1:]:
        return False
    many = x.numel() > NATIVE_MAX_ROWS * x.shape[-1]
    if (many and x.dtype == torch.float32) or x.numel() == 0 or not w.is_contiguous():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    return not torch.compiler.is_compiling() and build.available()


def native_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``model.RMSNorm`` for a few rows in one call (instead of the cast, norm, cast, scale ops)."""
    lib = _loaded()
    rows = x.contiguous()
    y = torch.empty_like(rows)
    d = x.shape[-1]
    m = rows.numel() // d
    if m > NATIVE_MAX_ROWS:  # prefill: the rows over the threads
        lib.many_rows_rmsnorm(
            rows.data_ptr(), w.data_ptr(), y.data_ptr(), m, d, eps, _DTYPES[x.dtype], torch.get_num_threads()
        )
    else:
        lib.few_rows_rmsnorm(rows.data_ptr(), w.data_ptr(), y.data_ptr(), m, d, eps, _DTYPES[x.dtype])
    return y


def int4_weights_ok(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, in_features: int) -> bool:
    """int4 weights as the kernel reads them (``model/quant4.py``'s format): codes uint8 [..., O, I/2],
    float16 scale and offset [..., O, I / G], all contiguous, groups of a multiple of 32 inputs."""
    if packed.dtype != torch.uint8 or packed.shape[-1] * 2 != in_features or not packed.is_contiguous():
        return False
    if scale.dtype != torch.float16 or offset.dtype != torch.float16 or scale.shape != offset.shape:
        return False
    if scale.shape[:-1] != packed.shape[:-1] or not (scale.is_contiguous() and offset.is_contiguous()):
        return False
    g = scale.shape[-1]
    return g > 0 and in_features % g == 0 and (in_features // g) % 32 == 0


def int4_group_size(packed: torch.Tensor, scale: torch.Tensor) -> int:
    """The inputs per group of int4 weights (codes [..., I/2], scales [..., I / G])."""
    return packed.shape[-1] * 2 // scale.shape[-1]


def _int4_experts_ok(
    d: int, ws: tuple[torch.Tensor, ...], ss: tuple[torch.Tensor, ...], bs: tuple[torch.Tensor, ...]
) -> bool:
    """Stacked int4 experts: codes w1, w3 [E, I, D/2], w2 [E, D, I/2], one group size."""
    w1, w2, w3 = ws
    if w1.dim() != 3 or len(ss) != 3 or len(bs) != 3:
        return False
    e, i, half = w1.shape
    if half * 2 != d or w3.shape != w1.shape or w2.shape != (e, d, i // 2) or i % 2:
        return False
    if not all(int4_weights_ok(w, s, b, n) for w, s, b, n in zip(ws, ss, bs, (d, i, d), strict=True)):
        return False
    return len({int4_group_size(w, s) for w, s in zip(ws, ss, strict=True)}) == 1


def experts_weights_ok(
    dtype: torch.dtype,
    d: int,
    ws: tuple[torch.Tensor, ...],
    ss: tuple[torch.Tensor, ...] | None,
    bs: tuple[torch.Tensor, ...] | None = None,
) -> bool:
    """The weights' share of ``use_native_experts``: stacked w1, w3 [E, I, D], w2 [E, D, I] as ``ws`` =
    (w1, w2, w3), contiguous, of ``dtype`` (the activations'), or int8 with scales ``ss`` of ``dtype``,
    or int4 codes with float16 scales ``ss`` and offsets ``bs`` (``int4_weights_ok``)."""
    if bs is not None:
        return ss is not None and _int4_experts_ok(d, ws, ss, bs)
    w1, w2, w3 = ws
    if w1.dim() != 3:
        return False
    e, i, dw = w1.shape
    if dw != d or w3.shape != w1.shape or w2.shape != (e, d, i) or not all(w.is_contiguous() for w in ws):
        return False
    if ss is None:
        return all(w.dtype == dtype for w in ws)
    return all(w.dtype == torch.int8 for w in ws) and all(s.dtype == dtype and s.is_contiguous() for s in ss)


def use_native_experts(
    x: torch.Tensor, ws: tuple[torch.Tensor, ...], ss: tuple[torch.Tensor, ...] | None, idx: torch.Tensor | None
) -> bool:
    """Whether the chosen experts of x [N, D] (stacked w1, w3 [E, I, D], w2 [E, D, I] as ``ws`` =
    (w1, w2, w3); int8 with scales ``ss`` [E, I], [E, D], [E, I]) should run as one kernel call: CPU,
    float32 or bfloat16 activations, at most ``NATIVE_MAX_ROWS`` tokens, contiguous weights, no
    autograd, not compiling."""
    if x.device.type != "cpu" or x.dim() != 2 or x.dtype not in _DTYPES or not 0 < x.shape[0] <= NATIVE_MAX_ROWS:
        return False
    if idx is not None and (idx.dim() != 2 or idx.shape[0] != x.shape[0]):
        return False
    if not experts_weights_ok(x.dtype, x.shape[1], ws, ss):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in ws)):
        return False
    return not torch.compiler.is_compiling() and build.available()


def native_experts(
    x: torch.Tensor,
    ws: tuple[torch.Tensor, ...],
    ss: tuple[torch.Tensor, ...] | None,
    idx: torch.Tensor,
    weights: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_k weights[n, k] * expert_{idx[n, k]}(x[n])`` in one call (``moe.experts_per_token``'s
    result, rounded as its ops round): rows that chose the same expert share one pass over its
    weights. ``ss``: int8 scales, or None for float weights; ``residual`` [N, D] (x's dtype) is
    added to the result as PyTorch's add would."""
    w1, w2, w3 = ws
    e, i, _ = w1.shape
    wtype = _INT8 if ss is not None else _DTYPES[w1.dtype]
    scales = (None, None, None) if ss is None else (ss[0].data_ptr(), ss[2].data_ptr(), ss[1].data_ptr())
    ids = idx.to(torch.int64).contiguous()
    rw = weights.to(torch.float32).contiguous()
    res = None if residual is None else residual.contiguous()  # held while the kernel reads it
    before = (
        w1.data_ptr(),
        w3.data_ptr(),
        w2.data_ptr(),
        *scales,
        None,
        None,
        None,
        wtype,
        0,
        e,
        ids.data_ptr(),
        rw.data_ptr(),
        idx.shape[1],
        None if res is None else res.data_ptr(),
    )
    return _run("few_rows_experts", x, x.shape[1], i, *before)


Projection = tuple[torch.Tensor, torch.Tensor | None]  # a weight [O, I] and its int8 scales [O] (or None)


def _int4_projections_ok(
    d: int, projections: tuple[Projection, ...], offsets: tuple[torch.Tensor, ...], head_dim: int
) -> bool:
    """``projections_ok`` for int4 codes with float16 scales and ``offsets``, one group size."""
    if len(offsets) != len(projections) or head_dim % 2:
        return False
    (wq, _), (wk, _), (wv, _) = projections[:3]
    ins = (d, d, d, wq.shape[0])[: len(projections)]
    for (w, s), b, n in zip(projections, offsets, ins, strict=True):
        if w.dim() != 2 or s is None or not int4_weights_ok(w, s, b, n):
            return False
    if any(w.shape[0] % head_dim for w, _ in projections[:3]) or wk.shape != wv.shape:
        return False
    if len(projections) == 4 and projections[3][0].shape[0] != d:
        return False
    return len({int4_group_size(w, s) for w, s in projections}) == 1


def projections_ok(
    dtype: torch.dtype,
    d: int,
    projections: tuple[Projection, ...],
    head_dim: int,
    offsets: tuple[torch.Tensor, ...] | None = None,
) -> bool:
    """The weights' share of ``use_native_qkv``: wq, wk, wv [O, D] (and wo [D, Oq], given four)
    contiguous, of one type (``dtype``, the activations', or int8 with scales [O] of ``dtype``, or
    int4 codes with float16 scales and ``offsets``), outputs a multiple of an even ``head_dim``, k and
    v alike."""
    if offsets is not None:
        return _int4_projections_ok(d, projections, offsets, head_dim)
    (wq, sq), (wk, _), (wv, _) = projections[:3]
    int8 = wq.dtype == torch.int8
    for w, s in projections[:3]:
        if w.dim() != 2 or w.shape[1] != d or w.shape[0] % head_dim or not w.is_contiguous():
            return False
        if w.dtype != (torch.int8 if int8 else dtype) or (s is None) == int8:
            return False
        if s is not None and (s.dtype != dtype or s.shape != w.shape[:1] or not s.is_contiguous()):
            return False
    if wk.shape != wv.shape or head_dim % 2:
        return False
    if len(projections) == 4:
        wo, so = projections[3]
        if wo.dtype != wq.dtype or (so is None) != (sq is None) or wo.shape != wq.shape[::-1] or not wo.is_contiguous():
            return False
        if so is not None and (so.dtype != dtype or not so.is_contiguous()):
            return False
    return True


def use_native_qkv(x: torch.Tensor, projections: tuple[Projection, ...], cos: torch.Tensor, head_dim: int) -> bool:
    """Whether the q, k, v projections of x [B, T, D] and the rotary embedding (cos, sin
    [B, 1, T, hd]) should run as one kernel call: CPU, float32 or bfloat16, at most
    ``NATIVE_MAX_ROWS`` rows, the weights as ``projections_ok`` (wo too, given four), no autograd,
    not compiling."""
    if x.device.type != "cpu" or x.dim() != 3 or x.dtype not in _DTYPES or x.shape[0] * x.shape[1] > NATIVE_MAX_ROWS:
        return False
    if cos.dtype != x.dtype or cos.shape != (x.shape[0], 1, x.shape[1], head_dim) or not cos.is_contiguous():
        return False
    if not projections_ok(x.dtype, x.shape[2], projections, head_dim):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w, _ in projections)):
        return False
    return not torch.compiler.is_compiling() and build.available()


def native_qkv(
    x: torch.Tensor, projections: tuple[Projection, ...], cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v = x @ wq.T, x @ wk.T, x @ wv.T (int8: times the scales), then ``apply_rotary`` to q and k,
    in one call, rounding as those ops round. Returns [B, T, O] each."""
    (wq, sq), (wk, sk), (wv, sv) = projections
    b, t, d = x.shape
    rows = x.contiguous()
    oq, okv = wq.shape[0], wk.shape[0]
    q = torch.empty(b, t, oq, dtype=x.dtype)
    k, v = torch.empty(b, t, okv, dtype=x.dtype), torch.empty(b, t, okv, dtype=x.dtype)
    int8 = sq is not None
    scales = (sq.data_ptr(), sk.data_ptr(), sv.data_ptr()) if int8 else (None, None, None)
    sin = sin.contiguous()  # held while the kernel reads it
    rc = _loaded().few_rows_qkv(
        wq.data_ptr(), wk.data_ptr(), wv.data_ptr(), *scales, _INT8 if int8 else _DTYPES[wq.dtype],
        cos.data_ptr(), sin.data_ptr(), head_dim, q.data_ptr(), k.data_ptr(), v.data_ptr(),
        rows.data_ptr(), b * t, oq, okv, d, _DTYPES[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"native kernel few_rows_qkv failed for {b * t} rows -> {oq}, {okv} ({x.dtype})")
    return q, k, v


def use_native_norm_gate(x: torch.Tensor, norm_w: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether RMSNorm of x and the router's product should run as one call: the rules of
    ``use_native_rmsnorm`` and ``use_native`` (gate [E, D] of x's dtype)."""
    return use_native_rmsnorm(x, norm_w) and use_native(x, gate)


def native_norm_gate(
    x: torch.Tensor, norm_w: torch.Tensor, eps: float, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x) * norm_w, that @ gate.T) for x [..., D]: ``native_rmsnorm`` then ``native_linear``."""
    rows = x.contiguous()
    n = torch.empty_like(rows)
    logits = torch.empty(*x.shape[:-1], gate.shape[0], dtype=x.dtype)
    d = x.shape[-1]
    rc = _loaded().few_rows_norm_gate(
        rows.data_ptr(), norm_w.data_ptr(), eps, gate.data_ptr(), n.data_ptr(), logits.data_ptr(),
        rows.numel() // d, d, gate.shape[0], _DTYPES[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"native kernel few_rows_norm_gate failed for x {tuple(x.shape)}")
    return n, logits


def use_native_attention_block(
    x: torch.Tensor,
    norm_w: torch.Tensor,
    projections: tuple[Projection, ...],
    cos: torch.Tensor,
    head_dim: int,
    caches: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    offsets: tuple[torch.Tensor, ...] | None = None,
) -> bool:
    """Whether a decoder layer's attention half (norm, q/k/v with rotary, cache write, attention,
    output projection, residual) should run as one call: the rules of ``use_native_qkv`` for wq, wk,
    wv and wo alike (int4 with ``offsets``), a contiguous cache [B, KV, S, hd] of x's dtype and an
    additive mask of x's dtype."""
    if mask is None or not use_native_rmsnorm(x, norm_w):
        return False
    if offsets is None and not use_native_qkv(x, projections, cos, head_dim):
        return False
    if offsets is not None and not _int4_qkv_ok(x, projections, offsets, cos, head_dim):
        return False
    wq, wk = projections[0][0], projections[1][0]
    b, t, _ = x.shape
    kc, vc = caches
    shape = (b, wk.shape[0] // head_dim, kc.shape[2], head_dim) if kc.dim() == 4 else None
    if kc.shape != shape or vc.shape != shape or kc.dtype != x.dtype or vc.dtype != x.dtype:
        return False
    if wq.shape[0] // head_dim % shape[1] or not (kc.is_contiguous() and vc.is_contiguous()):
        return False
    return mask.dtype == x.dtype and mask.shape == (b, 1, t, kc.shape[2]) and mask.is_contiguous()


def _int4_qkv_ok(
    x: torch.Tensor,
    projections: tuple[Projection, ...],
    offsets: tuple[torch.Tensor, ...],
    cos: torch.Tensor,
    head_dim: int,
) -> bool:
    """``use_native_qkv`` for int4 projections."""
    if x.device.type != "cpu" or x.dim() != 3 or x.dtype not in _DTYPES or x.shape[0] * x.shape[1] > NATIVE_MAX_ROWS:
        return False
    if cos.dtype != x.dtype or cos.shape != (x.shape[0], 1, x.shape[1], head_dim) or not cos.is_contiguous():
        return False
    if not _int4_projections_ok(x.shape[2], projections, offsets, head_dim):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return not torch.compiler.is_compiling() and build.available()


def native_attention_block(
    x: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    projections: tuple[Projection, ...],
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int,
    caches: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    mask: torch.Tensor,
    offsets: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """``x + wo(attention(...))`` of one decoder layer for a few rows of x [B, T, D], writing the new
    keys and values into ``caches`` at ``slots`` [T]; each step rounds as the plain ops round. int4
    projections: codes with float16 scales and ``offsets``."""
    b, t, d = x.shape
    rows = x.contiguous()
    kc, vc = caches
    (wq, sq), (wk, sk), (wv, sv), (wo, so) = projections
    scaled = sq is not None
    scales = (sq.data_ptr(), sk.data_ptr(), sv.data_ptr(), so.data_ptr()) if scaled else (None,) * 4
    if offsets is not None:
        wtype, group, bs = _INT4, int4_group_size(wq, sq), tuple(o.data_ptr() for o in offsets)
    else:
        wtype, group, bs = _INT8 if scaled else _DTYPES[wq.dtype], 0, (None,) * 4
    ids = slots.to(torch.int64).contiguous()
    sin = sin.contiguous()  # held while the kernel reads it
    h = torch.empty_like(rows)
    rc = _loaded().few_rows_attention_block(
        rows.data_ptr(), norm_w.data_ptr(), eps, wq.data_ptr(), wk.data_ptr(), wv.data_ptr(), wo.data_ptr(),
        *scales, *bs, wtype, group, cos.data_ptr(), sin.data_ptr(),
        kc.data_ptr(), vc.data_ptr(), ids.data_ptr(), mask.data_ptr(), h.data_ptr(),
        b, t, d, wq.shape[0] // head_dim, kc.shape[1], head_dim, kc.shape[2], _DTYPES[x.dtype],
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(
            f"native kernel few_rows_attention_block failed for x {tuple(x.shape)}, slots {slots.tolist()}"
        )
    return h


def use_native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether decode attention (q [B, H, T, hd] against a cache k, v [B, KV, S, hd] with an additive
    mask [B, 1, T, S] of q's dtype) should run through the kernel: CPU, float32 or bfloat16, at most
    ``NATIVE_MAX_ROWS`` queries per row, contiguous cache and mask, no autograd, not compiling."""
    if mask is None or q.device.type != "cpu" or q.dtype not in _DTYPES or q.dim() != 4:
        return False
    b, h, t, hd = q.shape
    if k.dtype != q.dtype or v.dtype != q.dtype or mask.dtype != q.dtype or t > NATIVE_MAX_ROWS:
        return False
    if k.dim() != 4 or k.shape[0] != b or k.shape[3] != hd or v.shape != k.shape or h % k.shape[1] != 0:
        return False
    if mask.shape != (b, 1, t, k.shape[2]) or not (k.is_contiguous() and v.is_contiguous() and mask.is_contiguous()):
        return False
    if q.stride(-1) != 1 or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return False
    return not torch.compiler.is_compiling() and build.available()


def native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)`` computed in float32
    (as on float32 copies of bfloat16 inputs), one rounding at the end. Returns [B, H, T, hd] as a
    view of a [B, T, H, hd] tensor (what the output projection reads)."""
    b, h, t, hd = q.shape
    kv, s = k.shape[1], k.shape[2]
    y = torch.empty(b, t, h, hd, dtype=q.dtype)
    threads = torch.get_num_threads()
    rc = _loaded().few_rows_attention(
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.data_ptr(),
        v.data_ptr(),
        mask.data_ptr(),
        y.data_ptr(),
        b,
        h,
        kv,
        t,
        s,
        hd,
        1.0 / math.sqrt(hd),
        _DTYPES[q.dtype],
        threads,
    )
    if rc != 0:
        raise RuntimeError(f"native kernel few_rows_attention failed for q {tuple(q.shape)}, k {tuple(k.shape)}")
    return y.transpose(1, 2)


def use_native_mask(
    slots: torch.Tensor, positions: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor, dtype: torch.dtype
) -> bool:
    """Whether the additive decoding mask (``native_mask``) should be built by the kernel: CPU, slots
    [T] and positions [B, T] and the cache's positions [B, S] int64, its flags [B, S] bool, all
    contiguous, float32 or bfloat16, not compiling."""
    ts = (slots, positions, k_pos, k_valid)
    if dtype not in _DTYPES or any(t.device.type != "cpu" or not t.is_contiguous() for t in ts):
        return False
    if slots.dtype != torch.int64 or positions.dtype != torch.int64 or k_pos.dtype != torch.int64:
        return False
    if k_valid.dtype != torch.bool or slots.dim() != 1 or positions.shape != (k_pos.shape[0], slots.shape[0]):
        return False
    return k_valid.shape == k_pos.shape and not torch.compiler.is_compiling() and build.available()


def native_mask(
    slots: torch.Tensor,
    positions: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor,
    window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``model.build_mask(slots, positions, arange(S), k_pos, k_valid, window)`` as an additive mask
    [B, 1, T, S] of ``dtype`` (0 or -inf), in one call instead of a dozen small ops per step."""
    (b, s), t = k_pos.shape, slots.shape[0]
    mask = torch.empty(b, 1, t, s, dtype=dtype)
    _loaded().few_rows_mask(
        slots.data_ptr(), positions.data_ptr(), k_pos.data_ptr(), k_valid.data_ptr(), b, t, s,
        window is not None, window or 0, mask.data_ptr(), _DTYPES[dtype],
    )  # fmt: skip
    return mask


PREFILL_SCRATCH_MAX = 1 << 29  # bytes of float32 keys (and values) many_rows_attention may copy


def use_native_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> bool:
    """Whether attention of many query rows (prefill: q [B, H, T, hd], T > ``NATIVE_MAX_ROWS``) against
    k, v [B, KV, S, hd] should run through the kernel: CPU, float32 or bfloat16 alike, hd a multiple
    of 16, an additive mask [B, 1, T, S] of q's dtype or causal attention
    with T == S, at most ``PREFILL_SCRATCH_MAX`` bytes of float32 copies, no autograd, not compiling."""
    if q.device.type != "cpu" or q.dtype not in _DTYPES or q.dim() != 4 or k.dim() != 4:
        return False
    b, h, t, hd = q.shape
    if k.dtype != q.dtype or v.dtype != q.dtype or t <= NATIVE_MAX_ROWS or hd % 16 or q.stride(-1) != 1:
        return False
    if k.shape[0] != b or k.shape[3] != hd or v.shape != k.shape or h % k.shape[1] != 0:
        return False
    if mask is None:
        if not is_causal or k.shape[2] != t:
            return False
    elif is_causal or mask.dtype != q.dtype or mask.shape != (b, 1, t, k.shape[2]) or not mask.is_contiguous():
        return False
    if k.numel() * 4 * (2 if q.dtype == torch.bfloat16 else 1) > PREFILL_SCRATCH_MAX:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return not torch.compiler.is_compiling() and build.available()


def native_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)`` (``mask`` None:
    ``is_causal=True``) in float32 as on float32 copies, one rounding at the end, for many query rows:
    blocked into small register tiles (``csrc/attention.c``). Returns [B, H, T, hd] as a view of a
    [B, T, H, hd] tensor."""
    b, h, t, hd = q.shape
    kv, s = k.shape[1], k.shape[2]
    k, v = k.contiguous(), v.contiguous()  # a cache is; keys straight from the projections are views
    y = torch.empty(b, t, h, hd, dtype=q.dtype)
    rc = _loaded().many_rows_attention(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr(), v.data_ptr(),
        None if mask is None else mask.data_ptr(), y.data_ptr(), b, h, kv, t, s, hd, 1.0 / math.sqrt(hd),
        _DTYPES[q.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"native kernel many_rows_attention failed for q {tuple(q.shape)}, k {tuple(k.shape)}")
    return y.transpose(1, 2)


def use_native_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether ``(x @ q.T) * scale`` (int8 weights, one scale per output) should run through the
    kernel: as ``use_native``, with x and scale of one dtype and a row-major int8 q."""
    if x.device.type != "cpu" or q.dtype != torch.int8 or q.dim() != 2 or not q.is_contiguous():
        return False
    if x.dtype not in _DTYPES or scale.dtype != x.dtype or scale.shape != (q.shape[0],) or not scale.is_contiguous():
        return False
    if x.shape[-1] != q.shape[1] or x.numel() > NATIVE_MAX_ROWS * x.shape[-1] or x.numel() == 0:
        return False
    if (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
        return False
    return build.available()


def native_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, q * scale[:, None])`` for x [..., I] with at most ``NATIVE_MAX_ROWS`` rows, q int8
    [O, I] row-major, scale [O] in x's dtype; float32 sums, one rounding at the end."""
    return _call(q, _INT8, scale.contiguous(), x)


__all__ = [
    "FLOAT32_MAX_ROWS",
    "NATIVE_MAX_ROWS",
    "experts_weights_ok",
    "int4_group_size",
    "int4_weights_ok",
    "native_attention",
    "native_attention_block",
    "native_experts",
    "native_int8",
    "native_linear",
    "native_mask",
    "native_norm_gate",
    "native_prefill_attention",
    "native_qkv",
    "native_rmsnorm",
    "native_swiglu",
    "native_swiglu_int8",
    "projections_ok",
    "use_native",
    "use_native_attention",
    "use_native_attention_block",
    "use_native_experts",
    "use_native_int8",
    "use_native_mask",
    "use_native_norm_gate",
    "use_native_prefill_attention",
    "use_native_qkv",
    "use_native_rmsnorm",
    "use_native_swiglu",
    "use_native_swiglu_int8",
]
