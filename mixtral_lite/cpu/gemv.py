"""Few-row float32 products on a multi-core CPU: spread one matrix-vector product over the cores.

Decoding multiplies a handful of activation rows by each weight matrix. BLAS runs such a product
(``F.linear`` with 1-8 rows) on one core, and one core cannot pull the memory bandwidth that two
or more can (docs/performance.md). ``torch.bmm`` does share its batch out over the threads, so the weight's rows are
cut into one block per thread, viewed (not copied) as a batch of matrices, and multiplied in one
call: each thread streams its own block.

``split_linear(x, w)`` equals ``F.linear(x, w)`` (the same dot products, each over the whole
input), and ``experts_pair`` equals two SwiGLU experts; the tests tie both to the plain
code. bfloat16 and float16 keep ``F.linear``: PyTorch's reduced-precision kernel already uses
every thread.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCED = (torch.bfloat16, torch.float16)
SPLIT_MAX_ROWS = 8  # rows up to which a product is split over the threads (more: BLAS's own GEMM)
SPLIT_MIN_OUT = 256  # outputs per thread below which splitting costs more than it saves


def split_parts(x: torch.Tensor, w: torch.Tensor) -> int:
    """Blocks to cut ``w`` [O, I] into for ``x`` (1 = do not split)."""
    if x.device.type != "cpu" or x.dtype != w.dtype or w.dim() != 2:
        return 1
    if x.dtype != torch.float32 or torch.compiler.is_compiling():
        return 1
    if x.numel() > SPLIT_MAX_ROWS * x.shape[-1]:
        return 1
    n = torch.get_num_threads()
    if n < 2 or w.shape[0] % n or w.shape[0] // n < SPLIT_MIN_OUT:
        return 1
    return n


def split_linear(x: torch.Tensor, w: torch.Tensor, parts: int) -> torch.Tensor:
    """``F.linear(x, w)`` for x [..., I] with few rows, w [O, I] cut into ``parts`` row blocks."""
    o, i = w.shape
    rows = x.reshape(1, -1, i)
    y = torch.bmm(rows.expand(parts, -1, -1), w.unflatten(0, (parts, o // parts)).transpose(1, 2))  # [P, M, O/P]
    if y.shape[1] != 1:
        y = y.transpose(0, 1)
    return y.reshape(*x.shape[:-1], o)


def experts_pair(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, experts: list[int], weights: list[float]
) -> torch.Tensor:
    """One token x [1, D] through its two experts at once: each product is one ``bmm`` over the
    pair (a strided view of the stacks), so two threads each stream one expert.

    ``experts`` must be ascending (a < b). Returns ``sum_k weights[k] * swiglu_k(x)`` [1, D]."""
    a, b = experts
    wa, wb = weights
    torch._check(a < b)
    step = b - a
    x2 = x.expand(2, 1, x.shape[-1])
    w1p, w2p, w3p = (w[a : b + 1 : step].transpose(1, 2) for w in (w1, w2, w3))  # views [2, ...]
    h = F.silu(torch.bmm(x2, w1p)) * torch.bmm(x2, w3p)  # [2, 1, I]
    y = torch.bmm(h, w2p)  # [2, 1, D]
    return y[0] * wa + y[1] * wb


__all__ = ["SPLIT_MAX_ROWS", "experts_pair", "split_linear", "split_parts"]
