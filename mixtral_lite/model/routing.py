"""Routing variants: which experts see a token, and with what weight.

Axis legend: N tokens, D hidden, E experts, K experts per token, G groups, M experts per group,
I expert intermediate size.

Every router returns a ``Routing``. Mixtral's own rule (``route_topk``) is the plain path of
``SparseMoE``; the others are:

- ``route_scores``: DeepSeek's generalisation of top-k: softmax or sigmoid scores, an optional
  selection-only bias (auxiliary-loss-free balancing), group-limited selection and a scaling factor.
  With softmax, no bias, one group and scale 1 it is exactly Mixtral's router.
- ``route_hard``: top-1 (Switch) with a capacity per expert; tokens over capacity skip the FFN.
- ``route_soft``: every expert, weighted by the full softmax (a dense mixture). Puigcerver et al.'s
  slot-based Soft MoE mixes tokens of the whole sequence into slots, which leaks the future in a
  causal decoder, so it is not used here.
- ``route_hierarchical``: Jordan & Jacobs' two-level gate: a gate over G groups picks the top
  groups, a gate inside each chosen group picks its top-k experts; weight = g_group * g_expert.

Fine-grained expert segmentation (DeepSeekMoE) needs no code: split each expert into m by choosing
``num_experts = m * N``, ``intermediate_size = I / m`` and ``num_experts_per_tok = m * K``
(``fine_grained`` below does the arithmetic).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import MixtralConfig, MoEConfig


def route_topk(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router: softmax over all experts in float32, top-k, renormalise to sum 1.

    Returns (idx [N, K] long, weights [N, K] float32).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, idx = torch.topk(probs, k, dim=-1)
    return idx, weights / weights.sum(dim=-1, keepdim=True)


class Routing(NamedTuple):
    """One MoE layer's routing decision for N tokens."""

    logits: torch.Tensor  # [N, E] gate logits (the expert gate, for hierarchical routing)
    idx: torch.Tensor  # [N, K] chosen experts (long)
    weights: torch.Tensor  # [N, K] float32 gate weights of the chosen experts
    probs: torch.Tensor | None = None  # [N, E] routing probabilities for the balance losses; None = softmax(logits)
    kept: torch.Tensor | None = None  # [N] bool, hard routing: the token fits its expert's capacity
    capacity: int | None = None  # hard routing: tokens each expert may take

    def routing_probs(self) -> torch.Tensor:
        """[N, E] float32 probabilities over experts (summing to 1 per token)."""
        return torch.softmax(self.logits.float(), dim=-1) if self.probs is None else self.probs

    @property
    def dropped(self) -> int:
        """Tokens that overflowed their expert's capacity (0 without a capacity)."""
        return 0 if self.kept is None else int((~self.kept).sum())


def is_mixtral_routing(moe: MoEConfig) -> bool:
    """True when the layer routes exactly like Mixtral (shared experts and dense layers aside)."""
    return (
        moe.kind == "topk"
        and moe.score_func == "softmax"
        and not moe.bias_balancing
        and moe.n_group == 1
        and moe.routed_scaling_factor == 1.0
        and moe.norm_topk_prob
        and not moe.router_float32
    )


def route_scores(
    logits: torch.Tensor,
    k: int,
    *,
    score_func: str = "softmax",
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scaling: float = 1.0,
    normalize: bool = True,
    group_score_topk: int = 2,
) -> Routing:
    """DeepSeek-style top-k: scores choose (plus ``bias`` [E], for selection only), scores weigh.

    Group-limited routing keeps the ``topk_group`` of ``n_group`` groups with the largest sum of
    their ``group_score_topk`` best selection scores (DeepSeek-V3: 2; V2: 1, the maximum) and masks
    the rest before the top-k. The chosen scores are normalised to sum 1 (``normalize``; Qwen,
    OLMoE and DeepSeek-V2 checkpoints may keep them as scored), then multiplied by ``scaling``.
    """
    n, e = logits.shape
    logits32 = logits.float()
    scores = torch.sigmoid(logits32) if score_func == "sigmoid" else torch.softmax(logits32, dim=-1)  # [N, E]
    select = scores if bias is None else scores + bias.float()
    if n_group > 1:
        m = e // n_group
        grouped = select.view(n, n_group, m)  # [N, G, M]
        group_score = grouped.topk(min(group_score_topk, m), dim=-1).values.sum(-1)  # [N, G]
        keep = torch.zeros(n, n_group, dtype=torch.bool, device=logits.device)
        keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        select = select.masked_fill(~keep.repeat_interleave(m, dim=1), float("-inf"))
    idx = select.topk(k, dim=-1).indices  # [N, K]
    weights = scores.gather(1, idx)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if scaling != 1.0:
        weights = weights * scaling
    probs = scores / scores.sum(dim=-1, keepdim=True) if score_func == "sigmoid" else scores
    return Routing(logits, idx, weights, probs)


