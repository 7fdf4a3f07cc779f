"""Tensor parallelism: every rank holds a slice of every attention layer and of every expert.

Attention is split by heads: rank r computes query heads ``[r H/N, (r+1) H/N)`` with their key/value
heads, so ``wq``, ``wk``, ``wv`` are cut by rows (whole heads) and ``wo`` by the matching columns;
each rank's ``wo`` product is a partial sum of the output and one all-reduce completes it. When N
exceeds the key/value heads, each rank keeps the one kv head its query heads read (replicated
over N / KV ranks), which needs N to be a multiple of KV.

Each expert is split along its intermediate dimension: ``w1``, ``w3`` [I, D] by rows and ``w2``
[D, I] by columns. SwiGLU is elementwise over I, so each rank's ``w2`` product is again a partial
sum: one all-reduce after the MoE. The router is replicated (every rank routes the same way).

Axis legend: N tensor-parallel ranks, H query heads, KV key/value heads, hd head dim,
D hidden, E experts, I expert intermediate size.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..config import MixtralConfig
from .dist import ParallelError

_ATTENTION = re.compile(r"layers\.\d+\.attention\.(w[qkvo])\.weight\Z")
_EXPERTS = re.compile(r"layers\.\d+\.feed_forward\.(w[123])\Z")


class HeadSplit(NamedTuple):
    q: slice  # this rank's query heads
    kv: slice  # the key/value heads they read


def check_tensor_parallel(config: MixtralConfig, tp: int) -> None:
    h, kv, i = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if h % tp:
        raise ParallelError(f"--tp {tp}: must divide num_attention_heads ({h})")
    if tp <= kv and kv % tp:
        raise ParallelError(f"--tp {tp}: must divide num_key_value_heads ({kv})")
    if tp > kv and tp % kv:
        raise ParallelError(
            f"--tp {tp}: above num_key_value_heads ({kv}) it must be a multiple of it (kv heads are replicated)"
        )
    if i % tp:
        raise ParallelError(f"--tp {tp}: must divide intermediate_size ({i})")


def head_split(config: MixtralConfig, tp: int, tp_rank: int) -> HeadSplit:
    h, kv = config.num_attention_heads, config.num_key_value_heads
    q = slice(tp_rank * h // tp, (tp_rank + 1) * h // tp)
    if tp <= kv:
        return HeadSplit(q, slice(tp_rank * kv // tp, (tp_rank + 1) * kv // tp))
    k = tp_rank // (tp // kv)  # N > KV: the one kv head of this rank's query group
    return HeadSplit(q, slice(k, k + 1))


def tensor_parallel_slices(name: str, config: MixtralConfig, tp: int, tp_rank: int) -> dict[int, slice] | None:
    """{dim: slice} of parameter ``name`` this rank holds, or None when ``name`` is not split."""
    hd = config.head_dim
    m = _ATTENTION.match(name)
    if m:
        heads = head_split(config, tp, tp_rank)
        rows = heads.kv if m.group(1) in ("wk", "wv") else heads.q
        cut = slice(rows.start * hd, rows.stop * hd)
        return {1: cut} if m.group(1) == "wo" else {0: cut}
    m = _EXPERTS.match(name)
    if m:
        i = config.intermediate_size
        cut = slice(tp_rank * i // tp, (tp_rank + 1) * i // tp)
        return {2: cut} if m.group(1) == "w2" else {1: cut}  # w1, w3 [E, I, D]; w2 [E, D, I]
    return None
