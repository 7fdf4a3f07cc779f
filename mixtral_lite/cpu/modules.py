"""The accelerated modules: each subclasses the reference module it replaces and overrides the one
method where the CPU kernels pay, deferring to the reference (``super()``) for inputs they do not
fit (autograd, ``torch.compile``, another device or dtype, too many rows).

``install.py`` swaps them in by class, as ``torch.nn.utils.parametrize`` does: parameters, buffers,
names and ``state_dict`` stay the reference module's; only the methods change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.cache import KVCache
from ..model.mixtral import Attention, Block, Linear, Mixtral, RMSNorm, SparseMoE
from ..model.quant import Int8Linear, Int8MoE
from ..model.quant4 import Int4Linear, Int4MoE
from .gemv import experts_pair, split_parts
from .layer import LayerPlan, LayerWeights, StepInputs, weights_key
from .native import (
    Projection,
    native_attention,
    native_attention_block,
    native_experts,
    native_mask,
    native_prefill_attention,
    native_rmsnorm,
    use_native,
    use_native_attention,
    use_native_attention_block,
    use_native_experts,
    use_native_mask,
    use_native_prefill_attention,
    use_native_rmsnorm,
)
from .native4 import native_experts_int4, use_native_experts_int4
from .products import linear, linear_int4, linear_int8, swiglu, swiglu_int4, swiglu_int8
from .watch import Watch

# Reduced-precision attention runs in float32 on a CPU: PyTorch's float32 kernel is faster there
# even with bfloat16 units (docs/performance.md).
ATTENTION_UPCAST = (torch.bfloat16, torch.float16)


class CpuLinear(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class CpuInt8Linear(Int8Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_int8(x, self.weight, self.scale)


class CpuInt4Linear(Int4Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_int4(x, self.weight, self.scale, self.offset)


class CpuRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_native_rmsnorm(x, self.weight):
            return native_rmsnorm(x, self.weight, self.eps)
        return super().forward(x)


class CpuAttention(Attention):
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, is_causal: bool
    ) -> torch.Tensor:
        if not is_causal and use_native_attention(q, k, v, mask):  # decoding against the cache
            return native_attention(q, k, v, mask)
        if use_native_prefill_attention(q, k, v, mask, is_causal):  # many query rows: register tiles
            return native_prefill_attention(q, k, v, mask)
        if q.dtype in ATTENTION_UPCAST and q.device.type == "cpu":
            m = None if mask is None else mask.float()
            gqa = self.n_heads != self.n_kv_heads
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=m, is_causal=is_causal, enable_gqa=gqa
            )
            return y.to(q.dtype)
        return super().attend(q, k, v, mask, is_causal=is_causal)


class CpuSparseMoE(SparseMoE):
    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.dispatch == "auto":
            ws = (self.w1, self.w2, self.w3)
            if use_native_experts(x, ws, None, idx):  # decoding: every chosen expert in one call
                return native_experts(x, ws, None, idx, weights)
            if self._pairs(x, idx):
                return _experts_in_pairs(x, ws, idx, weights)
        return super().experts(x, idx, weights)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return swiglu(x, self.w1[e], self.w2[e], self.w3[e])

    def _pairs(self, x: torch.Tensor, idx: torch.Tensor) -> bool:
        """Top-2 of a few float32 tokens without the C kernel: both experts in one product."""
        if idx.shape[1] != 2 or idx.numel() > self.n_experts or torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.w1.requires_grad):
            return False
        return split_parts(x, self.w1[0]) > 1 and not use_native(x, self.w1[0])


def _experts_in_pairs(
    x: torch.Tensor, ws: tuple[torch.Tensor, ...], idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``experts_per_token`` with each token's two experts in one product per matrix (``gemv``)."""
    idx, order = idx.sort(-1)  # ascending expert ids (the sum of two products is the same either way)
    weights = weights.gather(-1, order)
    w1, w2, w3 = ws
    rows = [
        experts_pair(x[n : n + 1], w1, w2, w3, e, w)
        for n, (e, w) in enumerate(zip(idx.tolist(), weights.tolist(), strict=True))
    ]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


