"""Every expert dispatch equals the plain per-expert loop (float32, <= 1e-5)."""

from __future__ import annotations

import pytest
import torch

from mixtral_lite.model.experts import (
    HAS_GROUPED_MM,
    StackedExperts,
    experts_each,
    experts_gather,
    experts_per_token,
    experts_reference,
    experts_sorted,
)
from mixtral_lite.model.routing import route_topk

E, D, H = 8, 32, 48  # experts, hidden, expert intermediate size


def _weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(E, H, D, generator=g) * 0.2,
        torch.randn(E, D, H, generator=g) * 0.2,
        torch.randn(E, H, D, generator=g) * 0.2,
    )


def _routing(n: int, k: int, seed: int = 1, only: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, E, generator=g)
    if only is not None:  # force every token onto a few experts: the others receive no tokens
        mask = torch.full((E,), -1e9)
        mask[only] = 0.0
        logits = logits + mask
    idx, weights = route_topk(logits, k)
    return torch.randn(n, D, generator=g), idx, weights


FAST = {
    "sorted-loop": lambda *a: experts_sorted(*a, grouped_mm=False),
    "gather": experts_gather,
    "each": experts_each,
    "per_token": experts_per_token,
}
if HAS_GROUPED_MM:
    FAST["sorted-grouped_mm"] = lambda *a: experts_sorted(*a, grouped_mm=True)


@pytest.mark.parametrize("impl", sorted(FAST))
@pytest.mark.parametrize(
    "n,k,only",
    [(1, 2, None), (1, 1, None), (37, 2, None), (64, 3, None), (20, 2, [2, 5]), (5, 1, [7])],
    ids=["single-token", "single-top1", "37-top2", "64-top3", "two-experts-only", "one-expert-only"],
)
def test_dispatch_equals_reference(impl, n, k, only):
    w1, w2, w3 = _weights()
    x, idx, weights = _routing(n, k, only=only)
    if only is not None:
        assert set(idx.unique().tolist()) <= set(only)  # some experts really get no token
    expected = experts_reference(x, StackedExperts(w1, w2, w3), idx, weights)
    got = FAST[impl](x, StackedExperts(w1, w2, w3), idx, weights)
    assert (got - expected).abs().max().item() <= 1e-5


def test_route_topk_renormalises_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    idx, weights = route_topk(logits, 2)
    assert idx.tolist() == [[0, 1]]
    p = torch.softmax(logits, -1)[0, :2]
    assert torch.allclose(weights[0], p / p.sum(), atol=1e-7)
    # equal to top-k of the logits, then softmax over those k (mistral-inference's form)
    assert torch.allclose(weights[0], torch.softmax(logits[0, :2], -1), atol=1e-7)
