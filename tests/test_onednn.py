"""Many-row float32 CPU products through oneDNN (``onednn.py``) equal ``F.linear``, and the model
takes them exactly where intended."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral_lite.cpu import install_cpu_kernels, onednn, products
from mixtral_lite.cpu.layout import column_major
from mixtral_lite.model.mixtral import Linear

pytestmark = pytest.mark.skipif(not onednn.HAS_ONEDNN_LINEAR, reason="this PyTorch build has no oneDNN")


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(8, 64), (33, 64), (2, 300, 64)])
@pytest.mark.parametrize("col", [False, True])
def test_onednn_linear_equals_linear(shape: tuple[int, ...], col: bool) -> None:
    x, w = _rand(*shape), _rand(96, 64, seed=1)
    if col:
        w = column_major(w)
    y = onednn.onednn_linear(x, w)
    assert y.shape == (*shape[:-1], 96) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_use_onednn_rules() -> None:
    w = _rand(40, 16)
    rows = onednn.ONEDNN_MIN_ROWS
    assert onednn.use_onednn(_rand(rows, 16), w)
    assert onednn.use_onednn(_rand(1, rows, 16), w)
    assert not onednn.use_onednn(_rand(rows - 1, 16), w)  # few rows: gemv.py
    assert not onednn.use_onednn(_rand(rows, 16).bfloat16(), w.bfloat16())  # bfloat16 goes to oneDNN already
    assert not onednn.use_onednn(_rand(rows, 16), w.requires_grad_())  # autograd: F.linear
    with torch.no_grad():
        assert onednn.use_onednn(_rand(rows, 16), w)


def test_linear_takes_onednn_and_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []

    def spy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return onednn.onednn_linear(x, w)

    monkeypatch.setattr(products, "onednn_linear", spy)
    w = _rand(40, 64, seed=1)
    x = _rand(2, 16, 64)
    torch.testing.assert_close(products.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert calls == [(2, 16, 64)]
    products.linear(_rand(1, 64), w)  # one row: not oneDNN
    assert len(calls) == 1
    layer = Linear(64, 40)
    install_cpu_kernels(layer)  # a CpuLinear
    with torch.no_grad():
        layer.weight.copy_(w)
        torch.testing.assert_close(layer(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


def test_training_keeps_f_linear() -> None:
    x = _rand(16, 32).requires_grad_()
    w = _rand(8, 32, seed=1).requires_grad_()
    products.linear(x, w).sum().backward()
    assert x.grad is not None and w.grad is not None
    torch.testing.assert_close(w.grad, x.detach().sum(0).expand(8, -1), rtol=1e-5, atol=1e-5)
