"""Classic EM mixture of experts: monotone log-likelihood and recovery of known linear pieces."""

from __future__ import annotations

import pytest
import torch

from mixtral_lite.training.em import fit_gate, fit_hierarchical, fit_mixture, gate_objective, weighted_least_squares


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def three_pieces(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < -1, -2 * x - 1, torch.where(x < 1, 0.5 * x + 1.5, 3 * x - 1))


def four_pieces(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < -2, 2 * x + 5, torch.where(x < 0, -x - 1, torch.where(x < 2, 1.5 * x - 1, -0.5 * x + 3)))


def sample(f, n: int, low: float, high: float, seed: int, noise: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low
    return x, f(x) + noise * torch.randn(n, generator=g, dtype=torch.float64)


def assert_monotone(history: list[float]) -> None:
    for before, after in zip(history, history[1:], strict=False):
        assert after >= before - 1e-9 * abs(before), (before, after)


def assert_pieces_found(lines: torch.Tensor, truth: list[tuple[float, float, float, float]], tol: float) -> None:
    """lines [J, 2] (slope, intercept). Every true piece (slope, intercept, low, high) is matched by
    one fitted expert whose line stays within ``tol`` of it over the piece's interval."""
    for slope, intercept, low, high in truth:
        grid = torch.linspace(low, high, 50, dtype=lines.dtype)
        fitted = lines[:, :1] * grid + lines[:, 1:]  # [J, 50]
        err = (fitted - (slope * grid + intercept)).abs().max(-1).values
        assert err.min().item() < tol, (slope, intercept, lines)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flat_em_is_monotone_and_recovers_pieces(seed):
    x, y = sample(three_pieces, 600, -3, 3, seed=seed)
    model, history = fit_mixture(x, y, 3, seed=seed)
    assert len(history) > 5
    assert_monotone(history)
    assert history[-1] > history[0] + 500  # from one blurred line to three sharp ones
    assert_pieces_found(model.experts[:, 0], [(-2, -1, -3, -1), (0.5, 1.5, -1, 1), (3, -1, 1, 3)], tol=0.05)
    assert torch.allclose(model.var.sqrt(), torch.full((3,), 0.1, dtype=torch.float64), atol=0.02)
    grid = torch.linspace(-3, 3, 301, dtype=torch.float64)
    rmse = (model.predict(grid, hard=True)[:, 0] - three_pieces(grid)).pow(2).mean().sqrt().item()
    assert rmse < 0.05, rmse  # measured 0.011-0.013 (errors only near the breakpoints)


def test_flat_em_two_dimensional_inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(500, 2, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.where(x[:, 0] > 0, x[:, 0] + x[:, 1], 2 * x[:, 0] - x[:, 1] + 1)
    y = y + 0.05 * torch.randn(500, generator=g, dtype=torch.float64)
    model, history = fit_mixture(x, y, 2, restarts=2)
    assert_monotone(history)
    coefs = model.experts[:, 0]  # [J, 3]: w1, w2, intercept
    for truth in ([1.0, 1.0, 0.0], [2.0, -1.0, 1.0]):
        err = (coefs - torch.tensor(truth, dtype=torch.float64)).abs().max(-1).values
        assert err.min().item() < 0.05, coefs
    assert (model.assign(x) == model.assign(x[:1]).expand(500)).float().mean() < 0.9  # both experts used


def test_hierarchical_em_is_monotone_and_recovers_pieces():
    x, y = sample(four_pieces, 400, -4, 4, seed=1)
    model, history = fit_hierarchical(x, y, 2, 2, restarts=2, tol=1e-8)
    assert_monotone(history)
    lines = model.experts[:, :, 0].reshape(4, 2)
    assert_pieces_found(
        lines, [(2, 5, -4, -2), (-1, -1, -2, 0), (1.5, -1, 0, 2), (-0.5, 3, 2, 4)], tol=0.1
    )  # measured <= 0.053
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    rmse = (model.predict(grid, hard=True)[:, 0] - four_pieces(grid)).pow(2).mean().sqrt().item()
    assert rmse < 0.06, rmse  # measured 0.023-0.035 over four seeds


def test_weighted_least_squares_matches_normal_equations():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    h = torch.rand(50, generator=g, dtype=torch.float64)
    expected = torch.linalg.solve(x.T @ (h[:, None] * x), x.T @ (h[:, None] * y)).T
    assert torch.allclose(weighted_least_squares(x, y, h), expected, atol=1e-10)


def test_gate_fit_never_lowers_objective_and_reaches_stationary_point():
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(200, 2, generator=g, dtype=torch.float64), torch.ones(200, 1, dtype=torch.float64)], 1)
    targets = torch.softmax(torch.randn(200, 3, generator=g, dtype=torch.float64), -1)
    weights = torch.rand(200, generator=g, dtype=torch.float64)
    v = torch.zeros(3, 3, dtype=torch.float64)
    values = [gate_objective(v, x, targets, weights).item()]
    for _ in range(10):
        v = fit_gate(v, x, targets, weights, steps=1)
        values.append(gate_objective(v, x, targets, weights).item())
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    p = torch.softmax(x @ v.T, -1)
    grad = (weights[:, None] * (targets - p)).T @ x
    assert grad.abs().max().item() < 1e-8
