"""Expert parallelism: whole experts partitioned across ranks, attention replicated (or tensor
parallel when combined with ``--tp``).

How tokens meet their experts: every rank already holds every token's hidden state (attention
is replicated, or completed by its own all-reduce), and the router is replicated, so every rank
makes the same routing decision. Each rank runs only the (token, expert) pairs whose expert it
owns, weights them, and one all-reduce sums the ranks' partial outputs; a token whose chosen
experts all live elsewhere contributes zeros here.

Why an all-reduce and not an all-to-all: an all-to-all dispatch pays off when each rank holds
*different* tokens (data-parallel attention over a large batch): each token then travels only to
the ranks of its K experts and back. Here the activations are replicated, decode runs one token
per sequence, and the all-reduce is one fixed-size collective per layer with no token counts to
exchange first (no host sync, no ragged buffers), exact up to float summation order. Per rank it
moves about 2 (N-1)/N x tokens x D values, the same as an all-to-all at K = N (top-2 on 2 ranks).

Axis legend: N tokens, K experts per token, D hidden.
"""

from __future__ import annotations

import re

import torch

from ..config import MixtralConfig
from ..model.experts import Experts, dispatch_experts
from .dist import ParallelError

_EXPERTS = re.compile(r"layers\.\d+\.feed_forward\.w[123]\Z")


def check_expert_parallel(config: MixtralConfig, ep: int) -> None:
    e = config.num_experts
    if e % ep:
        raise ParallelError(f"--ep {ep}: must divide the number of experts ({e})")


def expert_range(config: MixtralConfig, ep: int, ep_rank: int) -> slice:
    """The global ids of the experts this rank owns (a contiguous block)."""
    e = config.num_experts
    return slice(ep_rank * e // ep, (ep_rank + 1) * e // ep)


def expert_parallel_slices(name: str, config: MixtralConfig, ep: int, ep_rank: int) -> dict[int, slice] | None:
    """{0: experts} for the stacked expert weights, None for everything else (replicated)."""
    if _EXPERTS.match(name):
        return {0: expert_range(config, ep, ep_rank)}
    return None


class LocalExperts:
    """``SparseMoE.dispatch`` under expert parallelism: run only the experts of this rank.

    The layer's stacks hold experts ``[first, first + n)``; ``idx`` holds global ids. Pairs routed
    elsewhere add nothing, so summing every rank's output over the group gives the single-process
    result (``experts_reference`` over all experts; the tests tie the two).
    """

    def __init__(self, first: int, impl: str = "auto") -> None:
        self.first = first
        self.impl = impl

    def __call__(self, x: torch.Tensor, experts: Experts, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Static shapes, nothing read by the host: a pair routed elsewhere runs one of this rank's
        experts with weight 0 (selecting the owned pairs would be a ``nonzero``: a sync per layer)."""
        local = idx - self.first  # [N, K]
        own = (local >= 0) & (local < experts.n_experts)
        local = local.clamp(0, experts.n_experts - 1)
        return dispatch_experts(x, experts, local, weights * own, self.impl)

    def __repr__(self) -> str:
        return f"LocalExperts(first={self.first}, impl={self.impl!r})"
