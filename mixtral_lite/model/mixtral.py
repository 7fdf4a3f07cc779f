"""The Mixtral decoder, top to bottom: norm, rotary embedding, attention, MoE feed-forward, block,
model.

Axis legend: B batch, T new tokens, S keys (cache slots), H query heads, KV key/value heads,
hd head dim, D hidden, E experts, K experts per token, V vocabulary.

Module names follow the original Mistral checkpoints (``wq wk wv wo``, ``w1 w2 w3``, ``gate``);
``weights/keymap.py`` holds the one table that maps file keys to them. The model is pure: no sampling,
tokenizer or cache allocation lives here; a ``KVCache`` is created by generation and passed in.

This is the reference: plain PyTorch, no accelerator. Faster versions of these modules (the CPU
kernels of ``mixtral_lite.cpu``) subclass them and are installed onto a model once; each is tested
against the module it replaces here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MixtralConfig
from .cache import KVCache
from .experts import dispatch_experts, swiglu
from .routing import (
    Routing,
    experts_dense,
    experts_padded,
    is_mixtral_routing,
    route_hard,
    route_hierarchical,
    route_scores,
    route_soft,
    route_topk,
)
from .yarn import softmax_scale, yarn_frequencies


class Linear(nn.Linear):
    """A bias-free ``nn.Linear`` (Mixtral's checkpoints have no biases)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)


class BiasLinear(nn.Linear):
    """An ``nn.Linear`` with a bias (Qwen2-MoE's q, k, v). Its own class, so the accelerator and
    int8, which multiply bias-free matrices, leave it as it is."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in float32, round to x's dtype, then scale (Hugging Face's order of rounding)."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same value
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, hd] for ``positions`` [B, T], in the half-split (Hugging Face) layout,
    multiplied by ``scale`` in float32 (YaRN's attention factor)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def inverse_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """1 / theta^(2i / hd) in float32, [hd / 2]."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def pairs_to_halves(x: torch.Tensor) -> torch.Tensor:
    """Rotary dims in interleaved pairs (x0, x1), (x2, x3), ... reordered to halves (evens, odds),
    so ``apply_rotary`` turns the same pairs; queries and keys reordered alike keep every dot product."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class Attention(nn.Module):
    """Grouped-query attention through ``scaled_dot_product_attention``.

    ``n_heads`` / ``n_kv_heads`` are the heads this module holds (all of them, or one rank's share
    under tensor parallelism); ``reduce`` combines partial outputs across ranks (identity here).
    """

    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        d, hd, a = config.hidden_size, config.head_dim, config.attention
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        qkv = BiasLinear if a.qkv_bias else Linear
        self.wq = qkv(d, self.n_heads * hd)
        self.wk = qkv(d, self.n_kv_heads * hd)
        self.wv = qkv(d, self.n_kv_heads * hd)
        self.wo = Linear(self.n_heads * hd, d)
        # The family options: q/k RMSNorm per head (Qwen3-MoE) or over the whole projection
        # (OLMoE), and OLMoE's clamp of q, k, v. None / None / None is Mixtral.
        self.qk_norm = a.qk_norm
        self.q_norm = self.k_norm = None
        if a.qk_norm is not None:
            full = a.qk_norm == "full"
            self.q_norm = RMSNorm(self.n_heads * hd if full else hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.n_kv_heads * hd if full else hd, config.rms_norm_eps)
        self.clip_qkv = a.clip_qkv
        self.reduce = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # [B, T, H*hd], [B, T, KV*hd] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(b, t, self.n_heads, hd)  # [B, T, H, hd]
        k = k.view(b, t, self.n_kv_heads, hd)  # [B, T, KV, hd]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd], [B, KV, T, hd]
        v = v.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, slots, k, v)  # [B, KV, S, hd]
        y = self.attend(q, k, v, mask, is_causal=mask is None and t > 1)  # [B, H, T, hd]
        y = self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * hd))
        return y if self.reduce is None else self.reduce(y)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, is_causal: bool
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + mask) v, each group of query heads sharing its key/value head.

        With a mask, each group of query heads is folded into the sequence axis ([B, KV, G*T, hd],
        the mask repeated per head of the group; one new token needs no copy: it broadcasts): the
        same products, in a layout CUDA's fused kernels take, where a mask with ``enable_gqa``
        falls back to the math backend (keys and values repeated to every head, scores in full)."""
        b, h, t, hd = q.shape
        kv = k.shape[1]
        if h != kv and mask is not None and mask.shape[1] == 1:
            g = h // kv
            folded = mask if t == 1 else mask.expand(b, 1, t, mask.shape[-1]).repeat(1, 1, g, 1)  # [B, 1, G*T, S]
            y = F.scaled_dot_product_attention(q.reshape(b, kv, g * t, hd), k, v, attn_mask=folded)
            return y.view(b, h, t, hd)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=h != kv)


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values are expanded from a latent
    c [B, 1, S, R] (R = kv LoRA rank) plus one rotary key k_pe [B, 1, S, r] shared by every head,
    and the cache holds only those two, R + r numbers per token and layer.

    Axis legend here: R kv LoRA rank, r rotary dims (``head_dim``), n no-rotary query/key dims,
    dv value dims. Without a cache, or for prefill, keys and values are expanded (``wkv_b``) as
    transformers does. Decoding (one new token) uses the absorbed form: the key half of ``wkv_b``
    is folded into the query and the value half applied after attending over the latent, so the
    cache is never expanded; the same products in another order.
    """

    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        a, d = config.attention, config.hidden_size
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = 1  # the cache holds one latent row per token, shared by every head
        self.rank, self.rope_dim = a.kv_lora_rank, config.head_dim
        self.nope_dim, self.v_dim = a.qk_nope_head_dim, a.v_head_dim
        qk = self.nope_dim + self.rope_dim
        if a.q_lora_rank is None:
            self.wq = Linear(d, self.n_heads * qk)
            self.wq_a = self.q_norm = self.wq_b = None
        else:
            self.wq = None
            self.wq_a = Linear(d, a.q_lora_rank)
            self.q_norm = RMSNorm(a.q_lora_rank, a.latent_norm_eps)
            self.wq_b = Linear(a.q_lora_rank, self.n_heads * qk)
        self.wkv_a = Linear(d, self.rank + self.rope_dim)
        self.kv_norm = RMSNorm(self.rank, a.latent_norm_eps)
        self.wkv_b = Linear(self.rank, self.n_heads * (self.nope_dim + self.v_dim))
        self.wo = Linear(self.n_heads * self.v_dim, d)
        self.scale = softmax_scale(config, qk)
        self.interleaved = a.rope_interleave
        self.reduce = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.n_heads
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(b, t, h, self.nope_dim + self.rope_dim).transpose(1, 2)  # [B, H, T, n + r]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c, k_pe = self.wkv_a(x).split([self.rank, self.rope_dim], dim=-1)  # [B, T, R], [B, T, r]
        c, k_pe = self.kv_norm(c)[:, None], k_pe[:, None]  # [B, 1, T, R], [B, 1, T, r]
        if self.interleaved:
            q_pe, k_pe = pairs_to_halves(q_pe), pairs_to_halves(k_pe)
        q_pe, k_pe = apply_rotary(q_pe, cos, sin), apply_rotary(k_pe, cos, sin)
        if cache is not None:
            c, k_pe = cache.update(self.layer_idx, slots, c, k_pe)  # [B, 1, S, R], [B, 1, S, r]
        if cache is not None and t == 1:
            y = self.attend_absorbed(q_nope, q_pe, c, k_pe, mask)
        else:
            y = self.attend_expanded(q_nope, q_pe, c, k_pe, mask)  # [B, H, T, dv]
        y = self.wo(y.transpose(1, 2).reshape(b, t, h * self.v_dim))
        return y if self.reduce is None else self.reduce(y)

    def attend_expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Keys [B, H, S, n + r] and values [B, H, S, dv] made from the latent, then attention."""
        b, h, t, _ = q_nope.shape
        s = c.shape[2]
        kv = self.wkv_b(c[:, 0]).view(b, s, h, self.nope_dim + self.v_dim).transpose(1, 2)  # [B, H, S, n + dv]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(b, h, s, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        is_causal = mask is None and t > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale)

    def attend_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """softmax((q_nope W_uk) c^T + q_pe k_pe^T) c W_uv^T: attention over the latent itself."""
        h = self.n_heads
        w = self.wkv_b.weight.unflatten(0, (h, self.nope_dim + self.v_dim))  # [H, n + dv, R]
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [H, n, R], [H, dv, R]
        q_c = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # [B, H, T, R]
        scores = (q_c @ c.transpose(-1, -2) + q_pe @ k_pe.transpose(-1, -2)) * self.scale  # [B, H, T, S]
        if mask is not None:
            scores = scores + mask
        p = torch.softmax(scores.float(), dim=-1).to(q_c.dtype)
        return torch.einsum("bhtr,hvr->bhtv", p @ c, w_uv)  # [B, H, T, dv]


