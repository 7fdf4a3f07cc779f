"""Load-balancing losses and load metrics for MoE routers.

Axis legend: N tokens, E experts, K experts per token, L MoE layers.

Each loss takes the per-layer ``Routing`` records a forward pass leaves on its ``SparseMoE`` layers
(``record_routing``). Routing probabilities ``p`` [N, E] are the softmax of the gate logits, the
two-level product for hierarchical routing, and sigmoid scores normalised per token for DeepSeek-V3
scoring (``Routing.routing_probs``).

- ``switch_loss``: Switch / Mixtral, E * sum_e f_e P_e over the tokens of all layers together
  (f_e = tokens sent to e / N, P_e = mean p_e); equals K when balanced. ``load_balancing_loss`` is
  the same on raw router logits with transformers' signature.
- ``z_loss``: ST-MoE router z-loss, mean (logsumexp logits)^2: keeps gate logits small.
- ``deepseek_balance_loss``: DeepSeekMoE expert-level loss sum_i f_i P_i with
  f_i = E / (K N) * count_i, per layer, averaged over layers; equals 1 when balanced.
- ``importance_loss``: Shazeer et al.'s CV(importance)^2 for soft routing, where every expert sees
  every token and the count-based losses are constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..model.routing import Routing, expert_load


def switch_loss(routings: Sequence[Routing]) -> torch.Tensor:
    """E * sum_e f_e * P_e with the tokens of every layer pooled (transformers' convention)."""
    probs = torch.cat([r.routing_probs() for r in routings])  # [L*N, E]
    idx = torch.cat([r.idx for r in routings])  # [L*N, K]
    n, e = probs.shape
    f = expert_load(idx, e) / n  # [E] assignments per token, sums to K
    return e * (f * probs.float().mean(0)).sum()


def load_balancing_loss(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (no attention mask) on router logits [N, E] per layer."""
    routings = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        routings.append(Routing(logits, probs.topk(top_k, dim=-1).indices, probs, probs))
    if routings[0].probs.shape[-1] != num_experts:
        raise ValueError(f"load_balancing_loss: logits have {routings[0].probs.shape[-1]} experts, not {num_experts}")
    return switch_loss(routings)


def z_loss(routings: Sequence[Routing]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over all tokens of logsumexp(gate logits)^2."""
    logits = torch.cat([r.logits for r in routings]).float()  # [L*N, E]
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def deepseek_balance_loss(routings: Sequence[Routing]) -> torch.Tensor:
    """DeepSeekMoE expert-level balance loss, averaged over layers (1 when perfectly balanced)."""
    total = 0.0
    for r in routings:
        probs = r.routing_probs()  # [N, E]
        n, e = probs.shape
        k = r.idx.shape[1]
        f = expert_load(r.idx, e) * (e / (k * n))  # [E], mean 1
        total = total + (f * probs.float().mean(0)).sum()
    return total / len(routings)


def importance_loss(routings: Sequence[Routing]) -> torch.Tensor:
    """Squared coefficient of variation of each expert's summed probability, averaged over layers."""
    total = 0.0
    for r in routings:
        importance = r.routing_probs().float().sum(0)  # [E]
        total = total + importance.var(unbiased=False) / importance.mean().pow(2)
    return total / len(routings)


BALANCE_LOSSES = {"switch": switch_loss, "deepseek": deepseek_balance_loss, "importance": importance_loss}


def balance_loss(name: str, routings: Sequence[Routing]) -> torch.Tensor:
    """The balance loss called ``name`` (a key of ``BALANCE_LOSSES``)."""
    if name not in BALANCE_LOSSES:
        raise ValueError(f"balance loss: expected one of {sorted(BALANCE_LOSSES)}, got {name!r}")
    return BALANCE_LOSSES[name](routings)


# ---- metrics ------------------------------------------------------------------------------------
class LoadStats(NamedTuple):
    share: list[float]  # [E] fraction of the layer's routed load per expert
    cv: float  # coefficient of variation of the load (std / mean)
    max_vio: float  # (max load - mean load) / mean load
    dropped: float  # fraction of tokens over capacity (hard routing), else 0


def load_stats(load: torch.Tensor, dropped: float = 0.0) -> LoadStats:
    """Share, CV and MaxVio of a per-expert load [E]."""
    load = load.double()
    mean = load.mean()
    return LoadStats(
        (load / load.sum()).tolist(),
        float(load.std(unbiased=False) / mean),
        float((load.max() - mean) / mean),
        dropped,
    )


def routing_load(r: Routing) -> torch.Tensor:
    """Per-expert load [E]: tokens routed to each expert (before capacity drops).

    When every expert sees every token (soft routing) counts are uniform by construction, so the
    load is the summed gate weight instead.
    """
    e = r.logits.shape[-1]
    if r.idx.shape[-1] == e:
        return r.weights.detach().float().sum(0)
    return expert_load(r.idx, e)


def layer_stats(routings: Sequence[Routing]) -> list[LoadStats]:
    """One ``LoadStats`` per layer."""
    return [load_stats(routing_load(r), r.dropped / r.idx.shape[0]) for r in routings]


def summarize(stats: Sequence[LoadStats]) -> dict[str, float]:
    """Mean CV, mean and worst MaxVio, mean dropped fraction over layers."""
    if not stats:
        return {}
    n = len(stats)
    return {
        "load_cv": sum(s.cv for s in stats) / n,
        "max_vio": sum(s.max_vio for s in stats) / n,
        "max_vio_worst": max(s.max_vio for s in stats),
        "dropped": sum(s.dropped for s in stats) / n,
    }


__all__ = [
    "switch_loss",
    "load_balancing_loss",
    "z_loss",
    "deepseek_balance_loss",
    "importance_loss",
    "balance_loss",
    "BALANCE_LOSSES",
    "LoadStats",
    "load_stats",
    "routing_load",
    "layer_stats",
    "summarize",
]
