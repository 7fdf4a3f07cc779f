"""Expert dispatch: run SwiGLU experts on the tokens the router chose for them.

Every dispatch returns the weighted sum of the chosen experts' outputs:

    out[n] = sum_k weights[n, k] * expert_e(x[n]),  e = idx[n, k]
    expert_e(x) = w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))

Axis legend: N tokens, K experts per token, E experts, D hidden, I expert intermediate size.
Weights: w1, w3 [E, I, D]; w2 [E, D, I]. Routing: idx [N, K] (long), weights [N, K] (float32).

A dispatch reads the experts through an ``Experts`` object: ``expert(x, e)`` runs one expert on a
few rows (the per-expert product: float, int8, or an accelerated kernel supplies its own) and
``stacks()`` gives the three float stacks for the dispatches that multiply whole stacks at once
(``gather``, ``dense``, ``torch._grouped_mm``). ``experts_reference`` is the plain per-expert loop
that every faster path is tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")

# Compiled CPU decoding runs batches up to this many tokens expert by expert per token (K slices
# each: no copy, no wasted products); larger batches run every expert on every token.
COMPILED_PER_TOKEN_MAX = 16

DISPATCHES = ("auto", "sorted", "gather", "per_token", "dense", "each", "reference")

# Off the CPU, experts whose ``stacks()`` are copies (int8) run ``each`` up to this many tokens
# (decoding: reading every expert once beats writing float copies of the chosen ones); prefill
# dequantises the stacks once per layer and runs ``dense``.
EACH_MAX_TOKENS = 64


class Experts(Protocol):
    """What a dispatch reads: the number of experts, one expert's product, the float stacks."""

    n_experts: int

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor: ...

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert (w1, w3 [I, D]; w2 [D, I]) on rows x [M, D]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def experts_reference(x: torch.Tensor, experts: Experts, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The plain loop: for each expert, find its (token, slot) pairs and run it on them."""
    out = torch.zeros_like(x)
    for e in range(experts.n_experts):
        token, slot = torch.where(idx == e)
        if token.numel() == 0:
            continue
        y = experts.expert(x[token], e) * weights[token, slot, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


def experts_sorted(
    x: torch.Tensor, experts: Experts, idx: torch.Tensor, weights: torch.Tensor, *, grouped_mm: bool | None = None
) -> torch.Tensor:
    """Sort the N*K (token, expert) pairs by expert and run each expert once on its rows.

    With ``torch._grouped_mm`` (default for bfloat16 where the GPU has its kernel, see ``grouped_mm_in_hardware``) the
    segments run in one call per projection and nothing waits on the host; otherwise a loop over
    the non-empty segments.
    """
    k = idx.shape[1]
    flat = idx.reshape(-1)  # [N*K]
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    token = order // k  # [N*K] source token of each sorted pair
    xs = x[token]  # [N*K, D]
    ws = weights.reshape(-1)[order]  # [N*K]
    # [E] tokens per expert; a static shape (bincount's depends on the data: a host sync)
    counts = torch.zeros(experts.n_experts, dtype=torch.long, device=x.device).index_add_(
        0, flat, torch.ones_like(flat)
    )
    if grouped_mm is None:  # the stacks only where they are used: int8's are dequantised copies
        grouped_mm = x.dtype == torch.bfloat16 and grouped_mm_in_hardware(x.device)
        grouped_mm = grouped_mm and grouped_mm_ok(x, *experts.stacks())
    if grouped_mm:
        w1, w2, w3 = experts.stacks()
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
                ys[start : start + c] = experts.expert(xs[start : start + c], e)
            start += c
    out = torch.zeros_like(x)
    out.index_add_(0, token, (ys * ws[:, None]).to(x.dtype))
    return out


def experts_gather(x: torch.Tensor, experts: Experts, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Few tokens (decode): index the K chosen experts' weights per token, no host sync.

    Reads only the chosen experts; under ``torch.compile`` the gather fuses into the products.
    Experts whose ``stacks()`` are copies (int8) supply ``chosen(idx)``: only those made float.
    """
    chosen = getattr(experts, "chosen", None)
    if chosen is not None:
        g1, g2, g3 = chosen(idx)  # [N, K, I, D], [N, K, D, I], [N, K, I, D]
    else:
        w1, w2, w3 = experts.stacks()
        g1, g2, g3 = w1[idx], w2[idx], w3[idx]
    x1 = torch.einsum("nd,nkid->nki", x, g1)  # [N, K, I]
    x3 = torch.einsum("nd,nkid->nki", x, g3)
    y = torch.einsum("nki,nkdi->nkd", F.silu(x1) * x3, g2)  # [N, K, D]
    return torch.einsum("nkd,nk->nd", y.float(), weights).to(x.dtype)


def experts_dense_topk(x: torch.Tensor, experts: Experts, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by its routing weight (0 where not chosen).

    Static shapes, no sort, no host sync: for compiled decoding of batches that reach most experts
    anyway. Each expert's weights are read once; the E/K-fold extra products are cheap at a few rows.
    """
    w1, w2, w3 = experts.stacks()
    dense = torch.zeros(x.shape[0], w1.shape[0], dtype=weights.dtype, device=x.device).scatter(1, idx, weights)
    h = F.silu(torch.einsum("nd,eid->eni", x, w1)) * torch.einsum("nd,eid->eni", x, w3)  # [E, N, I]
    y = torch.einsum("eni,edi->end", h, w2)  # [E, N, D]
    return torch.einsum("end,ne->nd", y.float(), dense).to(x.dtype)


def experts_each(x: torch.Tensor, experts: Experts, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every row through its own product (``expert(x, e)``), weighted by its
    routing weight (0 where not chosen): static shapes, no host sync, and each expert's weights
    read once in their own format. For experts whose ``stacks()`` are copies (int8 off the CPU),
    where a gather or ``dense`` would first write float copies of the weights."""
    dense = torch.zeros(x.shape[0], experts.n_experts, dtype=weights.dtype, device=x.device).scatter(1, idx, weights)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(experts.n_experts):
        out += experts.expert(x, e).float() * dense[:, e, None]
    return out.to(x.dtype)


def experts_per_token(x: torch.Tensor, experts: Experts, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Few tokens: each token runs its K chosen experts (views of their weights, no copy).

    Under ``torch.compile`` the expert ids are read with ``.item()`` (traced as unbacked integers
    with ``capture_scalar_outputs``, see ``generation.generate.compile_decode_step``).
    """
    if torch.compiler.is_compiling():
        n_experts = experts.n_experts
        chosen = [[expert_id(idx[n, k], n_experts) for k in range(idx.shape[1])] for n in range(idx.shape[0])]
        scales = [[weights[n, k] for k in range(idx.shape[1])] for n in range(idx.shape[0])]
    else:
        chosen, scales = idx.tolist(), weights.tolist()
    rows = []
    for n, (ids, ws) in enumerate(zip(chosen, scales, strict=True)):
        xn = x[n : n + 1]
        acc = None
        for e, w in zip(ids, ws, strict=True):  # w: the float32 weight as a Python float (same product)
            y = experts.expert(xn, e) * w
            acc = y if acc is None else acc + y
        rows.append(acc)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def expert_id(i: torch.Tensor, n_experts: int) -> int:
    """An expert index as a Python int (under compile: an unbacked integer known to be in range)."""
    e = i.item()
    torch._check(e >= 0)
    torch._check(e < n_experts)
    return e


def grouped_mm_ok(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    """``_grouped_mm`` needs 16-byte aligned strides and a floating dtype it supports."""
    if not HAS_GROUPED_MM or x.dtype not in (torch.bfloat16, torch.float32):
        return False
    if any(w.dtype != x.dtype for w in ws):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in ws)):
        return False  # training goes through the loop, whose autograd is plain
    return all(w.shape[-1] * w.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16 == 0 for w in ws)


# Compute capabilities where ``torch._grouped_mm`` has a hardware kernel (Hopper, Blackwell); below
# them PyTorch's fallback loops over the groups on the host (a sync per group). A ``meta`` device
# (the fake-GPU tests) is taken to be this capability; tests change it to try the other branch.
GROUPED_MM_MAJORS = {9, 10}
META_CAPABILITY = (9, 0)


def grouped_mm_in_hardware(device: torch.device) -> bool:
    """Whether ``device`` has a ``_grouped_mm`` kernel (decided once per device)."""
    if device.type == "meta":
        return META_CAPABILITY[0] in GROUPED_MM_MAJORS
    if device.type != "cuda":
        return False
    return (
        _capability(device.index if device.index is not None else torch.cuda.current_device())[0] in GROUPED_MM_MAJORS
    )


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def choose_dispatch(x: torch.Tensor, experts: Experts, idx: torch.Tensor) -> str:
    """``auto``: on a GPU with a ``_grouped_mm`` kernel for the dtype, every batch sorts and
    groups: one product per projection reads only the chosen experts and never waits on the host
    (CUDA graphs). Elsewhere off the CPU nothing may wait on the host either: a few tokens gather
    their experts, many run every expert (``dense``: static shapes). On the CPU a few tokens loop
    over the chosen experts' weights (compiled: up to ``COMPILED_PER_TOKEN_MAX`` tokens); many
    sort and group, or under compile run ``dense``. Experts whose ``stacks()`` are copies (int8)
    off the CPU never group (that would dequantise every expert per call): ``each`` decodes
    (compiled: few tokens gather)."""
    few = idx.numel() <= experts.n_experts
    compiling, cpu = torch.compiler.is_compiling(), x.device.type == "cpu"
    copies = getattr(experts, "stacks_are_copies", False)
    if not cpu:
        if copies:  # compiled, the gather's cast and scale fuse into the products' loads
            if compiling and few:
                return "gather"
            return "each" if x.shape[0] <= EACH_MAX_TOKENS else "dense"
        if x.dtype == torch.bfloat16 and grouped_mm_in_hardware(x.device) and grouped_mm_ok(x, *experts.stacks()):
            return "sorted"
        return "gather" if few else "dense"
    if few or (compiling and x.shape[0] <= COMPILED_PER_TOKEN_MAX):
        return "per_token"
    return "dense" if compiling else "sorted"


_DISPATCH = {
    "sorted": experts_sorted,
    "gather": experts_gather,
    "per_token": experts_per_token,
    "dense": experts_dense_topk,
    "each": experts_each,
    "reference": experts_reference,
}


def dispatch_experts(
    x: torch.Tensor,
    experts: Experts,
    idx: torch.Tensor,
    weights: torch.Tensor,
    impl: str | Callable[..., torch.Tensor] = "auto",
) -> torch.Tensor:
    """Run the chosen experts by ``impl``: one of ``DISPATCHES`` (``auto``: ``choose_dispatch``), or
    a callable with ``experts_reference``'s signature (expert parallelism runs a rank's own experts)."""
    if callable(impl):
        return impl(x, experts, idx, weights)
    if impl == "auto":
        impl = choose_dispatch(x, experts, idx)
    fn = _DISPATCH.get(impl)
    if fn is None:
        raise ValueError(f"moe dispatch: expected one of {', '.join(DISPATCHES)}, got {impl!r}")
    return fn(x, experts, idx, weights)


class StackedExperts:
    """Float stacks (w1, w2, w3) as an ``Experts`` object, for calling a dispatch on bare tensors."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> None:
        self.w1, self.w2, self.w3 = w1, w2, w3
        self.n_experts = w1.shape[0]

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return swiglu(x, self.w1[e], self.w2[e], self.w3[e])

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1, self.w2, self.w3


__all__ = [
    "COMPILED_PER_TOKEN_MAX",
    "DISPATCHES",
    "EACH_MAX_TOKENS",
    "Experts",
    "StackedExperts",
    "choose_dispatch",
    "dispatch_experts",
    "expert_id",
    "experts_dense_topk",
    "experts_each",
    "experts_gather",
    "experts_per_token",
    "experts_reference",
    "experts_sorted",
    "grouped_mm_in_hardware",
    "grouped_mm_ok",
    "swiglu",
]