def expert_capacity(n_tokens: int, n_experts: int, factor: float) -> int:
    """Switch capacity: ceil(tokens / experts * capacity_factor)."""
    return math.ceil(n_tokens / n_experts * factor)


def route_hard(logits: torch.Tensor, capacity_factor: float | None) -> Routing:
    """Top-1 (Switch): weight = the chosen expert's softmax probability.

    With a ``capacity_factor`` each expert takes at most ``expert_capacity`` tokens, first come
    first served in token order; the others get weight 0 and ``kept`` False (the FFN adds nothing,
    the residual passes them through). ``None`` keeps every token.
    """
    n, e = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
    weights, idx = probs.max(dim=-1, keepdim=True)  # [N, 1]
    if capacity_factor is None:
        return Routing(logits, idx, weights, probs)
    capacity = expert_capacity(n, e, capacity_factor)
    one_hot = F.one_hot(idx[:, 0], e)  # [N, E]
    position = (one_hot.cumsum(0) - 1).gather(1, idx)[:, 0]  # [N] place of the token in its expert's queue
    kept = position < capacity
    return Routing(logits, idx, weights * kept[:, None], probs, kept, capacity)


def hard_kept_reference(idx: list[int], n_experts: int, capacity: int) -> list[bool]:
    """The plain loop ``route_hard`` is tested against: count each expert's tokens in order."""
    taken = [0] * n_experts
    kept = []
    for e in idx:
        kept.append(taken[e] < capacity)
        taken[e] += 1
    return kept


def route_soft(logits: torch.Tensor) -> Routing:
    """Every expert, weighted by the full softmax: idx = all experts, weights = probabilities."""
    n, e = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
    idx = torch.arange(e, device=logits.device).expand(n, e)
    return Routing(logits, idx, probs, probs)


def route_hierarchical(group_logits: torch.Tensor, logits: torch.Tensor, k: int, top_k_groups: int) -> Routing:
    """Two-level gate: softmax over groups, top ``top_k_groups``; inside each, softmax, top-k.

    Weight = g_group * g_expert: the group's probability as is (renormalising one chosen group to 1
    would leave the top gate without gradient), the in-group weights renormalised over the k chosen
    (Mixtral's rule). With every group and every expert chosen this is exactly Jordan & Jacobs'
    product of gates. ``probs`` [N, E] = g_group * softmax-in-group, the full two-level mixture.
    """
    n, e = logits.shape
    g = group_logits.shape[-1]
    m = e // g
    p_group = torch.softmax(group_logits.float(), dim=-1)  # [N, G]
    p_in = torch.softmax(logits.float().view(n, g, m), dim=-1)  # [N, G, M]
    w_group, group = p_group.topk(top_k_groups, dim=-1)  # [N, Kg]
    chosen = p_in.gather(1, group[..., None].expand(n, top_k_groups, m))  # [N, Kg, M]
    w_in, local = chosen.topk(k, dim=-1)  # [N, Kg, K]
    w_in = w_in / w_in.sum(dim=-1, keepdim=True)
    weights = (w_group[..., None] * w_in).reshape(n, top_k_groups * k)
    idx = (group[..., None] * m + local).reshape(n, top_k_groups * k)
    probs = (p_group[..., None] * p_in).reshape(n, e)
    return Routing(logits, idx, weights, probs)


