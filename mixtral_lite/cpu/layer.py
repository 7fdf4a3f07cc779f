"""A whole decoder layer in one kernel call (decoding on the CPU): attention half, norm, router,
the chosen experts and both residuals (``csrc/layer.c``).

Checking a layer's dozen weights and building the call's arguments costs more Python time than
the call itself, so it is done once: a ``LayerPlan`` holds the checked weights and the kernel's
argument struct, and is rebuilt when its ``key`` changes (any weight replaced, moved or converted:
the key holds every weight's identity and address, the modules' settings and the activations'
dtype). What changes every step (the activations, the cache, the mask, the rotary rows) is checked
at each call.

The router runs in the kernel: softmax in float32 (the C library's ``expf``: the probabilities may
differ from ``torch.softmax``'s in the last bit), then the top-k with the selection torch.topk's CPU
kernel makes, so the same experts are chosen, ties included. The rest rounds as the separate fused
entries (``native.py``) round; the tests tie the two.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from . import build, native
from .build import loaded
from .native import _DTYPES, _INT4, _INT8, NATIVE_MAX_ROWS, Projection, int4_group_size
from .watch import Watch

# Rows of a decode step (B rows of one token) the one-call layer takes: each weight row is read
# once for all of them, so serving many requests at once reads the weights once per step. A
# prompt's chunk (T > 1) keeps the products' limit, NATIVE_MAX_ROWS: past it PyTorch's GEMM and
# the many-row attention are faster.
LAYER_MAX_ROWS = 64  # csrc/kernel.h's LAYER_MAXM

_POINTERS = (
    "attention_norm", "wq", "wk", "wv", "wo", "sq", "sk", "sv", "so", "bq", "bk", "bv", "bo",
    "ffn_norm", "gate", "w1", "w3", "w2", "s1", "s3", "s2", "b1", "b3", "b2",
)  # fmt: skip


class _LayerStruct(ctypes.Structure):
    """``Layer`` of csrc/layer.c, field for field."""

    _fields_ = [(name, ctypes.c_void_p) for name in _POINTERS] + [
        ("attention_eps", ctypes.c_float),
        ("ffn_eps", ctypes.c_float),
        ("wtype_attention", ctypes.c_int),
        ("wtype_experts", ctypes.c_int),
        ("bf16", ctypes.c_int),
        *[(name, ctypes.c_long) for name in ("D", "H", "KV", "hd", "E", "I", "K", "G")],
    ]


class LayerWeights(NamedTuple):
    """What the one-call layer reads, gathered by ``modules.CpuBlock``: the two norms' weights and eps,
    wq wk wv wo as (weight, int8 scale or None), the router's weight, the stacked experts
    (w1, w2, w3) and their int8 scales (or None), the attention heads and experts per token. int4
    weights: the codes, their float16 group scales in place of the int8 ones, and the offsets."""

    attention_norm: torch.Tensor
    attention_eps: float
    projections: tuple[Projection, ...]
    ffn_norm: torch.Tensor
    ffn_eps: float
    gate: torch.Tensor
    experts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    expert_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    top_k: int
    projection_offsets: tuple[torch.Tensor, ...] | None = None  # int4 wq wk wv wo
    expert_offsets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # int4 w1 w2 w3


def weights_key(dtype: torch.dtype, weights: LayerWeights) -> tuple:
    """Everything a plan depends on, cheap to compare: the activations' dtype, the settings, and
    each weight's identity and address."""
    (wq, sq), (wk, sk), (wv, sv), (wo, so) = weights.projections
    ts = (weights.attention_norm, weights.ffn_norm, weights.gate, *weights.experts, wq, wk, wv, wo)
    ts += tuple(s for s in (sq, sk, sv, so) if s is not None) + (weights.expert_scales or ())
    ts += (weights.projection_offsets or ()) + (weights.expert_offsets or ())
    settings = (dtype, weights.attention_eps, weights.ffn_eps, weights.n_heads, weights.n_kv_heads, weights.head_dim)
    settings += (weights.top_k, weights.expert_scales is None, sq is None, len(ts))
    settings += (weights.projection_offsets is None, weights.expert_offsets is None)
    return settings + tuple(map(id, ts)) + tuple([t.data_ptr() for t in ts])