class FeedForward(nn.Module):
    """A dense SwiGLU feed-forward (used by dense layers of DeepSeekMoE-style models)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden)
        self.w2 = Linear(hidden, dim)
        self.w3 = Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), None


class SparseMoE(nn.Module):
    """Router + stacked SwiGLU experts (w1, w3 [E, I, D]; w2 [E, D, I]).

    ``dispatch`` selects how the chosen experts run (see ``experts.dispatch_experts``); ``reduce``
    combines partial outputs across ranks under tensor or expert parallelism (identity here). The
    module is itself the dispatch's ``Experts``: ``expert(x, e)`` is one expert's product.

    ``config.moe.kind`` picks the router (see ``routing``); Mixtral's own rule is the plain path.
    Variants may add ``group_gate`` (hierarchical), ``shared`` (always-on shared experts, one SwiGLU
    of n_shared * I, or of Qwen2-MoE's own size), ``shared_gate`` (Qwen2-MoE: the shared output
    times sigmoid(Linear(h, 1))) and the ``expert_bias`` buffer [E] (auxiliary-loss-free balancing;
    DeepSeek-V3's ``e_score_correction_bias``).
    With ``record_routing`` set (training), each forward keeps its ``Routing`` in ``last_routing``.
    """

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        e, d, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.gate = Linear(d, e)
        self.w1 = nn.Parameter(torch.empty(e, i, d))
        self.w2 = nn.Parameter(torch.empty(e, d, i))
        self.w3 = nn.Parameter(torch.empty(e, i, d))
        self.dispatch = "auto"
        self.reduce = None
        moe = config.moe
        self.moe_config = moe
        self.plain = is_mixtral_routing(moe)
        self.group_gate = Linear(d, moe.num_groups) if moe.kind == "hierarchical" else None
        self.shared = FeedForward(d, config.shared_intermediate_size) if moe.n_shared_experts else None
        self.shared_gate = Linear(d, 1) if moe.shared_expert_gate else None
        if moe.bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(e))
        self.record_routing = False
        self.last_routing: Routing | None = None

    @property
    def n_experts(self) -> int:
        """Experts this module holds (all, or one rank's share under expert parallelism)."""
        return self.w1.shape[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        r = self.routing(x)
        if self.record_routing:
            self.last_routing = r
        y = self.mixture(x, r)
        if self.shared is not None:
            shared = self.shared(x)[0]
            y = y + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * shared)
        if self.reduce is not None:
            y = self.reduce(y)
        return y.view(shape), r.logits

    def routing(self, x: torch.Tensor) -> Routing:
        """The full routing decision for x [N, D] (every kind; capacity applies in training mode)."""
        moe = self.moe_config
        logits = F.linear(x.float(), self.gate.weight.float()) if moe.router_float32 else self.gate(x)
        if moe.kind == "hard":
            # Capacity depends on how many tokens share the batch, later ones included: dropping is
            # a training-time device, inference keeps every token so decoding stays causal.
            return route_hard(logits, moe.capacity_factor if self.training else None)
        if moe.kind == "soft":
            return route_soft(logits)
        if moe.kind == "hierarchical":
            return route_hierarchical(self.group_gate(x), logits, self.top_k, moe.top_k_groups)
        if self.plain:
            return Routing(logits, *route_topk(logits, self.top_k))
        return route_scores(
            logits,
            self.top_k,
            score_func=moe.score_func,
            bias=self.expert_bias if moe.bias_balancing else None,
            n_group=moe.n_group,
            topk_group=moe.topk_group,
            scaling=moe.routed_scaling_factor,
            normalize=moe.norm_topk_prob,
            group_score_topk=moe.group_score_topk,
        )

    def mixture(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """The routed experts' weighted sum for x [N, D]: soft routing mixes every expert, hard
        routing skips the tokens over capacity, the rest go through ``experts``."""
        if self.moe_config.kind == "soft" and self.dispatch != "reference":
            return experts_dense(x, *self.stacks(), r.weights)
        if r.kept is None:
            return self.experts(x, r.idx, r.weights)
        rows = r.kept.nonzero()[:, 0]  # tokens within capacity; the others add nothing
        return x.new_zeros(x.shape).index_copy(0, rows, self.experts(x[rows], r.idx[rows], r.weights[rows]))

    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every chosen expert (idx [N, K]) of every row of x [N, D], weighted (weights [N, K])."""
        if self.dispatch == "auto" and torch.is_grad_enabled() and self.w1.requires_grad and self.n_experts >= 16:
            # Training with many small experts: batched products beat a per-expert loop, whose
            # backward touches a full-size buffer per expert (docs/performance.md).
            return experts_padded(x, self.w1, self.w2, self.w3, idx, weights)
        return dispatch_experts(x, self, idx, weights, self.dispatch)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` on rows x [M, D]."""
        return swiglu(x, self.w1[e], self.w2[e], self.w3[e])

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The float expert stacks (w1, w2, w3)."""
        return self.w1, self.w2, self.w3


class Block(nn.Module):
    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        latent = config.attention.latent
        self.attention = LatentAttention(config, layer_idx) if latent else Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_dense_layer(layer_idx):  # DeepSeek's first layers, Qwen's mlp_only_layers
            self.feed_forward: nn.Module = FeedForward(config.hidden_size, config.dense_intermediate_size)
        else:
            self.feed_forward = SparseMoE(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        slots: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, slots)
        y, router_logits = self.feed_forward(self.ffn_norm(h))
        return h + y, router_logits


class Output(NamedTuple):
    logits: torch.Tensor  # [B, T, V] (or [B, 1, V] with last_only)
    router_logits: tuple[torch.Tensor, ...]  # per MoE layer, [B*T, E]


class Mixtral(nn.Module):
    """A Mixtral-style sparse MoE decoder.

    ``model(input_ids)`` returns logits [B, T, V]. For incremental decoding pass a ``KVCache`` and
    the cache ``slots`` [T] the new tokens occupy; ``positions`` [B, T] are their rotary positions
    (default: the slots) and ``attention_mask`` [B, T] marks real tokens (0 for left padding).
    """

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.config = config
        # ``_weight`` skips nn.Embedding's own init (reset_parameters below initialises every weight;
        # normal_ on the meta device would import torch._dynamo, ~80 MB and seconds, on every load).
        embedding = torch.empty(config.vocab_size, config.hidden_size)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # per device, made on first use
        # What cos and sin are multiplied by: YaRN's attention factor, else 1.
        self.rotary_scale = 1.0 if config.rope_scaling is None else yarn_frequencies(config, torch.device("cpu"))[1]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init: N(0, std) for matrices, ones for norms (a no-op on the meta device)."""
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
        return_router_logits: bool = False,
    ) -> torch.Tensor | Output:
        """Logits [B, T, V] for ``input_ids`` [B, T] (``Output`` with the router logits when asked)."""
        b, t = input_ids.shape
        dev = input_ids.device
        if cache is not None and slots is None:
            raise ValueError("slots: required with a cache (the cache positions of the new tokens)")
        if slots is None:
            slots = torch.arange(t, device=dev)
        if positions is None:
            positions = slots.expand(b, t) if attention_mask is None else _positions_from_mask(attention_mask)
        valid = None if attention_mask is None else attention_mask.bool()  # None: every token is real
        h = self.tok_embeddings(input_ids)
        if cache is not None:
            cache.record(slots, positions, _all_real(positions) if valid is None else valid)
        mask = self.attention_mask(slots, positions, valid, cache, h.dtype)
        cos, sin = rotary_cos_sin(positions, self.inverse_frequencies(dev), h.dtype, self.rotary_scale)
        router_logits = []
        for layer in self.layers:
            layer_dev = layer.attention_norm.weight.device
            if h.device != layer_dev:  # layers split across devices: move the activations along
                h, cos, sin = h.to(layer_dev), cos.to(layer_dev), sin.to(layer_dev)
                mask = None if mask is None else mask.to(layer_dev)
                slots = slots.to(layer_dev)
            h, r = layer(h, cos, sin, mask, cache, slots)
            if r is not None:
                router_logits.append(r)
        if last_only:
            h = h[:, -1:]
        h = h.to(self.norm.weight.device)
        logits = self.output(self.norm(h))
        if return_router_logits:
            return Output(logits, tuple(router_logits))
        return logits

    def attention_mask(
        self,
        slots: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        cache: KVCache | None,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """The additive mask [B, 1, T, S] every layer shares, or None for plain causal attention
        (no cache, no padding, no window that cuts in). ``valid`` [B, T]: real tokens (None: all)."""
        window = self.config.sliding_window
        if cache is not None:
            arange = torch.arange(cache.max_seq_len, device=slots.device)
            return _additive(build_mask(slots, positions, arange, cache.pos, cache.valid, window), dtype)
        if valid is None and (window is None or window >= slots.shape[0]):
            return None
        valid = _all_real(positions) if valid is None else valid
        return _additive(build_mask(slots, positions, slots, positions, valid, window), dtype)

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        """The rotary embedding's frequencies on ``device``, computed once (outside compiled graphs)."""
        inv = None if torch.compiler.is_compiling() else self._inv_freq.get(device)
        if inv is None:
            if self.config.rope_scaling is not None:
                inv = yarn_frequencies(self.config, device)[0]
            else:
                inv = inverse_frequencies(self.config.head_dim, self.config.rope_theta, device)
            if not torch.compiler.is_compiling():
                self._inv_freq[device] = inv
        return inv


def build_mask(
    q_slots: torch.Tensor,
    q_pos: torch.Tensor,
    k_slots: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, S]: causal in slot order, real keys only, within the window.

    A query always sees its own slot, so padded rows never end up with no key at all.
    """
    causal = k_slots[None, None, :] <= q_slots[None, :, None]  # [1, T, S]
    own = k_slots[None, None, :] == q_slots[None, :, None]
    mask = causal & (k_valid[:, None, :] | own)  # [B, T, S]
    if window is not None:
        mask = mask & ((q_pos[:, :, None] - k_pos[:, None, :]) < window)
    return mask[:, None]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as 0 / -inf, made once for all layers (SDPA converts a boolean mask per call)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _all_real(positions: torch.Tensor) -> torch.Tensor:
    return torch.ones(positions.shape, dtype=torch.bool, device=positions.device)


def _positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: each row's real tokens get positions 0, 1, ...; pads get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


__all__ = [
    "Attention",
    "BiasLinear",
    "Block",
    "FeedForward",
    "LatentAttention",
    "Linear",
    "Mixtral",
    "Output",
    "RMSNorm",
    "SparseMoE",
    "apply_rotary",
    "build_mask",
    "inverse_frequencies",
    "pairs_to_halves",
    "rotary_cos_sin",
]