class CpuInt8MoE(Int8MoE):
    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.dispatch == "auto":
            qs, ss = (self.w1, self.w2, self.w3), self.scales()
            if use_native_experts(x, qs, ss, idx):  # decoding: every chosen expert in one call
                return native_experts(x, qs, ss, idx, weights)
        return super().experts(x, idx, weights)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        s1, s2, s3 = self.scales()
        return swiglu_int8(x, (self.w1[e], self.w2[e], self.w3[e]), (s1[e], s2[e], s3[e]))


class CpuInt4MoE(Int4MoE):
    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.dispatch == "auto":
            parts = tuple(self.parts(n) for n in ("w1", "w2", "w3"))
            if use_native_experts_int4(x, parts, idx):  # decoding: every chosen expert in one call
                return native_experts_int4(x, parts, idx, weights)
        return super().experts(x, idx, weights)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return swiglu_int4(x, tuple((q[e], s[e], b[e]) for q, s, b in map(self.parts, ("w1", "w2", "w3"))))


class CpuBlock(Block):
    """Decoding runs the whole layer as one kernel call (``layer.LayerPlan``), or its attention half
    as one call; the plan is built at the first step and rebuilt when any weight is replaced, moved
    or converted (its key holds every weight's identity and address), so changing weights after
    installing is caught here, not left stale."""

    step_inputs: StepInputs  # the model's, set by ``install``: shared by its layers

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        slots: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if mask is None or slots is None or type(cache) is not KVCache or torch.is_grad_enabled():
            return super().forward(x, cos, sin, mask, cache, slots)
        if torch.compiler.is_compiling():  # compiled graphs keep PyTorch's ops
            return super().forward(x, cos, sin, mask, cache, slots)
        i = self.attention.layer_idx
        caches = (cache.k[i], cache.v[i])
        plan = self._plan(x.dtype)
        if plan is not None:
            out = plan.run(x, cos, sin, mask, caches, slots, self.step_inputs)
            if out is not None:
                return out
        h = self._attention_half(x, cos, sin, mask, caches, slots)
        if h is None:
            return super().forward(x, cos, sin, mask, cache, slots)
        y, router_logits = self.feed_forward(self.ffn_norm(h))
        return h + y, router_logits

    def _plan(self, dtype: torch.dtype) -> LayerPlan | None:
        plan = self.__dict__.get("_layer_plan")
        if plan is not None and plan.dtype is dtype and plan.watch is not None and plan.watch.unchanged():
            return plan if plan.ok else None
        weights = self._layer_weights()
        if weights is None:
            return None
        key = weights_key(dtype, weights)
        if plan is None or plan.key != key:
            plan = LayerPlan(key, dtype, weights)
            self.__dict__["_layer_plan"] = plan  # a plain attribute (not a module or tensor)
        plan.watch = self._watch()
        return plan if plan.ok else None

    def _watch(self) -> Watch:
        """What ``_layer_weights`` and ``declined`` read, for ``_plan``'s check by identity."""
        att, ff, an, fn = self.attention, self.feed_forward, self.attention_norm, self.ffn_norm
        projections = dict(zip(("wq", "wk", "wv", "wo"), (att.wq, att.wk, att.wv, att.wo), strict=True))
        children = [(self, "attention", att), (self, "feed_forward", ff), (self, "attention_norm", an)]
        children += [(self, "ffn_norm", fn), (ff, "gate", ff.gate)]
        children += [(att, name, m) for name, m in projections.items()]
        settings = [(att, a) for a in ("qk_norm", "clip_qkv", "reduce", "n_heads", "n_kv_heads", "head_dim")]
        settings += [(ff, a) for a in ("plain", "shared", "record_routing", "dispatch", "reduce", "top_k")]
        settings += [(an, "eps"), (fn, "eps")]
        return Watch(children, (att, ff, an, fn, ff.gate, *projections.values()), settings)

    def declined(self) -> str | None:
        """Why the one-call layer and the fused attention half never run this layer (a part that
        is not Mixtral's: the kernels compute Mixtral's layer only), or None."""
        att, ff = self.attention, self.feed_forward
        if type(att) is not CpuAttention:
            return f"{type(att).__name__}"
        if att.qk_norm is not None or att.clip_qkv is not None:
            return "q/k norm or clip_qkv"
        if not isinstance(ff, SparseMoE):
            return "dense feed-forward layer"
        if not ff.plain:
            return "routing other than Mixtral's"
        if ff.shared is not None:
            return "shared experts"
        return None

    def _layer_weights(self) -> LayerWeights | None:
        """The weights the one-call layer reads, or None where a part is not the plain Mixtral one
        (other routers, shared experts, parallelism, recorded routing, another dispatch)."""
        att, ff, an, fn = self.attention, self.feed_forward, self.attention_norm, self.ffn_norm
        if type(ff) not in (CpuSparseMoE, CpuInt8MoE, CpuInt4MoE):  # a dense FFN, or experts living elsewhere
            return None
        if self.declined() is not None or ff.record_routing or ff.dispatch != "auto":
            return None
        if ff.reduce is not None or att.reduce is not None:
            return None
        found = _projections(att)
        if found is None or type(ff.gate) is not CpuLinear:
            return None
        projections, projection_offsets = found
        scales = offsets = None
        if isinstance(ff, Int8MoE):
            scales = ff.scales()
        elif isinstance(ff, Int4MoE):
            scales = (ff.w1_scale, ff.w2_scale, ff.w3_scale)
            offsets = (ff.w1_offset, ff.w2_offset, ff.w3_offset)
        return LayerWeights(
            an.weight, an.eps, projections, fn.weight, fn.eps, ff.gate.weight, (ff.w1, ff.w2, ff.w3), scales,
            att.n_heads, att.n_kv_heads, att.head_dim, ff.top_k, projection_offsets, offsets,
        )  # fmt: skip

    def _attention_half(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        caches: tuple[torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
    ) -> torch.Tensor | None:
        """``x + attention(attention_norm(x))`` as one kernel call, or None where it does not fit."""
        att, norm = self.attention, self.attention_norm
        if type(att) is not CpuAttention or att.qk_norm is not None or att.clip_qkv is not None:
            return None  # the kernel computes Mixtral's attention only
        found = _projections(att)
        if found is None or att.reduce is not None:
            return None
        projections, offsets = found
        if not use_native_attention_block(x, norm.weight, projections, cos, att.head_dim, caches, mask, offsets):
            return None
        return native_attention_block(
            x, norm.weight, norm.eps, projections, cos, sin, att.head_dim, caches, slots, mask, offsets
        )


def _projections(att: Attention) -> tuple[tuple[Projection, ...], tuple[torch.Tensor, ...] | None] | None:
    """(weight, int8 scale or None) of wq, wk, wv, wo when each is a plain product the kernel may
    compute (``CpuLinear``, ``CpuInt8Linear``, or ``CpuInt4Linear``: codes and float16 scales), and
    the int4 offsets (None for the others), else None."""
    out, offsets = [], []
    for m in (att.wq, att.wk, att.wv, att.wo):
        kind = type(m)
        if kind is CpuLinear:
            out.append((m.weight, None))
        elif kind is CpuInt8Linear:
            out.append((m.weight, m.scale))
        elif kind is CpuInt4Linear:
            out.append((m.weight, m.scale))
            offsets.append(m.offset)
        else:
            return None
    if offsets and len(offsets) != len(out):  # mixed types: not one call
        return None
    return tuple(out), tuple(offsets) if offsets else None


class CpuMixtral(Mixtral):
    def attention_mask(
        self,
        slots: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        cache: KVCache | None,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        if cache is not None and use_native_mask(slots, positions, cache.pos, cache.valid, dtype):
            return native_mask(slots, positions, cache.pos, cache.valid, self.config.sliding_window, dtype)
        return super().attention_mask(slots, positions, valid, cache, dtype)


# reference class -> its accelerated version
ACCELERATED = {
    Linear: CpuLinear,
    Int8Linear: CpuInt8Linear,
    RMSNorm: CpuRMSNorm,
    Attention: CpuAttention,
    SparseMoE: CpuSparseMoE,
    Int8MoE: CpuInt8MoE,
    Int4Linear: CpuInt4Linear,
    Int4MoE: CpuInt4MoE,
    Block: CpuBlock,
    Mixtral: CpuMixtral,
}
REFERENCE = {fast: ref for ref, fast in ACCELERATED.items()}

__all__ = ["ACCELERATED", "REFERENCE", *(c.__name__ for c in ACCELERATED.values())]