def _projections_ok(dtype: torch.dtype, d: int, weights: LayerWeights) -> bool:
    """``native.projections_ok`` for wq, wk, wv and wo, with the heads' counts."""
    (wq, _), (wk, _) = weights.projections[:2]
    hd, h, kv = weights.head_dim, weights.n_heads, weights.n_kv_heads
    offsets = weights.projection_offsets
    cols = d // 2 if offsets is not None else d  # int4: two codes a byte
    if kv < 1 or h % kv or wq.shape != (h * hd, cols) or wk.shape != (kv * hd, cols):
        return False
    return native.projections_ok(dtype, d, weights.projections, hd, offsets)


def _experts_ok(dtype: torch.dtype, d: int, weights: LayerWeights) -> bool:
    """``native.experts_weights_ok``, the router's weight [E, D] of the dtype, and the top-k the
    kernel's router selects as torch.topk does (``few_rows_route``)."""
    if not native.experts_weights_ok(dtype, d, weights.experts, weights.expert_scales, weights.expert_offsets):
        return False
    e, k, gate = weights.experts[0].shape[0], weights.top_k, weights.gate
    if gate.dtype != dtype or gate.shape != (e, d) or not gate.is_contiguous():
        return False
    return 1 <= k <= min(17, e) and 64 * k > e


def _group_size(weights: LayerWeights) -> int | None:
    """The inputs per group of the layer's int4 weights (0 without any), None where the attention's
    and the experts' differ (the kernel takes one)."""
    sizes = set()
    if weights.projection_offsets is not None:
        sizes.add(int4_group_size(*weights.projections[0]))
    if weights.expert_offsets is not None:
        sizes.add(int4_group_size(weights.experts[0], weights.expert_scales[0]))
    return None if len(sizes) > 1 else next(iter(sizes), 0)


class StepInputs:
    """The inputs every layer of a decode step shares (rotary rows, mask, slots), checked by the
    first layer and remembered by identity, so the other layers skip the checks. One per model."""

    def __init__(self) -> None:
        self.checked: tuple | None = None

    def ok(self, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor, step: tuple) -> bool:
        c = self.checked
        if c is not None and c[0] is cos and c[1] is sin and c[2] is mask and c[3] is slots and c[4] == step:
            return True
        if not _step_inputs_ok(cos, sin, mask, slots, step):
            return False
        self.checked = (cos, sin, mask, slots, step)  # held: their identities stay theirs
        return True


def _step_inputs_ok(cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor, step: tuple) -> bool:
    """cos, sin [B, 1, T, hd] and an additive mask [B, 1, T, S] of the dtype, contiguous; slots [T] int64."""
    b, t, s, hd, dtype = step
    if slots.shape != (t,) or slots.dtype != torch.int64 or not slots.is_contiguous():
        return False
    if mask.dtype != dtype or mask.shape != (b, 1, t, s) or not mask.is_contiguous():
        return False
    rot = (b, 1, t, hd)
    if cos.dtype != dtype or sin.dtype != dtype or cos.shape != rot or sin.shape != rot:
        return False
    return cos.is_contiguous() and sin.is_contiguous()


