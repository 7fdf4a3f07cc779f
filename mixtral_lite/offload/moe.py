"""The MoE layer whose experts live in a store: the reference ``SparseMoE`` (or ``Int8MoE``) with
its expert stacks taken out and ``experts()`` sent to the store.

Routing, shared experts and the reduce hook stay the reference's, on the layer's device. Only the
routed experts move: where the store computes off the layer's device (experts in host memory
beside a GPU), the routed tokens' hidden states, expert ids and weights go there (a few KB per
token; the copy is the one host read routing needs), the experts run there and the sum comes
back. Many tokens at once (prefill) may instead copy their experts to the device through an LRU
(``prefill``, from ``copy_min_tokens`` rows).
"""

from __future__ import annotations

import torch

from ..model.mixtral import SparseMoE
from ..model.quant import Int8MoE
from .cache import OffloadStats
from .stores import ExpertStore, run_experts

EXPERT_TENSORS = ("w1", "w2", "w3", "w1_scale", "w2_scale", "w3_scale")


class _Offloaded:
    store: ExpertStore
    prefill: ExpertStore | None
    copy_min_tokens: int
    stats: OffloadStats
    dispatch: str

    @property
    def n_experts(self) -> int:
        return self.store.n_experts

    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.stats.calls += 1
        store = self.store
        if self.prefill is not None and x.shape[0] >= self.copy_min_tokens:
            store = self.prefill
        if store.device == x.device:
            return run_experts(x, store, idx, weights, self.dispatch)
        dev = store.device
        xs, ids, ws = x.to(dev), idx.to(dev), weights.to(dev)
        self.stats.bytes_moved += 2 * x.numel() * x.element_size() + idx.numel() * 8 + weights.numel() * 4
        return run_experts(xs, store, ids, ws, self.dispatch).to(x.device)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.store.expert(x, e)

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.store.stacks()

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}, in {type(self.store).__name__} on {self.store.device}"


class OffloadedMoE(_Offloaded, SparseMoE):
    """A ``SparseMoE`` whose routed experts live in ``store``."""


class OffloadedInt8MoE(_Offloaded, Int8MoE):
    """An ``Int8MoE`` whose routed experts (int8 with scales) live in ``store``."""

    def scales(self):
        raise AttributeError("the int8 scales live in the expert store")


def offload_moe(
    moe: SparseMoE,
    store: ExpertStore,
    stats: OffloadStats,
    *,
    prefill: ExpertStore | None = None,
    copy_min_tokens: int = 0,
) -> SparseMoE:
    """Turn ``moe`` into its offloaded class in place (as the CPU kernels are installed: the class
    changes, the router and the rest stay) and drop its own expert tensors."""
    moe.__class__ = OffloadedInt8MoE if isinstance(moe, Int8MoE) else OffloadedMoE
    for name in EXPERT_TENSORS:
        moe._parameters.pop(name, None)
        moe._buffers.pop(name, None)
    moe.store, moe.prefill, moe.copy_min_tokens, moe.stats = store, prefill, copy_min_tokens, stats
    return moe


__all__ = ["EXPERT_TENSORS", "OffloadedInt8MoE", "OffloadedMoE", "offload_moe"]
