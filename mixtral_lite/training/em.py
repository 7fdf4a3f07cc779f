"""The classic mixture of experts, trained by EM (Jordan & Jacobs 1994), on tabular data.

Flat model: linear experts with Gaussian noise under a softmax gate, x~ = [x, 1]:

    p(y | x) = sum_j g_j(x) N(y; W_j x~, var_j I),   g = softmax(V x~)

Hierarchical model (two levels): a top gate over G groups, a gate inside each group over its M
experts; the expert's prior is the product of the two gates:

    p(y | x) = sum_i g_i(x) sum_j g_{j|i}(x) N(y; W_ij x~, var_ij I)

EM: the E-step computes each expert's posterior responsibility h for each sample. The M-step
refits every expert by h-weighted least squares and its variance in closed form (exact maxima), and
each gate by damped Newton steps on its h-weighted log-likelihood with soft targets, a step being
taken only when it raises that objective. Every part of the expected complete-data log-likelihood
goes up, so the data log-likelihood never decreases (a generalised EM).

Axis legend: N samples, D inputs + 1 (the constant), P outputs, J experts, G groups, M experts
per group. Computation is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_2PI = math.log(2 * math.pi)


def _design(x: torch.Tensor) -> torch.Tensor:
    """[N, D_in] -> [N, D]: the inputs with a constant column for the intercepts."""
    x = x.double()
    if x.dim() == 1:
        x = x[:, None]
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def _targets(y: torch.Tensor) -> torch.Tensor:
    y = y.double()
    return y[:, None] if y.dim() == 1 else y


def gaussian_log_pdf(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(y; mean, var I): y [N, P], mean [N, ..., P], var [...] -> [N, ...]."""
    p = y.shape[-1]
    shape = (y.shape[0],) + (1,) * (mean.dim() - 2) + (p,)
    sq = (y.view(shape) - mean).pow(2).sum(-1)
    return -0.5 * (sq / var + p * (LOG_2PI + var.log()))