class LayerPlan:
    """The checked weights of one layer and the kernel's argument struct; ``ok`` False when the
    layer cannot run as one call (then the key still saves re-checking it every step)."""

    def __init__(self, key: tuple, dtype: torch.dtype, weights: LayerWeights) -> None:
        self.key, self.dtype = key, dtype
        self.weights = weights  # held: the struct points into these tensors
        self.watch: Watch | None = None  # set by the module that built it: whether it still holds
        d = weights.attention_norm.shape[0]
        norms = (weights.attention_norm, weights.ffn_norm)
        norms_ok = all(n.dtype == dtype and n.shape == (d,) and n.is_contiguous() for n in norms)
        self.ok = (
            dtype in _DTYPES
            and norms_ok
            and _projections_ok(dtype, d, weights)
            and _experts_ok(dtype, d, weights)
            and _group_size(weights) is not None
            and all(t.device.type == "cpu" for t in (weights.attention_norm, weights.gate, weights.experts[0]))
            and build.available()
        )
        if not self.ok:
            return
        self.d, self.e = d, weights.gate.shape[0]
        self.kv, self.hd = weights.n_kv_heads, weights.head_dim
        (wq, sq), (wk, sk), (wv, sv), (wo, so) = weights.projections
        w1, w2, w3 = weights.experts
        ss, pb, eb = weights.expert_scales, weights.projection_offsets, weights.expert_offsets
        ptrs = {
            "attention_norm": weights.attention_norm, "wq": wq, "wk": wk, "wv": wv, "wo": wo,
            "sq": sq, "sk": sk, "sv": sv, "so": so, "ffn_norm": weights.ffn_norm, "gate": weights.gate,
            "w1": w1, "w3": w3, "w2": w2, "s1": ss and ss[0], "s3": ss and ss[2], "s2": ss and ss[1],
            "bq": pb and pb[0], "bk": pb and pb[1], "bv": pb and pb[2], "bo": pb and pb[3],
            "b1": eb and eb[0], "b3": eb and eb[2], "b2": eb and eb[1],
        }  # fmt: skip
        s = _LayerStruct()
        for name, t in ptrs.items():
            setattr(s, name, None if t is None else t.data_ptr())
        s.attention_eps, s.ffn_eps = weights.attention_eps, weights.ffn_eps
        s.wtype_attention = _INT4 if pb is not None else _INT8 if sq is not None else _DTYPES[wq.dtype]
        s.wtype_experts = _INT4 if eb is not None else _INT8 if ss is not None else _DTYPES[w1.dtype]
        s.bf16 = _DTYPES[dtype]
        s.D, s.H, s.KV, s.hd = d, weights.n_heads, weights.n_kv_heads, weights.head_dim
        s.E, s.I, s.K, s.G = w1.shape[0], w1.shape[1], weights.top_k, _group_size(weights)
        self.struct = s
        self.ref = ctypes.byref(s)

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        caches: tuple[torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
        shared: StepInputs,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(layer output [B, T, D], router logits [B * T, E]) for x [B, T, D], writing the new keys
        and values at ``slots`` [T] of ``caches`` [B, KV, S, hd]; None (nothing written) when these
        inputs do not fit the kernel (more rows than ``LAYER_MAX_ROWS`` of one token or ``NATIVE_MAX_ROWS``
        of a prompt, another dtype or layout)."""
        dtype = self.dtype
        if x.dtype != dtype or x.dim() != 3 or not x.is_cpu or x.shape[2] != self.d:
            return None
        b, t, d = x.shape
        if b * t > (LAYER_MAX_ROWS if t == 1 else NATIVE_MAX_ROWS) or b * t == 0:
            return None
        kc, vc = caches
        s = kc.shape[2] if kc.dim() == 4 else 0
        shape = (b, self.kv, s, self.hd)
        if kc.shape != shape or vc.shape != shape or kc.dtype != dtype or vc.dtype != dtype:
            return None
        if not (kc.is_contiguous() and vc.is_contiguous()):
            return None
        if not shared.ok(cos, sin, mask, slots, (b, t, s, self.hd, dtype)):
            return None
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            return None
        x = x.contiguous()
        out = torch.empty_like(x)
        logits = torch.empty(b * t, self.e, dtype=dtype)
        rc = loaded().few_rows_layer(
            self.ref, x.data_ptr(), out.data_ptr(), logits.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            kc.data_ptr(), vc.data_ptr(), slots.data_ptr(), mask.data_ptr(), b, t, s, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"native kernel few_rows_layer failed for x {tuple(x.shape)}, slots {slots.tolist()}")
        return out, logits


def native_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``routing.route_topk`` in the kernel (the router of the one-call layer): logits [N, E] (float32 or
    bfloat16) -> (idx [N, K] int64, weights [N, K] float32)."""
    rows = logits.contiguous()
    n, e = rows.shape
    idx = torch.empty(n, k, dtype=torch.int64)
    rw = torch.empty(n, k, dtype=torch.float32)
    rc = loaded().few_rows_route(rows.data_ptr(), n, e, k, _DTYPES[rows.dtype], idx.data_ptr(), rw.data_ptr())
    if rc != 0:
        raise ValueError(f"native router: top-{k} of {e} experts is not supported (1 <= k <= 17, k <= E, 64k > E)")
    return idx, rw


__all__ = ["LAYER_MAX_ROWS", "LayerPlan", "LayerWeights", "StepInputs", "native_route", "weights_key"]
