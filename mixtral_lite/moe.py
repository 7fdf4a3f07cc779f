"""Expert dispatch: run SwiGLU experts on the tokens the router chose for them.

All functions take stacked expert weights and a routing decision and return the weighted sum of
the chosen experts' outputs:

    out[n] = sum_k weights[n, k] * w2[e] @ (silu(w1[e] @ x[n]) * (w3[e] @ x[n])),  e = idx[n, k]

Axis legend: N tokens, K experts per token, E experts, D hidden, I expert intermediate size.
Weights: w1, w3 [E, I, D]; w2 [E, D, I]. Routing: idx [N, K] (long), weights [N, K] (float32).

``experts_reference`` is the plain per-expert loop that every faster path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .gemv import experts_pair, split_linear, split_parts
from .native import native_experts, native_linear, native_swiglu, use_native, use_native_experts, use_native_swiglu
from .onednn import onednn_linear, use_onednn

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _native_cpu_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (oneDNN on AVX-512 BF16 / AMX / FP16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


# Reduced-precision dtypes whose CPU matrix products of several rows should run in float32: without
# native units (e.g. AVX2 only) a bfloat16 product costs about one matrix-vector product per row,
# while converting the weight to float32 costs about as much as 2-3 rows (measured, 2 AVX2 cores,
# 1792x512 weights: 8 rows 1.32 ms in bfloat16 vs 0.64 ms converted; 4 rows 0.53 vs 0.52 ms; 1 row
# 0.16 vs 0.38 ms). Batched decoding (8 rows) thus converts; one row keeps the bfloat16 kernel.
UPCAST_ON_CPU = tuple(d for d in (torch.bfloat16, torch.float16) if not _native_cpu_matmul(d))
UPCAST_MIN_ROWS = 4


# Compiled CPU decoding runs batches up to this many tokens expert by expert per token (K slices
# each: no copy, no wasted products); larger batches run every expert on every token.
COMPILED_PER_TOKEN_MAX = 16


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)``, faster on the CPU: a few rows through the compiled kernel (``native.py``),
    many float32 rows through oneDNN (``onednn.py``), few through one weight block per thread
    (``gemv.py``, when the kernel cannot be built); on a CPU without native bfloat16/float16
    products, x with ``UPCAST_MIN_ROWS`` rows or more multiplies in float32 (fp32 accumulation
    either way)."""
    if x.device.type == "cpu":
        if use_native(x, w):  # decoding: a few rows at memory speed (native.py)
            return native_linear(x, w)
        if x.dtype in UPCAST_ON_CPU and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]:
            return F.linear(x.float(), w.float()).to(x.dtype)
        if use_onednn(x, w):  # many float32 rows: oneDNN's product (onednn.py)
            return onednn_linear(x, w)
        parts = split_parts(x, w)
        if parts > 1:  # few float32 rows: one block of the weight per thread (gemv.py)
            return split_linear(x, w, parts)
    return F.linear(x, w)


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _swiglu_fast(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    if use_native_swiglu(x, w1, w2, w3):  # decoding: the whole expert in one kernel call (native.py)
        return native_swiglu(x, w1, w2, w3)
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


def experts_reference(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The plain loop: for each expert, find its (token, slot) pairs and run it on them."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.where(idx == e)
        if token.numel() == 0:
            continue
        y = _swiglu(x[token], w1[e], w2[e], w3[e]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


def experts_sorted(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    *,
    grouped_mm: bool | None = None,
) -> torch.Tensor:
    """Sort the N*K (token, expert) pairs by expert and run each expert once on its rows.

    With ``torch._grouped_mm`` (default for bfloat16 off the CPU, where the weights allow it) the
    segments run in one call per projection and nothing waits on the host; otherwise a loop over
    the non-empty segments (on the CPU as fast as grouped_mm, and bfloat16 segments can run in
    float32 there).
    """
    n, k = idx.shape
    n_experts = w1.shape[0]
    flat = idx.reshape(-1)  # [N*K]
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    token = order // k  # [N*K] source token of each sorted pair
    xs = x[token]  # [N*K, D]
    ws = weights.reshape(-1)[order]  # [N*K]
    # [E] tokens per expert; a static shape (bincount's depends on the data: a host sync)
    counts = torch.zeros(n_experts, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    if grouped_mm is None:
        grouped_mm = x.device.type != "cpu" and x.dtype == torch.bfloat16 and _grouped_mm_ok(x, w1, w2)
    if grouped_mm:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)) * torch._grouped_mm(
            xs, w3.transpose(1, 2), offs=offs
        )
        ys = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [N*K, D]
    else:
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                ys[start : start + c] = _swiglu_fast(xs[start : start + c], w1[e], w2[e], w3[e])
            start += c
    out = torch.zeros_like(x)
    out.index_add_(0, token, (ys * ws[:, None]).to(x.dtype))
    return out


def experts_gather(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Few tokens (decode): index the K chosen experts' weights per token, no host sync.

    Reads only the chosen experts; under ``torch.compile`` the gather fuses into the products.
    """
    x1 = torch.einsum("nd,nkid->nki", x, w1[idx])  # [N, K, I]
    x3 = torch.einsum("nd,nkid->nki", x, w3[idx])
    y = torch.einsum("nki,nkdi->nkd", F.silu(x1) * x3, w2[idx])  # [N, K, D]
    return torch.einsum("nkd,nk->nd", y.float(), weights).to(x.dtype)


def experts_dense_topk(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Every expert on every token, weighted by its routing weight (0 where not chosen).

    Static shapes, no sort, no host sync: for compiled decoding of batches that reach most experts
    anyway. Each expert's weights are read once; the E/K-fold extra FLOPs are cheap at a few rows.
    """
    dense = torch.zeros(x.shape[0], w1.shape[0], dtype=weights.dtype, device=x.device).scatter(1, idx, weights)
    h = F.silu(torch.einsum("nd,eid->eni", x, w1)) * torch.einsum("nd,eid->eni", x, w3)  # [E, N, I]
    y = torch.einsum("eni,edi->end", h, w2)  # [E, N, D]
    return torch.einsum("end,ne->nd", y.float(), dense).to(x.dtype)


def experts_per_token(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Few tokens on the CPU: loop over the chosen experts with views of their weights (no copy).

    Under ``torch.compile`` the expert ids are read with ``.item()`` (traced as unbacked integers
    with ``capture_scalar_outputs``, see ``generate.compile_decode_step``), so the views stay views.
    """
    if use_native_experts(x, (w1, w2, w3), None, idx):  # decoding: every chosen expert in one call
        return native_experts(x, (w1, w2, w3), None, idx, weights)
    pairs = idx.shape[1] == 2 and split_parts(x, w1[0]) > 1 and not use_native(x, w1[0])
    if pairs:  # ascending expert ids (the sum of two products is the same either way round)
        idx, order = idx.sort(-1)
        weights = weights.gather(-1, order)
    if torch.compiler.is_compiling():
        chosen = [[expert_id(idx[n, k], w1.shape[0]) for k in range(idx.shape[1])] for n in range(idx.shape[0])]
        scales = [[weights[n, k] for k in range(idx.shape[1])] for n in range(idx.shape[0])]
    else:
        chosen, scales = idx.tolist(), weights.tolist()
    rows = []
    for n, (experts, ws) in enumerate(zip(chosen, scales, strict=True)):
        xn = x[n : n + 1]
        if pairs:  # top-2 in float32 on several threads: both experts in one product per matrix
            rows.append(experts_pair(xn, w1, w2, w3, experts, ws))
            continue
        acc = None
        for e, w in zip(experts, ws, strict=True):  # w: the float32 weight as a Python float (same product)
            y = _swiglu_fast(xn, w1[e], w2[e], w3[e]) * w
            acc = y if acc is None else acc + y
        rows.append(acc)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def expert_id(i: torch.Tensor, n_experts: int) -> int:
    """An expert index as a Python int (under compile: an unbacked integer known to be in range)."""
    e = i.item()
    torch._check(e >= 0)
    torch._check(e < n_experts)
    return e


def _grouped_mm_ok(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    """``_grouped_mm`` needs 16-byte aligned strides and a floating dtype it supports."""
    if not HAS_GROUPED_MM or x.dtype not in (torch.bfloat16, torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in ws)):
        return False  # training goes through the loop, whose autograd is plain
    return all(w.shape[-1] * w.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16 == 0 for w in ws)


def dispatch_experts(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    impl: str | Callable[..., torch.Tensor] = "auto",
) -> torch.Tensor:
    """Pick the dispatch: ``reference``, ``sorted``, ``gather``, ``per_token``, ``dense`` or ``auto``.

    ``auto``: on a GPU with ``_grouped_mm`` for the dtype, every batch sorts and groups: one
    product per projection reads only the chosen experts and never waits on the host (CUDA
    graphs). Otherwise a few tokens loop over the chosen experts' weights (CPU; compiled: up to
    ``COMPILED_PER_TOKEN_MAX`` tokens) or gather them (GPU); many tokens sort and group, or under
    compile run every expert (``dense``: static shapes). A callable with this function's signature replaces the choice
    (expert parallelism runs only a rank's own experts).
    """
    if callable(impl):
        return impl(x, w1, w2, w3, idx, weights)
    if impl == "auto":
        few = idx.numel() <= w1.shape[0]
        compiling, cpu = torch.compiler.is_compiling(), x.device.type == "cpu"
        if not cpu and x.dtype == torch.bfloat16 and _grouped_mm_ok(x, w1, w2):
            impl = "sorted"
        elif few or (cpu and compiling and x.shape[0] <= COMPILED_PER_TOKEN_MAX):
            impl = "per_token" if cpu else "gather"
        else:
            impl = "dense" if compiling else "sorted"
    if impl == "sorted":
        return experts_sorted(x, w1, w2, w3, idx, weights)
    if impl == "gather":
        return experts_gather(x, w1, w2, w3, idx, weights)
    if impl == "per_token":
        return experts_per_token(x, w1, w2, w3, idx, weights)
    if impl == "dense":
        return experts_dense_topk(x, w1, w2, w3, idx, weights)
    if impl == "reference":
        return experts_reference(x, w1, w2, w3, idx, weights)
    raise ValueError(f"moe dispatch: expected auto, sorted, gather, per_token, dense or reference, got {impl!r}")


def route_topk(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router: softmax over all experts in float32, top-k, renormalise to sum 1.

    Returns (idx [N, K] long, weights [N, K] float32).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, idx = torch.topk(probs, k, dim=-1)
    return idx, weights / weights.sum(dim=-1, keepdim=True)