def weighted_least_squares(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """argmin_W sum_n h_n ||y_n - W x_n||^2: x [N, D], y [N, P], h [N] -> W [P, D]."""
    s = h.clamp_min(0).sqrt()[:, None]
    return torch.linalg.lstsq(x * s, y * s, driver="gelsd").solution.T


def fit_variance(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, h: torch.Tensor, floor: float) -> torch.Tensor:
    """Responsibility-weighted mean squared residual per output dimension, at least ``floor``."""
    sq = (y - x @ w.T).pow(2).sum(-1)  # [N]
    var = (h * sq).sum() / (y.shape[1] * h.sum().clamp_min(1e-300))
    return var.clamp_min(floor)


def gate_objective(v: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_n weights_n sum_j targets_nj log softmax(v x_n)_j."""
    return (weights[:, None] * targets * torch.log_softmax(x @ v.T, dim=-1)).sum()


def fit_gate(
    v: torch.Tensor,
    x: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    steps: int = 2,
    damping: float = 1e-6,
) -> torch.Tensor:
    """Raise ``gate_objective`` with damped Newton steps (backtracking; never lowers it).

    v [J, D], targets [N, J] (rows sum to 1), weights [N].
    """
    j, d = v.shape
    best = gate_objective(v, x, targets, weights)
    for _ in range(steps):
        p = torch.softmax(x @ v.T, dim=-1)  # [N, J]
        grad = (weights[:, None] * (targets - p)).T @ x  # [J, D]
        cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [N, J, J]
        hess = torch.einsum("n,njk,nd,ne->jdke", weights, cov, x, x).reshape(j * d, j * d)  # minus the Hessian
        scale = hess.diagonal().abs().max().clamp_min(1e-12)
        hess = hess + damping * scale * torch.eye(j * d, dtype=hess.dtype)
        step = torch.linalg.solve(hess, grad.reshape(-1)).view(j, d)
        t = 1.0
        while t > 1e-10:
            candidate = v + t * step
            value = gate_objective(candidate, x, targets, weights)
            if value > best:
                v, best = candidate, value
                break
            t /= 2
        else:
            break  # no ascent direction left: converged
    return v


def initial_responsibilities(x: torch.Tensor, groups: int, per_group: int, generator: torch.Generator) -> torch.Tensor:
    """Soft Voronoi cells around random data points, [N, G, M]: a partition a linear softmax gate
    can express. Group centres are random samples; each group's expert centres are random samples
    among the points nearest that group centre, so a group covers one region of the input space.
    """
    inputs = x[:, :-1]  # drop the constant column
    n = len(inputs)

    def cells(centres: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(inputs, centres).pow(2)  # [N, C]
        tau = d2.min(-1).values.mean().clamp_min(1e-12)  # softness: the typical distance to a centre
        return torch.softmax(-d2 / tau, dim=-1)

    group_centres = inputs[torch.randperm(n, generator=generator)[:groups]]
    nearest = torch.cdist(inputs, group_centres).argmin(-1)  # [N]
    h = torch.empty(n, groups, per_group, dtype=x.dtype)
    p_group = cells(group_centres)  # [N, G]
    for i in range(groups):
        members = torch.nonzero(nearest == i)[:, 0]
        if len(members) < per_group:
            members = torch.arange(n)
        pick = members[torch.randperm(len(members), generator=generator)[:per_group]]
        h[:, i] = p_group[:, i : i + 1] * cells(inputs[pick])
    return h


# ---- flat mixture ---------------------------------------------------------------------------------
@dataclass
class MixtureOfExperts:
    """Linear experts under a softmax gate: gate [J, D], experts [J, P, D], var [J]."""

    gate: torch.Tensor
    experts: torch.Tensor
    var: torch.Tensor

    def joint_log(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log g_j(x_n) + log N(y_n; expert j), [N, J] (x with the constant column)."""
        mean = torch.einsum("nd,jpd->njp", x, self.experts)
        return torch.log_softmax(x @ self.gate.T, dim=-1) + gaussian_log_pdf(y, mean, self.var)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Total log-likelihood of raw inputs x [N, D_in] and targets y [N, P] (or [N])."""
        return float(torch.logsumexp(self.joint_log(_design(x), _targets(y)), dim=-1).sum())

    def predict(self, x: torch.Tensor, hard: bool = False) -> torch.Tensor:
        """Mixture mean [N, P], or with ``hard`` the mean of the expert the gate favours."""
        x = _design(x)
        g = torch.softmax(x @ self.gate.T, dim=-1)  # [N, J]
        mean = torch.einsum("nd,jpd->njp", x, self.experts)
        if hard:
            return mean[torch.arange(len(x)), g.argmax(-1)]
        return (g[..., None] * mean).sum(1)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The expert the gate favours for each input, [N]."""
        return (_design(x) @ self.gate.T).argmax(-1)


def m_step_flat(model: MixtureOfExperts, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, floor: float) -> None:
    ones = torch.ones(len(x), dtype=x.dtype)
    for j in range(h.shape[1]):
        model.experts[j] = weighted_least_squares(x, y, h[:, j])
        model.var[j] = fit_variance(x, y, model.experts[j], h[:, j], floor)
    model.gate = fit_gate(model.gate, x, h, ones)


def fit_mixture(
    x: torch.Tensor,
    y: torch.Tensor,
    n_experts: int,
    *,
    iters: int = 200,
    tol: float = 1e-9,
    seed: int = 0,
    restarts: int = 1,
    var_floor: float = 1e-6,
) -> tuple[MixtureOfExperts, list[float]]:
    """EM from ``initial_responsibilities``; returns the best of ``restarts`` runs and its log-likelihood
    after each iteration (non-decreasing). Stops when the relative gain falls below ``tol``."""
    xd, yd = _design(x), _targets(y)
    floor = var_floor * float(yd.var())
    best: tuple[MixtureOfExperts, list[float]] | None = None
    for r in range(restarts):
        g = torch.Generator().manual_seed(seed * 1000 + r)
        h = initial_responsibilities(xd, 1, n_experts, g)[:, 0]  # [N, J]
        model = MixtureOfExperts(
            torch.zeros(n_experts, xd.shape[1], dtype=torch.float64),
            torch.zeros(n_experts, yd.shape[1], xd.shape[1], dtype=torch.float64),
            torch.ones(n_experts, dtype=torch.float64),
        )
        m_step_flat(model, xd, yd, h, floor)
        history = [float(torch.logsumexp(model.joint_log(xd, yd), -1).sum())]
        for _ in range(iters):
            h = torch.softmax(model.joint_log(xd, yd), dim=-1)  # E-step: responsibilities [N, J]
            m_step_flat(model, xd, yd, h, floor)
            history.append(float(torch.logsumexp(model.joint_log(xd, yd), -1).sum()))
            if history[-1] - history[-2] <= tol * abs(history[-2]):
                break
        if best is None or history[-1] > best[1][-1]:
            best = (model, history)
    return best


# ---- hierarchical mixture -------------------------------------------------------------------------
@dataclass
class HierarchicalMixture:
    """Two-level gates: top [G, D], inner [G, M, D]; experts [G, M, P, D]; var [G, M]."""

    top: torch.Tensor
    inner: torch.Tensor
    experts: torch.Tensor
    var: torch.Tensor

    def joint_log(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log g_i + log g_{j|i} + log N(y; expert ij), [N, G, M]."""
        log_top = torch.log_softmax(x @ self.top.T, dim=-1)  # [N, G]
        log_inner = torch.log_softmax(torch.einsum("nd,gmd->ngm", x, self.inner), dim=-1)  # [N, G, M]
        mean = torch.einsum("nd,gmpd->ngmp", x, self.experts)
        return log_top[..., None] + log_inner + gaussian_log_pdf(y, mean, self.var)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> float:
        j = self.joint_log(_design(x), _targets(y))
        return float(torch.logsumexp(j.flatten(1), dim=-1).sum())

    def predict(self, x: torch.Tensor, hard: bool = False) -> torch.Tensor:
        """Mixture mean [N, P], or with ``hard`` the mean of the most probable expert under the gates."""
        x = _design(x)
        prior = torch.softmax(x @ self.top.T, -1)[..., None] * torch.softmax(
            torch.einsum("nd,gmd->ngm", x, self.inner), -1
        )  # [N, G, M]
        mean = torch.einsum("nd,gmpd->ngmp", x, self.experts)
        prior, mean = prior.flatten(1), mean.flatten(1, 2)  # [N, G*M], [N, G*M, P]
        if hard:
            return mean[torch.arange(len(x)), prior.argmax(-1)]
        return (prior[..., None] * mean).sum(1)


def m_step_hierarchical(
    model: HierarchicalMixture, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, floor: float
) -> None:
    """h [N, G, M]: joint responsibilities. Experts by WLS, top gate on h_i, inner gates on h_{j|i}."""
    g, m = h.shape[1:]
    h_group = h.sum(-1)  # [N, G]
    for i in range(g):
        for j in range(m):
            model.experts[i, j] = weighted_least_squares(x, y, h[:, i, j])
            model.var[i, j] = fit_variance(x, y, model.experts[i, j], h[:, i, j], floor)
        within = h[:, i] / h_group[:, i : i + 1].clamp_min(1e-300)  # [N, M], h_{j|i}
        model.inner[i] = fit_gate(model.inner[i], x, within, h_group[:, i])
    model.top = fit_gate(model.top, x, h_group, torch.ones(len(x), dtype=x.dtype))


def _hierarchical_ll(model: HierarchicalMixture, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.logsumexp(model.joint_log(x, y).flatten(1), -1).sum())


def fit_hierarchical(
    x: torch.Tensor,
    y: torch.Tensor,
    n_groups: int,
    experts_per_group: int,
    *,
    iters: int = 200,
    tol: float = 1e-9,
    seed: int = 0,
    restarts: int = 1,
    var_floor: float = 1e-6,
) -> tuple[HierarchicalMixture, list[float]]:
    """EM for the two-level mixture; same contract as ``fit_mixture``."""
    xd, yd = _design(x), _targets(y)
    floor = var_floor * float(yd.var())
    d, p = xd.shape[1], yd.shape[1]
    best: tuple[HierarchicalMixture, list[float]] | None = None
    for r in range(restarts):
        g = torch.Generator().manual_seed(seed * 1000 + r)
        h = initial_responsibilities(xd, n_groups, experts_per_group, g)
        z = torch.zeros
        model = HierarchicalMixture(
            z(n_groups, d, dtype=torch.float64),
            z(n_groups, experts_per_group, d, dtype=torch.float64),
            z(n_groups, experts_per_group, p, d, dtype=torch.float64),
            torch.ones(n_groups, experts_per_group, dtype=torch.float64),
        )
        m_step_hierarchical(model, xd, yd, h, floor)
        history = [_hierarchical_ll(model, xd, yd)]
        for _ in range(iters):
            joint = model.joint_log(xd, yd)  # E-step
            h = torch.softmax(joint.flatten(1), dim=-1).view_as(joint)
            m_step_hierarchical(model, xd, yd, h, floor)
            history.append(_hierarchical_ll(model, xd, yd))
            if history[-1] - history[-2] <= tol * abs(history[-2]):
                break
        if best is None or history[-1] > best[1][-1]:
            best = (model, history)
    return best


__all__ = [
    "MixtureOfExperts",
    "HierarchicalMixture",
    "fit_mixture",
    "fit_hierarchical",
    "fit_gate",
    "gate_objective",
    "weighted_least_squares",
    "gaussian_log_pdf",
]
