"""The Mixtral decoder, top to bottom: norm, rotary embedding, attention, MoE feed-forward, block,
model.

Axis legend: B batch, T new tokens, S keys (cache slots), H query heads, KV key/value heads,
hd head dim, D hidden, E experts, K experts per token, V vocabulary.

Module names follow the original Mistral checkpoints (``wq wk wv wo``, ``w1 w2 w3``, ``gate``);
``checkpoint.py`` holds the one table that maps file keys to them. The model is pure: no sampling,
tokenizer or cache allocation lives here; a ``KVCache`` is created by generation and passed in.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import MixtralConfig
from .moe import dispatch_experts, linear, route_topk
from .native import (
    Projection,
    native_attention,
    native_attention_block,
    native_experts,
    native_mask,
    native_norm_gate,
    native_prefill_attention,
    native_qkv,
    native_rmsnorm,
    use_native_attention,
    use_native_attention_block,
    use_native_experts,
    use_native_mask,
    use_native_norm_gate,
    use_native_prefill_attention,
    use_native_qkv,
    use_native_rmsnorm,
)
from .native_layer import LayerPlan, LayerWeights, weights_key
from .routing import (
    Routing,
    experts_dense,
    experts_padded,
    is_mixtral_routing,
    route_hard,
    route_hierarchical,
    route_scores,
    route_soft,
)


class Linear(nn.Linear):
    """``nn.Linear`` (no bias) through ``moe.linear``: on a CPU without native bfloat16 products,
    several rows (prefill, batched decode) multiply in float32."""

    plain_product = True  # forward is x @ weight.T, nothing else (the fused kernels rely on it)
    scale = None  # no int8 scales (``quant.Int8Linear`` has them); a plain attribute read, no lookup miss

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in float32, round to x's dtype, then scale (Hugging Face's order of rounding)."""
        if use_native_rmsnorm(x, self.weight):  # decoding on the CPU: one kernel call (native.py)
            return native_rmsnorm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same value
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, hd] for ``positions`` [B, T], in the half-split (Hugging Face) layout."""
    freqs = positions.float()[..., None] * _inv_freq(head_dim, theta, positions.device)  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


_INV_FREQ: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """1 / theta^(2i / hd) in float32, computed once per (hd, theta, device) outside compiled graphs."""
    key = (head_dim, theta, device)
    cached = None if torch.compiler.is_compiling() else _INV_FREQ.get(key)
    if cached is not None:
        return cached
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if not torch.compiler.is_compiling():
        _INV_FREQ[key] = inv
    return inv


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


ATTENTION_UPCAST_ON_CPU = (torch.bfloat16, torch.float16)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, is_causal: bool, gqa: bool
) -> torch.Tensor:
    """``scaled_dot_product_attention``; in float32 for bfloat16/float16 on a CPU, where PyTorch's
    float32 kernel is faster even with native bfloat16 units (decode, one query row: 38 vs 148 us
    per layer on AVX2; AVX-512 BF16: 37 vs 78 us at 160 keys, 84 vs 501 us at 1024). Decoding
    against a cache takes the compiled kernel (``native.py``): the same float32 arithmetic without
    the copies (bfloat16, 8 heads x 160 keys: 15 instead of 91 us)."""
    if not is_causal and use_native_attention(q, k, v, mask):
        return native_attention(q, k, v, mask)
    if use_native_prefill_attention(q, k, v, mask, is_causal):  # many rows: register tiles, no copies
        return native_prefill_attention(q, k, v, mask)
    if q.dtype in ATTENTION_UPCAST_ON_CPU and q.device.type == "cpu":
        m = None if mask is None else mask.float()
        y = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=m, is_causal=is_causal, enable_gqa=gqa
        )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query attention through ``scaled_dot_product_attention``.

    ``n_heads`` / ``n_kv_heads`` are the heads this module holds (all of them, or one rank's share
    under tensor parallelism); ``reduce`` combines partial outputs across ranks (identity here).
    """

    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.wq = Linear(d, self.n_heads * hd)
        self.wk = Linear(d, self.n_kv_heads * hd)
        self.wv = Linear(d, self.n_kv_heads * hd)
        self.wo = Linear(self.n_heads * hd, d)
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
        projections = self._projections()
        if projections is not None and use_native_qkv(x, projections, cos, hd):  # decoding: one call
            q, k, v = native_qkv(x, projections, cos, sin, hd)
            q = q.view(b, t, self.n_heads, hd).transpose(1, 2)  # [B, H, T, hd]
            k = k.view(b, t, self.n_kv_heads, hd).transpose(1, 2)  # [B, KV, T, hd]
            v = v.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        else:
            q = self.wq(x).view(b, t, self.n_heads, hd).transpose(1, 2)  # [B, H, T, hd]
            k = self.wk(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)  # [B, KV, T, hd]
            v = self.wv(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, slots, k, v)  # [B, KV, S, hd]
        y = attention(q, k, v, mask, is_causal=mask is None and t > 1, gqa=self.n_heads != self.n_kv_heads)
        y = self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        return y if self.reduce is None else self.reduce(y)

    def _projections(self, with_output: bool = False) -> tuple[Projection, ...] | None:
        """(weight, int8 scale or None) of wq, wk, wv (and wo) when each is a plain product
        (``plain_product``: ``Linear``, ``quant.Int8Linear``), so the kernel may compute them; else None."""
        projections = []
        for name in ("wq", "wk", "wv", "wo") if with_output else ("wq", "wk", "wv"):
            m = self._modules[name]  # read from the dicts directly: this runs for every layer and step
            if not type(m).__dict__.get("plain_product", False):
                return None
            projections.append((_tensor(m, "weight"), m._buffers.get("scale")))  # Int8Linear's; Linear: None
        return tuple(projections)


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

    ``dispatch`` selects the expert kernel (see ``moe.dispatch_experts``); ``reduce`` combines
    partial outputs across ranks under tensor or expert parallelism (identity here).

    ``config.moe.kind`` picks the router (see ``routing``); Mixtral's own rule is the fast path.
    Variants may add ``group_gate`` (hierarchical), ``shared`` (always-on shared experts, one SwiGLU
    of n_shared * I) and the ``expert_bias`` buffer [E] (auxiliary-loss-free balancing).
    With ``record_routing`` set (training), each forward keeps its ``Routing`` in ``last_routing``.
    """

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        e, d, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(d, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, i, d))
        self.w2 = nn.Parameter(torch.empty(e, d, i))
        self.w3 = nn.Parameter(torch.empty(e, i, d))
        self.dispatch = "auto"
        self.reduce = None
        moe = config.moe
        self.moe_config = moe
        self.plain = is_mixtral_routing(moe)
        self.group_gate = nn.Linear(d, moe.num_groups, bias=False) if moe.kind == "hierarchical" else None
        self.shared = FeedForward(d, moe.n_shared_experts * i) if moe.n_shared_experts else None
        if moe.bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(e))
        self.record_routing = False
        self.last_routing: Routing | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> router logits [N, E], chosen experts [N, K], their weights [N, K] (float32)."""
        if not self.plain:
            r = self.routing(x)
            return r.logits, r.idx, r.weights
        logits = linear(x, self.gate.weight)  # decoding: the kernel's product (native.py)
        idx, weights = route_topk(logits, self.top_k)
        return logits, idx, weights

    def routing(self, x: torch.Tensor) -> Routing:
        """The full routing decision for x [N, D] (every kind; capacity applies in training mode)."""
        moe = self.moe_config
        logits = self.gate(x)
        if moe.kind == "hard":
            # Capacity depends on how many tokens share the batch, later ones included: dropping is
            # a training-time device, inference keeps every token so decoding stays causal.
            return route_hard(logits, moe.capacity_factor if self.training else None)
        if moe.kind == "soft":
            return route_soft(logits)
        if moe.kind == "hierarchical":
            return route_hierarchical(self.group_gate(x), logits, self.top_k, moe.top_k_groups)
        if self.plain:
            idx, weights = route_topk(logits, self.top_k)
            return Routing(logits, idx, weights)
        return route_scores(
            logits,
            self.top_k,
            score_func=moe.score_func,
            bias=self.expert_bias if moe.bias_balancing else None,
            n_group=moe.n_group,
            topk_group=moe.topk_group,
            scaling=moe.routed_scaling_factor,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        if self.plain and not self.record_routing:
            logits, idx, weights = self.route(x)
            y = dispatch_experts(x, self.w1, self.w2, self.w3, idx, weights, self.dispatch)
        else:
            r = self.routing(x)
            logits = r.logits
            y = self._experts(x, r)
            if self.record_routing:
                self.last_routing = r
        if self.shared is not None:
            y = y + self.shared(x)[0]
        if self.reduce is not None:
            y = self.reduce(y)
        return y.view(shape), logits

    def fused_decode(self, h: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Decoding on the CPU: ``(h + self(norm(h))[0], router logits)`` as two kernel calls around
        the router's top-k (``native.py``; the same roundings as the plain ops), or None where this
        layer is not the plain Mixtral one (other routers, shared experts, parallelism, training,
        another expert kernel)."""
        kernel, scales = self.kernel_experts()
        if not kernel:
            return None
        x = h.reshape(-1, h.shape[-1])
        ws, norm_w, gate_w = (self.w1, self.w2, self.w3), norm.weight, self.gate.weight
        if not use_native_norm_gate(x, norm_w, gate_w) or not use_native_experts(x, ws, scales, None):
            return None
        n, logits = native_norm_gate(x, norm_w, norm.eps, gate_w)
        idx, weights = route_topk(logits, self.top_k)
        return native_experts(n, ws, scales, idx, weights, residual=x).view(h.shape), logits

    def kernel_experts(self) -> tuple[bool, tuple[torch.Tensor, ...] | None]:
        """(whether the kernel may run this layer's experts and router, their int8 scales or None):
        not for other routers, shared experts, parallelism, recorded routing or another expert kernel."""
        if not self.plain or self.record_routing or self.shared is not None or self.reduce is not None:
            return False, None
        if self.dispatch == "auto":
            return True, None
        native_scales = getattr(self.dispatch, "native_scales", None)  # quant.Int8Experts
        scales = native_scales() if native_scales is not None else None
        return scales is not None, scales

    def _experts(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        if self.moe_config.kind == "soft" and self.dispatch != "reference":
            return experts_dense(x, self.w1, self.w2, self.w3, r.weights)
        dispatch = self.dispatch
        if dispatch == "auto" and torch.is_grad_enabled() and self.w1.requires_grad and len(self.w1) >= 16:
            # Training with many small experts: batched products beat a per-expert loop, whose
            # backward touches a full-size buffer per expert (measured: 31 experts 1.6x, 8 experts 0.9x).
            dispatch = experts_padded
        if r.kept is None:
            return dispatch_experts(x, self.w1, self.w2, self.w3, r.idx, r.weights, dispatch)
        rows = r.kept.nonzero()[:, 0]  # tokens within capacity; the others add nothing
        y = dispatch_experts(x[rows], self.w1, self.w2, self.w3, r.idx[rows], r.weights[rows], dispatch)
        return x.new_zeros(x.shape).index_copy(0, rows, y)


class Block(nn.Module):
    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.moe
        if layer_idx < moe.first_k_dense:  # DeepSeekMoE: the first layers keep a dense FFN
            dense = moe.dense_intermediate_size or config.intermediate_size * moe.num_experts_per_tok
            self.feed_forward: nn.Module = FeedForward(config.hidden_size, dense)
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
        fused = self._fused_layer(x, cos, sin, mask, cache, slots)  # decoding on the CPU: one kernel call
        if fused is not None:
            return fused
        h = self._fused_attention(x, cos, sin, mask, cache, slots)
        if h is None:
            h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, slots)
        ff, norm = self.feed_forward, self.ffn_norm
        if type(ff) is SparseMoE and type(norm) is RMSNorm:
            fused = ff.fused_decode(h, norm)  # decoding on the CPU: two kernel calls
            if fused is not None:
                return fused
        y, router_logits = ff(norm(h))
        return h + y, router_logits

    def _fused_layer(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        slots: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Decoding on the CPU: the whole layer (both halves as ``_fused_attention`` and
        ``SparseMoE.fused_decode``, the router in the kernel) as one call through a ``LayerPlan``
        built at the first step and rebuilt when a weight or setting changes; None where the layer,
        the cache or the inputs are not the plain ones."""
        if mask is None or slots is None or type(cache) is not KVCache or torch.is_grad_enabled():
            return None
        if torch.compiler.is_compiling():  # compiled graphs keep PyTorch's ops
            return None
        weights = self._layer_weights()
        if weights is None:
            return None
        key = weights_key(x.dtype, weights)
        plan = self.__dict__.get("_plan")
        if plan is None or plan.key != key:
            plan = LayerPlan(key, x.dtype, weights)
            self.__dict__["_plan"] = plan  # a plain attribute (not a module or tensor)
        if not plan.ok:
            return None
        i = self._modules["attention"].layer_idx
        return plan.run(x, cos, sin, mask, (cache.k[i], cache.v[i]), slots)

    def _layer_weights(self) -> LayerWeights | None:
        """The weights the one-call layer reads, or None where a part is not the plain Mixtral one
        (other modules or routers, shared experts, parallelism, training, another expert kernel)."""
        mods = self._modules
        att, ff, an, fn = mods["attention"], mods["feed_forward"], mods["attention_norm"], mods["ffn_norm"]
        if type(att) is not Attention or type(ff) is not SparseMoE or not type(an) is type(fn) is RMSNorm:
            return None
        projections = att._projections(with_output=True)
        kernel, scales = ff.kernel_experts()
        if att.reduce is not None or projections is None or not kernel:
            return None
        return LayerWeights(
            _tensor(an, "weight"), an.eps, projections, _tensor(fn, "weight"), fn.eps,
            _tensor(ff._modules["gate"], "weight"), (_tensor(ff, "w1"), _tensor(ff, "w2"), _tensor(ff, "w3")), scales,
            att.n_heads, att.n_kv_heads, att.head_dim, ff.top_k,
        )  # fmt: skip

    def _fused_attention(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        slots: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Decoding on the CPU: ``x + attention(attention_norm(x))`` as one kernel call (``native.py``;
        the same roundings as the modules' ops), or None where the layer or the cache is not the plain
        one (tensor parallelism, another cache class, modules replaced)."""
        att, norm = self.attention, self.attention_norm
        if cache is None or type(cache) is not KVCache or type(att) is not Attention or type(norm) is not RMSNorm:
            return None
        if att.reduce is not None or x.device.type != "cpu" or slots is None:
            return None
        projections = att._projections(with_output=True)
        if projections is None:
            return None
        caches, norm_w = (cache.k[att.layer_idx], cache.v[att.layer_idx]), norm.weight
        if not use_native_attention_block(x, norm_w, projections, cos, att.head_dim, caches, mask):
            return None
        return native_attention_block(x, norm_w, norm.eps, projections, cos, sin, att.head_dim, caches, slots, mask)


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``getattr(module, name)`` for a parameter or buffer, without nn.Module's attribute fallback."""
    t = module._parameters.get(name)
    if t is None:
        t = module._buffers.get(name)
    return t if t is not None else getattr(module, name)


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

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> Mixtral:
        """Load a checkpoint folder; same arguments as ``mixtral_lite.load_model``."""
        from .loading import load_model

        return load_model(path, **kwargs)

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
        b, t = input_ids.shape
        dev = input_ids.device
        if cache is not None and slots is None:
            raise ValueError("slots: required with a cache (the cache positions of the new tokens)")
        if slots is None:
            slots = torch.arange(t, device=dev)
        if positions is None:
            positions = slots.expand(b, t) if attention_mask is None else _positions_from_mask(attention_mask)
        valid = torch.ones(b, t, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        window = self.config.sliding_window
        h = self.tok_embeddings(input_ids)
        if cache is not None:
            cache.record(slots, positions, valid)
            if use_native_mask(slots, positions, cache.pos, cache.valid, h.dtype):  # CPU: one call
                mask = native_mask(slots, positions, cache.pos, cache.valid, window, h.dtype)
            else:
                arange = torch.arange(cache.max_seq_len, device=dev)
                mask = _additive(build_mask(slots, positions, arange, cache.pos, cache.valid, window), h.dtype)
        elif attention_mask is None and (window is None or window >= t):
            mask = None  # plain causal
        else:
            mask = _additive(build_mask(slots, positions, slots, positions, valid, window), h.dtype)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
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


def _positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: each row's real tokens get positions 0, 1, ...; pads get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


__all__ = ["Mixtral", "Output", "RMSNorm", "Attention", "SparseMoE", "FeedForward", "Block", "build_mask"]
