"""Weight-only quantisation of the experts and the attention projections, as module swaps: int8
here, int4 in ``quant4.py``; ``quantize_model`` and its named modes (``SPECS``) decide which layer
gets which.

Each output channel (row) of a weight gets one scale: s = max|w_row| / 127 and q = round(w / s),
so w ~ q * s with an error of at most s / 2 per weight. Activations stay in the model's dtype.
Decoding reads every active weight once per token, so halving the bytes of the largest weights
(the experts) is what speeds it up.

``quantize_model`` swaps every ``Linear`` it quantises for an ``Int8Linear`` and every
``SparseMoE`` for an ``Int8MoE`` (gpt-fast's way): the router, the dispatch and everything else
stay the reference model's; only the per-expert product changes. These modules are the plain
PyTorch reference (the product applies the scale after multiplying by the int8 weights cast to the
activations' dtype); the CPU kernels (``mixtral_lite.cpu``) install faster products over them.

A quantised model is for inference: the quantised weights are int8 buffers (``weight`` and
``scale``; stacked experts ``w1`` and ``w1_scale``...).

Axis legend: O output features, I input features, E experts, N tokens, K experts per token,
D hidden size, F expert intermediate size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .experts import StackedExperts, experts_reference
from .mixtral import Linear, SparseMoE
from .quant4 import Int4Linear, Int4MoE


@dataclass(frozen=True)
class QuantSpec:
    """Which weights get which format: ``experts`` (and dense feed-forwards), ``attention`` (wq wk
    wv wo) and the output head: 8 or 4 bits; int4 by ``method`` (``quant4.METHODS``)."""

    experts: int
    attention: int
    output: int
    method: str = "rtn"


# The modes ``quantize_model``, ``load_model(quantize=)`` and ``--quantize`` take, by exact name.
# The output head stays at 8 bits in the int4 modes (llama.cpp's Q4 files keep it at 6).
SPECS = {
    "int8": QuantSpec(experts=8, attention=8, output=8),
    "int4": QuantSpec(experts=4, attention=4, output=8, method="rtn"),
    "int4-hqq": QuantSpec(experts=4, attention=4, output=8, method="hqq"),
    "int4-mixed": QuantSpec(experts=4, attention=8, output=8, method="rtn"),
    "int4-mixed-hqq": QuantSpec(experts=4, attention=8, output=8, method="hqq"),
}
MODES = tuple(SPECS)
DEFAULT_GROUP_SIZE = 64
ROWS_AT_ONCE = 4096  # rows quantised together (an output head of 32000 rows at once: 5 float32 copies)
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (w1, w2, w3) int8 weights, or their scales


def quantize_per_channel(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] -> (q int8 [..., O, I], scale [..., O] in ``scale_dtype``).

    q is rounded against the scale as stored (after its cast), so ``q * scale`` is the closest
    int8 grid to w that the stored scale can express.
    """
    if w.is_meta:  # shapes only (planning, matching a quantised checkpoint): meta arithmetic is slow
        return torch.empty(w.shape, dtype=torch.int8, device="meta"), torch.empty(
            w.shape[:-1], dtype=scale_dtype, device="meta"
        )
    if w.dim() > 2:  # one slice at a time: a float32 copy of a whole expert stack can be large
        parts = [quantize_per_channel(w_e, scale_dtype) for w_e in w]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    if w.shape[0] > ROWS_AT_ONCE:  # rows are independent: a few float32 temporaries of a block at a time
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=scale_dtype, device=w.device)
        for i in range(0, w.shape[0], ROWS_AT_ONCE):
            q[i : i + ROWS_AT_ONCE], scale[i : i + ROWS_AT_ONCE] = quantize_per_channel(
                w[i : i + ROWS_AT_ONCE], scale_dtype
            )
        return q, scale
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=-1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    q = torch.round(w32 / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., O, I] int8, scale [..., O] -> float32 weights [..., O, I]."""
    return q.float() * scale.float()[..., None]


def linear_int8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The exact product: dequantise to float32, multiply in float32, cast to x's dtype."""
    return F.linear(x.float(), dequantize(q, scale)).to(x.dtype)