def experts_dense(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Soft routing's dense mixture: every expert on every token, out = sum_e weights[:, e] * expert_e(x).

    x [N, D]; w1, w3 [E, I, D]; w2 [E, D, I]; weights [N, E]. ``experts.experts_reference`` with
    idx = all experts is the reference.
    """
    h = F.silu(torch.einsum("nd,eid->eni", x, w1)) * torch.einsum("nd,eid->eni", x, w3)  # [E, N, I]
    y = torch.einsum("eni,edi->end", h, w2)  # [E, N, D]
    return torch.einsum("end,ne->nd", y.float(), weights.float()).to(x.dtype)


def experts_padded(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Dispatch shaped for autograd (training): each expert's tokens are scattered into a padded
    [E, C, D] block (C = the busiest expert's count) and all experts run as three batched products.

    A loop over experts costs one backward op per expert, each touching a full-size gradient
    buffer; here backward is a handful of large ops, which matters with many small experts
    (fine-grained routing). Padding costs FLOPs when the load is uneven. ``experts.experts_reference``
    is the reference.
    """
    n, k = idx.shape
    e, d = w1.shape[0], x.shape[-1]
    flat = idx.reshape(-1)  # [N*K]
    order = torch.argsort(flat, stable=True)
    expert = flat[order]  # [N*K] pairs grouped by expert
    token = order // k  # source token of each sorted pair
    counts = torch.bincount(flat, minlength=e)  # [E]
    slot = torch.arange(n * k, device=x.device) - (torch.cumsum(counts, 0) - counts)[expert]  # place in its expert
    capacity = int(counts.max()) if n else 0
    xp = x.new_zeros(e, capacity, d).index_put((expert, slot), x[token])  # [E, C, D]
    h = F.silu(torch.bmm(xp, w1.transpose(1, 2))) * torch.bmm(xp, w3.transpose(1, 2))  # [E, C, I]
    ys = torch.bmm(h, w2.transpose(1, 2))[expert, slot]  # [N*K, D]
    return torch.zeros_like(x).index_add(0, token, (ys * weights.reshape(-1)[order, None]).to(x.dtype))


def expert_load(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, [E] float32 (from idx [N, K])."""
    return torch.bincount(idx.reshape(-1), minlength=n_experts).float()


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, speed: float) -> None:
    """DeepSeek-V3 auxiliary-loss-free balancing: b_i += speed * sign(mean load - load_i), in place."""
    bias.add_(speed * torch.sign(load.float().mean() - load.float()))


def fine_grained(config: MixtralConfig, m: int, n_shared: int = 0) -> MixtralConfig:
    """DeepSeekMoE segmentation: each expert split into ``m`` (mN experts of size I/m, mK active).

    ``n_shared`` of the mK active experts become always-on shared experts, so the compute per token
    stays that of the original top-K.
    """
    moe = config.moe
    if config.intermediate_size % m:
        raise ValueError(f"fine_grained: m={m} must divide intermediate_size ({config.intermediate_size})")
    active = m * moe.num_experts_per_tok
    if not 0 <= n_shared < active:
        raise ValueError(f"fine_grained: n_shared must be in [0, {active}), got {n_shared}")
    new_moe = MoEConfig(
        **{
            **moe.__dict__,
            "num_experts": m * moe.num_experts - n_shared,
            "num_experts_per_tok": active - n_shared,
            "n_shared_experts": moe.n_shared_experts + n_shared,
        }
    )
    return MixtralConfig(**{**config.__dict__, "intermediate_size": config.intermediate_size // m, "moe": new_moe})


__all__ = [
    "Routing",
    "is_mixtral_routing",
    "route_topk",
    "route_scores",
    "route_hard",
    "route_soft",
    "route_hierarchical",
    "expert_capacity",
    "hard_kept_reference",
    "experts_dense",
    "experts_padded",
    "expert_load",
    "update_bias",
    "fine_grained",
]
