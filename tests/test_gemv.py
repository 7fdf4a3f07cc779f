"""Few-row products split over the threads (``gemv.py``) equal the plain code they replace, and
the model takes them exactly where intended."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral_lite.cpu import build, gemv, modules
from mixtral_lite.cpu.layout import column_major
from mixtral_lite.cpu.products import linear
from mixtral_lite.model.experts import StackedExperts, experts_reference


@pytest.fixture
def two_threads(monkeypatch: pytest.MonkeyPatch):
    """Two threads, no minimum block size and no compiled few-row kernel (which comes first where
    it is built), so the tiny test matrices take the split path."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(gemv, "SPLIT_MIN_OUT", 1)
    monkeypatch.setattr(build, "available", lambda: False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(1, 24), (1, 1, 24), (3, 24), (2, 4, 24)])
@pytest.mark.parametrize("col", [False, True])
@pytest.mark.parametrize("parts", [2, 4])
def test_split_linear_equals_linear(shape: tuple[int, ...], col: bool, parts: int) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(40, 24, generator=g)
    if col:
        w = column_major(w)
    y = gemv.split_linear(x, w, parts)
    assert y.shape == (*shape[:-1], 40)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_split_parts_rules(two_threads) -> None:
    w = torch.randn(40, 24)
    assert gemv.split_parts(torch.randn(1, 24), w) == 2
    assert gemv.split_parts(torch.randn(gemv.SPLIT_MAX_ROWS + 1, 24), w) == 1  # many rows: BLAS GEMM
    assert gemv.split_parts(torch.randn(1, 24), torch.randn(41, 24)) == 1  # rows do not divide
    bf = torch.randn(1, 24).bfloat16()
    assert gemv.split_parts(bf, w.bfloat16()) == 1  # eager bfloat16: its own kernel uses every thread
    torch.set_num_threads(1)
    assert gemv.split_parts(torch.randn(1, 24), w) == 1


def test_split_parts_keeps_small_blocks_whole() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert gemv.split_parts(torch.randn(1, 24), torch.randn(2 * gemv.SPLIT_MIN_OUT - 2, 24)) == 1
        assert gemv.split_parts(torch.randn(1, 24), torch.randn(2 * gemv.SPLIT_MIN_OUT, 24)) == 2
    finally:
        torch.set_num_threads(before)


def test_linear_takes_the_split_and_agrees(two_threads, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = gemv.split_linear
    monkeypatch.setattr("mixtral_lite.cpu.products.split_linear", lambda *a: calls.append(a[2]) or real(*a))
    x, w = torch.randn(1, 1, 24), torch.randn(40, 24)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert calls == [2]


@pytest.mark.parametrize("pair", [(0, 1), (1, 0), (0, 5), (4, 2)])
def test_experts_pair_equals_reference(pair: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    e, d, i = 6, 16, 20
    w1, w3, w2 = torch.randn(e, i, d, generator=g), torch.randn(e, i, d, generator=g), torch.randn(e, d, i, generator=g)
    x = torch.randn(1, d, generator=g)
    idx = torch.tensor([pair])
    weights = torch.tensor([[0.7, 0.3]])
    ref = experts_reference(x, StackedExperts(w1, w2, w3), idx, weights)
    order = sorted(range(2), key=lambda k: pair[k])
    y = gemv.experts_pair(x, w1, w2, w3, [pair[k] for k in order], [weights[0, k].item() for k in order])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("col", [False, True])
def test_per_token_dispatch_with_pairs_equals_reference(two_threads, col: bool, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("mixtral_lite.cpu.modules.experts_pair", lambda *a: calls.append(a[4]) or gemv.experts_pair(*a))
    g = torch.Generator().manual_seed(2)
    e, d, i, n = 8, 16, 24, 5
    w1, w3, w2 = torch.randn(e, i, d, generator=g), torch.randn(e, i, d, generator=g), torch.randn(e, d, i, generator=g)
    if col:
        w1, w2, w3 = column_major(w1), column_major(w2), column_major(w3)
    x = torch.randn(n, d, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(n)])  # ids in either order
    weights = torch.softmax(torch.randn(n, 2, generator=g), -1)
    ref = experts_reference(x, StackedExperts(w1, w2, w3), idx, weights)
    out = modules._experts_in_pairs(x, (w1, w2, w3), idx, weights)  # CpuSparseMoE's few-token path
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == [sorted(row) for row in idx.tolist()]  # every token, its ids ascending
