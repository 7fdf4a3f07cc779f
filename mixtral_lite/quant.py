"""Weight-only int8 quantisation of the experts and the attention projections.

Each output channel (row) of a weight gets one scale: s = max|w_row| / 127 and q = round(w / s),
so w ~ q * s with an error of at most s / 2 per weight. Activations stay in the model's dtype.
Decoding reads every active weight once per token, so halving the bytes of the largest weights
(the experts) is what speeds it up: the product must read the int8 weights directly, never a
float copy of them.

The fast product on the CPU is ``torch._weight_int8pack_mm`` (int8 weights, bfloat16 or float16
activations, float accumulation); elsewhere, or for float32 activations on a CPU without it, the
weights are dequantised on the fly. ``linear_int8_reference`` and ``experts_int8_reference``
(dequantise everything, then the plain float code) are what the fast paths are tested against.

A quantised model is for inference: the quantised weights become int8 buffers (``weight`` and
``scale``; stacked experts ``w1`` and ``w1_scale``...), so it is not saved as a checkpoint.

Axis legend: O output features, I input features, E experts, N tokens, K experts per token,
D hidden size, F expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .moe import COMPILED_PER_TOKEN_MAX, UPCAST_ON_CPU, expert_id, experts_dense_topk, experts_reference, linear
from .native import (
    native_experts,
    native_int8,
    native_swiglu_int8,
    use_native_experts,
    use_native_int8,
    use_native_swiglu_int8,
)

MODES = ("int8",)
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (w1, w2, w3) int8 weights, or their scales
HAS_INT8_MM = hasattr(torch, "_weight_int8pack_mm")
_FAST_ACT = (torch.bfloat16, torch.float16)
# Rows from which int8 products convert the weight and multiply like ``moe.linear`` instead: the
# int8 kernel's cost grows with the rows.
UPCAST_MIN_ROWS = 32


def quantize_per_channel(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] -> (q int8 [..., O, I], scale [..., O] in ``scale_dtype``).

    q is rounded against the scale as stored (after its cast), so ``q * scale`` is the closest
    int8 grid to w that the stored scale can express.
    """
    if w.dim() > 2:  # one slice at a time: a float32 copy of a whole expert stack can be large
        parts = [quantize_per_channel(w_e, scale_dtype) for w_e in w]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=-1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    q = torch.round(w32 / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., O, I] int8, scale [..., O] -> float32 weights [..., O, I]."""
    return q.float() * scale.float()[..., None]


def linear_int8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The plain product: dequantise to float32, multiply in float32, cast to x's dtype."""
    return F.linear(x.float(), dequantize(q, scale)).to(x.dtype)


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., I] @ (q * scale)^T -> [..., O] in x's dtype, reading the int8 weights directly.

    On the CPU, float32 activations go through bfloat16 for the int8 kernel (it has no float32
    fast path); the per-weight rounding error of int8 is the larger of the two. Many rows (prefill)
    convert the weight instead and multiply like ``moe.linear`` (bfloat16 where the CPU has native
    units for it, else float32): the int8 kernel's cost grows with the rows.
    """
    if use_native_int8(x, q, scale):  # decoding: the compiled kernel (native.py)
        return native_int8(x, q, scale)
    if HAS_INT8_MM and x.device.type == "cpu" and q.is_contiguous():
        rows = x.numel() // x.shape[-1]
        if rows < UPCAST_MIN_ROWS and x.dtype == scale.dtype and x.dtype in _FAST_ACT and x.is_contiguous():
            if x.dim() == 2:
                return torch._weight_int8pack_mm(x, q, scale)  # decoding: one call, nothing around it
            y = torch._weight_int8pack_mm(x.view(rows, x.shape[-1]), q, scale)
            return y.view(*x.shape[:-1], q.shape[0])
        if rows >= UPCAST_MIN_ROWS:  # int8 -> bfloat16/float16 is exact (|q| <= 127)
            native = x.dtype in _FAST_ACT and x.dtype not in UPCAST_ON_CPU
            w = q.to(x.dtype) if native else q.float()
            return (linear(x.to(w.dtype), w).float() * scale.float()).to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        act = x2 if x2.dtype in _FAST_ACT else x2.to(torch.bfloat16)
        y = torch._weight_int8pack_mm(act.contiguous(), q, scale.to(act.dtype))
        return y.to(x.dtype).view(*shape[:-1], q.shape[0])
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights [O, I] and per-output-channel scales [O]."""

    plain_product = True  # forward is x @ (weight * scale[:, None]).T (the fused kernels rely on it)

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype: torch.dtype) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear: layers with a bias are not quantised here")
        return cls(*quantize_per_channel(linear.weight, scale_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_int8(x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


# ----------------------------------------------------------------------------------------------
# Experts


def _swiglu_int8(x: torch.Tensor, e: int, qs: Triple, ss: Triple) -> torch.Tensor:
    (q1, q2, q3), (s1, s2, s3) = qs, ss
    one = (q1[e], q2[e], q3[e]), (s1[e], s2[e], s3[e])
    if use_native_swiglu_int8(x, *one):  # decoding: the whole expert in one kernel call (native.py)
        return native_swiglu_int8(x, *one)
    h = F.silu(linear_int8(x, q1[e], s1[e])) * linear_int8(x, q3[e], s3[e])
    return linear_int8(h, q2[e], s2[e])


def experts_int8_per_token(
    x: torch.Tensor,
    qs: tuple[torch.Tensor, ...],
    ss: tuple[torch.Tensor, ...],
    idx: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Few tokens on the CPU: each token runs its K chosen experts (int8 slices, no copy; under
    compile the ids are read with ``.item()`` as in ``moe.experts_per_token``)."""
    if use_native_experts(x, qs, ss, idx):  # decoding: every chosen expert in one call (native.py)
        return native_experts(x, qs, ss, idx, weights)
    if torch.compiler.is_compiling():
        chosen = [[expert_id(idx[n, k], qs[0].shape[0]) for k in range(idx.shape[1])] for n in range(idx.shape[0])]
        scales = [[weights[n, k] for k in range(idx.shape[1])] for n in range(idx.shape[0])]
    else:
        chosen, scales = idx.tolist(), weights.tolist()
    rows = []
    for n, (experts, ws) in enumerate(zip(chosen, scales, strict=True)):
        acc = None
        for e, w in zip(experts, ws, strict=True):
            y = _swiglu_int8(x[n : n + 1], e, qs, ss) * w
            acc = y if acc is None else acc + y
        rows.append(acc)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def experts_int8_sorted(
    x: torch.Tensor,
    qs: tuple[torch.Tensor, ...],
    ss: tuple[torch.Tensor, ...],
    idx: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Many tokens: sort the (token, expert) pairs by expert; each expert runs once on its rows."""
    n, k = idx.shape
    flat = idx.reshape(-1)  # [N*K]
    order = torch.argsort(flat, stable=True)
    token = order // k  # [N*K]
    xs = x[token]  # [N*K, D]
    ys = torch.empty_like(xs)
    start = 0
    for e, c in enumerate(torch.bincount(flat, minlength=qs[0].shape[0]).tolist()):
        if c:
            ys[start : start + c] = _swiglu_int8(xs[start : start + c], e, qs, ss)
        start += c
    ws = weights.reshape(-1)[order]  # [N*K] float32
    out = torch.zeros_like(x)
    out.index_add_(0, token, (ys * ws[:, None]).to(x.dtype))
    return out


def experts_int8_gather(
    x: torch.Tensor,
    qs: tuple[torch.Tensor, ...],
    ss: tuple[torch.Tensor, ...],
    idx: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """No host sync (compile, GPU): gather the chosen experts' int8 weights, dequantise, multiply."""
    (q1, q2, q3), (s1, s2, s3) = qs, ss
    dt = x.dtype
    w1 = q1[idx].to(dt) * s1[idx][..., None].to(dt)  # [N, K, F, D]
    w3 = q3[idx].to(dt) * s3[idx][..., None].to(dt)
    w2 = q2[idx].to(dt) * s2[idx][..., None].to(dt)  # [N, K, D, F]
    h = F.silu(torch.einsum("nd,nkfd->nkf", x, w1)) * torch.einsum("nd,nkfd->nkf", x, w3)
    y = torch.einsum("nkf,nkdf->nkd", h, w2)  # [N, K, D]
    return torch.einsum("nkd,nk->nd", y.float(), weights).to(dt)


def experts_int8_dense(
    x: torch.Tensor, qs: Triple, ss: Triple, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Compiled batches: every expert dequantised and run on every token (``moe.experts_dense_topk``)."""
    w1, w2, w3 = (q.to(x.dtype) * s[..., None].to(x.dtype) for q, s in zip(qs, ss, strict=True))
    return experts_dense_topk(x, w1, w2, w3, idx, weights)


def experts_int8_reference(
    x: torch.Tensor,
    qs: tuple[torch.Tensor, ...],
    ss: tuple[torch.Tensor, ...],
    idx: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Dequantise every expert to float32 and run the plain per-expert loop in float32."""
    w1, w2, w3 = (dequantize(q, s) for q, s in zip(qs, ss, strict=True))
    return experts_reference(x.float(), w1, w2, w3, idx, weights).to(x.dtype)


class Int8Experts:
    """The expert kernel of a quantised ``SparseMoE`` (set as its ``dispatch``).

    It is called with the layer's int8 ``w1 w2 w3`` and reads the scales from the layer at call
    time, so moving the model to another device moves them too. ``impl``: auto, per_token,
    sorted, gather, dense or reference (auto as ``moe.dispatch_experts``, without grouped_mm).
    """

    def __init__(self, moe: nn.Module, impl: str = "auto") -> None:
        self.moe = moe
        self.impl = impl

    def native_scales(self) -> Triple | None:
        """The scales (w1, w2, w3) when the kernel may run these experts (``impl`` auto), else None."""
        m = self.moe
        return (m.w1_scale, m.w2_scale, m.w3_scale) if self.impl == "auto" else None

    def __call__(
        self,
        x: torch.Tensor,
        q1: torch.Tensor,
        q2: torch.Tensor,
        q3: torch.Tensor,
        idx: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        m = self.moe
        qs, ss = (q1, q2, q3), (m.w1_scale, m.w2_scale, m.w3_scale)
        impl = self.impl
        if impl == "auto":
            few = idx.numel() <= q1.shape[0]
            compiling, cpu = torch.compiler.is_compiling(), x.device.type == "cpu"
            if few or (cpu and compiling and x.shape[0] <= COMPILED_PER_TOKEN_MAX):
                impl = "per_token" if cpu else "gather"
            else:
                impl = "dense" if compiling else "sorted"
        if impl == "per_token":
            return experts_int8_per_token(x, qs, ss, idx, weights)
        if impl == "sorted":
            return experts_int8_sorted(x, qs, ss, idx, weights)
        if impl == "gather":
            return experts_int8_gather(x, qs, ss, idx, weights)
        if impl == "dense":
            return experts_int8_dense(x, qs, ss, idx, weights)
        if impl == "reference":
            return experts_int8_reference(x, qs, ss, idx, weights)
        raise ValueError(f"int8 experts: expected auto, per_token, sorted, gather, dense or reference, got {impl!r}")


# ----------------------------------------------------------------------------------------------
# The model


def _quantize_experts(moe: nn.Module, scale_dtype: torch.dtype) -> None:
    """Replace the stacked float experts of a SparseMoE by int8 buffers plus scales."""
    for name in ("w1", "w2", "w3"):
        q, s = quantize_per_channel(getattr(moe, name), scale_dtype)
        delattr(moe, name)
        moe.register_buffer(name, q)
        moe.register_buffer(f"{name}_scale", s)
    moe.dispatch = Int8Experts(moe)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8", *, include_output: bool = True) -> nn.Module:
    """Quantise ``model`` in place: every layer's expert weights and attention projections (and
    dense / shared feed-forward layers) to int8 with per-output-channel scales, and the output
    head too (``include_output``; not when it is tied to the embeddings): at batch 1 it is a
    quarter of the bytes read per token. The router, norms and embeddings stay as they are.

    Returns the model. The saved bytes are ``quantization_report(model)``'s business.
    """
    if mode not in MODES:
        raise UserError(f"quantize: expected one of {', '.join(MODES)}, got {mode!r}")
    if getattr(model, "quantized", None):
        raise UserError(f"quantize: the model is already quantised ({model.quantized})")
    before = _tensor_bytes(model)
    scale_dtype = model.dtype
    for layer in model.layers:
        layer.__dict__.pop("_plan", None)  # a decoding plan holds the float weights: let them go
        att = layer.attention
        for name in ("wq", "wk", "wv", "wo"):
            setattr(att, name, Int8Linear.from_linear(getattr(att, name), scale_dtype))
        ff = layer.feed_forward
        if hasattr(ff, "gate"):  # a SparseMoE
            if getattr(ff, "moe_config", None) is not None and ff.moe_config.kind == "soft":
                raise UserError("quantize int8: soft routing (every expert on every token) is not supported")
            _quantize_experts(ff, scale_dtype)
            dense = [ff.shared] if getattr(ff, "shared", None) is not None else []
        else:
            dense = [ff]
        for mlp in dense:
            for name in ("w1", "w2", "w3"):
                setattr(mlp, name, Int8Linear.from_linear(getattr(mlp, name), scale_dtype))
    if include_output and not model.config.tie_word_embeddings:
        model.output = Int8Linear.from_linear(model.output, scale_dtype)
    model.quantized = mode
    model.quantization = {"mode": mode, "bytes_before": before, "bytes_after": _tensor_bytes(model)}
    return model


def quantization_report(model: nn.Module) -> str:
    """One line: the weight memory before and after quantisation."""
    info = getattr(model, "quantization", None)
    if info is None:
        return "not quantised"
    b, a = info["bytes_before"], info["bytes_after"]
    saved = (b - a) / 2**20
    return (
        f"{info['mode']}: weights {b / 2**20:.0f} MiB -> {a / 2**20:.0f} MiB (saved {saved:.0f} MiB, {1 - a / b:.0%})"
    )


def _tensor_bytes(model: nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = [
    "HAS_INT8_MM",
    "MODES",
    "Int8Experts",
    "Int8Linear",
    "dequantize",
    "experts_int8_dense",
    "experts_int8_gather",
    "experts_int8_per_token",
    "experts_int8_reference",
    "experts_int8_sorted",
    "linear_int8",
    "linear_int8_reference",
    "quantization_report",
    "quantize_model",
    "quantize_per_channel",
]