HAS_INT8PACK_MM = hasattr(torch, "_weight_int8pack_mm")
# ``_weight_int8pack_mm`` on CUDA reads the whole matrix once per row of x (a warp per output);
# the cast writes and reads a float copy (5 bytes per weight): the product wins up to 4 rows.
INT8PACK_MAX_ROWS = 4


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., I] @ (q * scale)^T -> [..., O] in x's dtype: the int8 weights cast to x's dtype
    (exact: |q| <= 127), the scale applied to the product's outputs. Eager off the CPU, a few
    rows take one ``_weight_int8pack_mm`` (no float copy of the matrix); compiled, the cast fuses
    into the product (gpt-fast's way); the CPU kernels install their own product."""
    rows = x.numel() // x.shape[-1]
    eager = not torch.compiler.is_compiling()
    if HAS_INT8PACK_MM and x.device.type != "cpu" and eager and rows <= INT8PACK_MAX_ROWS and q.is_contiguous():
        flat = x.reshape(-1, x.shape[-1])
        return torch._weight_int8pack_mm(flat, q, scale.to(x.dtype)).view(*x.shape[:-1], q.shape[0])
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights [O, I] and per-output-channel scales [O]."""

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


class Int8MoE(SparseMoE):
    """A ``SparseMoE`` whose stacked experts are int8 (``w1 w2 w3`` buffers [E, ...] with scales
    ``w1_scale`` [E, I], ``w2_scale`` [E, D], ``w3_scale`` [E, I]); routing and dispatch are
    ``SparseMoE``'s, the per-expert product reads the int8 weights."""

    def __init__(self, moe: SparseMoE, scale_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        if moe.moe_config.kind == "soft":
            raise UserError("quantize int8: soft routing (every expert on every token) is not supported")
        for name in ("top_k", "moe_config", "plain", "dispatch", "reduce"):
            setattr(self, name, getattr(moe, name))
        self.gate, self.group_gate, self.shared = moe.gate, moe.group_gate, moe.shared
        self.shared_gate = moe.shared_gate
        if "expert_bias" in moe._buffers:
            self.register_buffer("expert_bias", moe.expert_bias)
        for name in ("w1", "w2", "w3"):
            q, s = quantize_per_channel(getattr(moe, name), scale_dtype)
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", s)
        self.record_routing = False
        self.last_routing = None

    def scales(self) -> Triple:
        return self.w1_scale, self.w2_scale, self.w3_scale

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        h = F.silu(linear_int8(x, self.w1[e], self.w1_scale[e])) * linear_int8(x, self.w3[e], self.w3_scale[e])
        return linear_int8(h, self.w2[e], self.w2_scale[e])

    stacks_are_copies = True  # stacks() dequantises every expert: the dispatch avoids it off the CPU

    def chosen(self, idx: torch.Tensor) -> Triple:
        """The chosen experts idx [N, K] dequantised to the scales' dtype: the int8 gather reads
        only them (w1, w3 [N, K, F, D]; w2 [N, K, D, F])."""
        return tuple(
            q[idx].to(s.dtype) * s[idx][..., None]
            for q, s in zip((self.w1, self.w2, self.w3), self.scales(), strict=True)
        )

    def stacks(self) -> Triple:
        """The experts dequantised to the scales' dtype (for the dispatches that read whole stacks)."""
        return tuple(
            q.to(s.dtype) * s[..., None] for q, s in zip((self.w1, self.w2, self.w3), self.scales(), strict=True)
        )

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}, int8"


def experts_int8_reference(x: torch.Tensor, moe: Int8MoE, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Dequantise every expert to float32 and run the plain per-expert loop in float32."""
    w1, w2, w3 = (dequantize(q, s) for q, s in zip((moe.w1, moe.w2, moe.w3), moe.scales(), strict=True))
    return experts_reference(x.float(), StackedExperts(w1, w2, w3), idx, weights).to(x.dtype)


# Attention projections quantised: GQA's four and latent attention's, except ``wkv_b``, whose
# float matrix the absorbed decode folds into the queries.
QUANTIZED_PROJECTIONS = ("wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a")


@torch.no_grad()
def quantize_model(
    model: nn.Module, mode: str = "int8", *, include_output: bool = True, group_size: int = DEFAULT_GROUP_SIZE
) -> nn.Module:
    """Quantise ``model`` in place by ``mode`` (one of ``MODES``, see ``SPECS``): every layer's
    expert weights and attention projections (and dense / shared feed-forward layers), and the
    output head too (``include_output``; not when it is tied to the embeddings): at batch 1 it is
    a large share of the bytes read per token. int4 weights get one scale and offset per
    ``group_size`` inputs. The router, norms and embeddings stay as they are.

    A model with the CPU or GPU kernels installed (``model.cpu_kernels``, ``model.cuda_kernels``)
    has them taken off before and installed again after, for the quantised modules. Returns the model.
    """
    spec = SPECS.get(mode) if isinstance(mode, str) else None
    if spec is None:
        raise UserError(f"quantize: expected one of {', '.join(MODES)}, got {mode!r}")
    if getattr(model, "quantized", None):
        raise UserError(f"quantize: the model is already quantised ({model.quantized})")
    if getattr(model, "offload", None) is not None:
        raise UserError(
            "quantize: the model's experts are offloaded; load it with quantize= and the placement together"
        )
    # installed for the float modules (CPU or GPU backend): decided again for the quantised ones
    backends = [k for k in (getattr(model, a, None) for a in ("cpu_kernels", "cuda_kernels")) if k is not None]
    for kernels in backends:
        kernels.uninstall(model)
    before = _tensor_bytes(model)
    scale_dtype = model.dtype

    def linear(m: nn.Linear, bits: int) -> nn.Module:
        if bits == 4:
            return Int4Linear.from_linear(m, group_size, spec.method)
        return Int8Linear.from_linear(m, scale_dtype)

    for layer in model.layers:
        att = layer.attention
        for name in QUANTIZED_PROJECTIONS:
            if type(getattr(att, name, None)) is Linear:  # biased ones (BiasLinear) stay float
                setattr(att, name, linear(getattr(att, name), spec.attention))
        ff = layer.feed_forward
        if isinstance(ff, SparseMoE):
            if spec.experts == 4:
                layer.feed_forward = ff = Int4MoE.from_moe(ff, group_size, spec.method)
            else:
                layer.feed_forward = ff = Int8MoE(ff, scale_dtype)
            dense = [ff.shared] if ff.shared is not None else []
        else:
            dense = [ff]
        for mlp in dense:
            for name in ("w1", "w2", "w3"):
                setattr(mlp, name, linear(getattr(mlp, name), spec.experts))
    output = include_output and not model.config.tie_word_embeddings and isinstance(model.output, Linear)
    if output:
        model.output = linear(model.output, spec.output)
    model.quantized = mode
    model.quantization = {
        "mode": mode,
        **asdict(spec),
        "group_size": group_size,
        "include_output": output,
        "bytes_before": before,
        "bytes_after": _tensor_bytes(model),
    }
    for kernels in backends:
        kernels.install(model)
    return model


def quantization_report(model: nn.Module) -> str:
    """One line: the weight memory before and after quantisation."""
    info = getattr(model, "quantization", None)
    if info is None:
        return "not quantised"
    b, a = info["bytes_before"], info["bytes_after"]
    if b is None:  # loaded as int8 from a quantised checkpoint
        return f"{info['mode']}: weights {a / 2**20:.0f} MiB (read quantised)"
    saved = (b - a) / 2**20
    return (
        f"{info['mode']}: weights {b / 2**20:.0f} MiB -> {a / 2**20:.0f} MiB (saved {saved:.0f} MiB, {1 - a / b:.0%})"
    )


def _tensor_bytes(model: nn.Module) -> int:
    tensors = {id(t) if t.is_meta else t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = [
    "DEFAULT_GROUP_SIZE",
    "MODES",
    "SPECS",
    "QuantSpec",
    "Int8Linear",
    "Int8MoE",
    "dequantize",
    "experts_int8_reference",
    "linear_int8",
    "linear_int8_reference",
    "quantization_report",
    "quantize_model",
    "quantize_per_channel",
]
