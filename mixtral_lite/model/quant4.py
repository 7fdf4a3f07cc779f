"""Weight-only int4 quantisation, group-wise, as module swaps (``quant.py`` decides where).

Every run of ``group_size`` consecutive inputs of a weight row gets a scale s and an offset b, and
each weight a 4-bit code q in 0..15: w ~ q * s + b (asymmetric, the minimum of the group is on the
grid). The codes pack two to a byte in blocks of 32 inputs, as GGUF's Q4 formats do: byte j of a
block holds input j in its low nibble and input j + 16 in its high nibble, so a vector unit unpacks
16 bytes into 32 codes with one mask and one shift. Scales and offsets are float16 (GGUF's Q4_0 and
Q4_1 scales are float16 too, so those files are held exactly: b = -8 s, q - 8 its signed code).

Two ways to choose (s, b) per group, neither needs data or a GPU:
- ``rtn``: round to nearest on the group's min..max range.
- ``hqq``: half-quadratic fitting (Badri & Shaji, "HQQ", 2023): starting from ``rtn``, alternate
  rounding with a proximal step on an l_p (p < 1) error, which moves the offset so the heavy-tailed
  error of the outliers stops pulling the whole group; a few vectorised iterations per group.

The modules here are the plain PyTorch reference (dequantise, then multiply); the CPU kernels
(``mixtral_lite.cpu``) install a product that unpacks the codes in registers.

Axis legend: O output features, I input features, G groups per row (I / group_size), E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .experts import StackedExperts, experts_reference
from .mixtral import SparseMoE

BLOCK = 32  # inputs per packed block (16 bytes)
METHODS = ("rtn", "hqq")
SCALE_DTYPE = torch.float16
ROWS_AT_ONCE = 512  # rows quantised together (HQQ holds about ten float32 copies of them)
Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (codes uint8 [..., O, I/2], scale, offset [..., O, G])


def check_group_size(group_size: int, in_features: int, where: str) -> None:
    if group_size < BLOCK or group_size % BLOCK:
        raise UserError(f"group_size: expected a multiple of {BLOCK}, got {group_size}", param="group_size")
    if in_features % group_size:
        raise UserError(f"quantize int4: {where} has {in_features} inputs, not a multiple of group_size {group_size}")


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., I] in 0..15 -> bytes [..., I/2] (block j: low nibble = input j, high = j + 16)."""
    c = codes.reshape(*codes.shape[:-1], -1, 2, BLOCK // 2)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*codes.shape[:-1], codes.shape[-1] // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., I/2] -> codes uint8 [..., I] (``pack`` undone)."""
    b = packed.reshape(*packed.shape[:-1], -1, BLOCK // 2)
    return torch.stack((b & 15, b >> 4), dim=-2).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Packed int4 weights -> float32 [..., O, I]: q * s + b per group."""
    q = unpack(packed).float()
    g = scale.shape[-1]
    q = q.view(*q.shape[:-1], g, -1)
    return (q * scale.float()[..., None] + offset.float()[..., None]).flatten(-2)


def quantize4(w: torch.Tensor, group_size: int = 64, method: str = "rtn") -> Packed:
    """w [..., O, I] -> (packed codes, scale, offset) with the codes rounded against the scale and
    offset as stored (float16), so ``dequantize4`` gives the closest grid they can express."""
    if method not in METHODS:
        raise UserError(f"quantize int4: method expected one of {', '.join(METHODS)}, got {method!r}")
    check_group_size(group_size, w.shape[-1], f"a weight of shape {tuple(w.shape)}")
    if w.is_meta:  # building a quantised model's structure: shapes only
        groups = (*w.shape[:-1], w.shape[-1] // group_size)
        packed = torch.empty(*w.shape[:-1], w.shape[-1] // 2, dtype=torch.uint8, device="meta")
        return (
            packed,
            torch.empty(groups, dtype=SCALE_DTYPE, device="meta"),
            torch.empty(groups, dtype=SCALE_DTYPE, device="meta"),
        )
    if w.dim() > 2 or w.shape[0] > ROWS_AT_ONCE:  # a slice at a time: float32 temporaries stay small
        groups = (*w.shape[:-1], w.shape[-1] // group_size)
        packed = torch.empty(*w.shape[:-1], w.shape[-1] // 2, dtype=torch.uint8, device=w.device)
        scale = torch.empty(groups, dtype=SCALE_DTYPE, device=w.device)
        offset = torch.empty_like(scale)
        slices = (
            range(w.shape[0]) if w.dim() > 2 else [slice(i, i + ROWS_AT_ONCE) for i in range(0, len(w), ROWS_AT_ONCE)]
        )
        for i in slices:
            packed[i], scale[i], offset[i] = quantize4(w[i], group_size, method)
        return packed, scale, offset
    wg = w.detach().float().reshape(w.shape[0], -1, group_size)  # [O, G, group]
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    offset = lo
    if method == "hqq":
        scale, offset = _hqq(wg, scale, offset)
    scale, offset = _representable(scale), _representable(offset)
    q = _round(wg, scale, offset)
    return pack(q.reshape(w.shape)), scale.to(SCALE_DTYPE), offset.to(SCALE_DTYPE)


def _representable(t: torch.Tensor) -> torch.Tensor:
    """Clamp to float16's finite range and round to it (scales below its normal range lose bits)."""
    return t.clamp(-65504, 65504).to(SCALE_DTYPE).float()


def _nearest(t: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties up: ``floor(t + 0.5)`` (on CPUs ``torch.round`` runs ~50x slower)."""
    return torch.floor(t + 0.5)


def _round(wg: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The nearest codes (0..15) of grouped weights for per-group scale and offset."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = _nearest((wg - offset[..., None]) / safe[..., None]).clamp(0, 15)
    return torch.where(scale[..., None] > 0, q, torch.zeros_like(q)).to(torch.uint8)


def _hqq(
    wg: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, *, p: float = 0.7, beta: float = 10.0,
    kappa: float = 1.01, iters: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """HQQ's proximal solver for the zero point with the scale fixed (its defaults: l_0.7, beta 10,
    kappa 1.01, at most 20 iterations, stopping when the mean absolute error stops falling).

    In HQQ's notation w ~ (q - z) / s_inv with z real: here s = 1 / s_inv, b = -z * s. Each step
    rounds, shrinks the error (the l_p proximal operator), and sets z to the mean that fits the
    shrunk error; the best z so far is kept."""
    inv = 1.0 / scale[..., None]  # [O, G, 1]
    z = -offset[..., None] * inv
    best_z, best_err, last = z, None, None
    for _ in range(iters + 1):
        q = _nearest(wg * inv + z).clamp(0, 15)
        r = (q - z) / inv
        err = (wg - r).abs().mean(-1, keepdim=True)
        if best_err is None:
            best_err = err
        else:  # each group keeps its best zero point
            better = err < best_err
            best_z, best_err = torch.where(better, z, best_z), torch.where(better, err, best_err)
        total = err.mean().item()
        if last is not None and total >= last:  # HQQ's stop: the mean error no longer falls
            break
        last = total
        e = wg - r
        shrunk = torch.sign(e) * F.relu(e.abs() - (1.0 / beta) * (e.abs() + 1e-8).pow(p - 1))
        z = (q - (wg - shrunk) * inv).mean(-1, keepdim=True)
        beta *= kappa
    return scale, (-best_z / inv)[..., 0]


def linear_int4_reference(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """The exact product: dequantise to float32, multiply in float32, cast to x's dtype."""
    return F.linear(x.float(), dequantize4(packed, scale, offset)).to(x.dtype)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x [..., I] @ w^T -> [..., O] in x's dtype, the weights dequantised to x's dtype first (one
    rounding per weight in bfloat16); the CPU kernels install a product that never writes them out."""
    return F.linear(x, dequantize4(packed, scale, offset).to(x.dtype))


def to_int4pack(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
    """Our format as PyTorch's CPU int4 kernel takes it (``_weight_int4pack_mm_for_cpu``): its own
    packing of the codes [O, I] and ``scales_and_zeros`` [G, O, 2] with w = (q - 8) * s + zero, so
    zero = b + 8 s. A second, independent implementation of the same product."""
    codes = unpack(packed).to(torch.int32)
    w = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    s, b = scale.float(), offset.float()
    sz = torch.stack((s, b + 8 * s), dim=-1).transpose(0, 1).contiguous().to(dtype)  # [G, O, 2]
    return w, sz


def linear_int4pack(x: torch.Tensor, w: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``_weight_int4pack_mm_for_cpu`` on rows x [..., I] (bfloat16 activations)."""
    rows = x.reshape(-1, x.shape[-1]).to(scales_zeros.dtype).contiguous()
    y = torch._weight_int4pack_mm_for_cpu(rows, w, group_size, scales_zeros)
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


class Int4Linear(nn.Module):
    """A bias-free linear layer with packed int4 weights (``weight`` uint8 [O, I/2]) and float16
    ``scale`` and ``offset`` [O, I / group_size]."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = self.in_features // scale.shape[-1]
        self.register_buffer("weight", packed.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("offset", offset.contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, method: str) -> Int4Linear:
        if linear.bias is not None:
            raise ValueError("Int4Linear: layers with a bias are not quantised here")
        return cls(*quantize4(linear.weight, group_size, method))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_int4(x, self.weight, self.scale, self.offset)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


class Int4MoE(SparseMoE):
    """A ``SparseMoE`` whose stacked experts are packed int4 (``w1 w2 w3`` uint8 [E, O, I/2] with
    ``w1_scale``/``w1_offset`` [E, O, G] ...); routing and dispatch are ``SparseMoE``'s, the
    per-expert product reads the int4 weights."""

    stacks_are_copies = True  # stacks() dequantises every expert: the dispatch avoids it off the CPU

    def __init__(self, moe: SparseMoE, tensors: dict[str, torch.Tensor]) -> None:
        nn.Module.__init__(self)
        if moe.moe_config.kind == "soft":
            raise UserError("quantize int4: soft routing (every expert on every token) is not supported")
        for name in ("top_k", "moe_config", "plain", "dispatch", "reduce"):
            setattr(self, name, getattr(moe, name))
        self.gate, self.group_gate, self.shared = moe.gate, moe.group_gate, moe.shared
        if "expert_bias" in moe._buffers:
            self.register_buffer("expert_bias", moe.expert_bias)
        for name in ("w1", "w2", "w3"):
            for suffix in ("", "_scale", "_offset"):
                self.register_buffer(name + suffix, tensors[name + suffix].contiguous())
        self.group_size = self.w1.shape[-1] * 2 // self.w1_scale.shape[-1]
        self.record_routing = False
        self.last_routing = None

    @classmethod
    def from_moe(cls, moe: SparseMoE, group_size: int, method: str) -> Int4MoE:
        tensors = {}
        for name in ("w1", "w2", "w3"):
            w = getattr(moe, name)
            check_group_size(group_size, w.shape[-1], f"experts.{name} {tuple(w.shape)}")
            packed, scale, offset = quantize4(w, group_size, method)
            tensors.update({name: packed, f"{name}_scale": scale, f"{name}_offset": offset})
        return cls(moe, tensors)

    def parts(self, name: str) -> Packed:
        return getattr(self, name), getattr(self, f"{name}_scale"), getattr(self, f"{name}_offset")

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        (q1, s1, b1), (q2, s2, b2), (q3, s3, b3) = (self.parts(n) for n in ("w1", "w2", "w3"))
        h = F.silu(linear_int4(x, q1[e], s1[e], b1[e])) * linear_int4(x, q3[e], s3[e], b3[e])
        return linear_int4(h, q2[e], s2[e], b2[e])

    def chosen(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chosen experts idx [N, K] dequantised to the activations' dtype (w1, w3 [N, K, F, D])."""
        dtype = self.gate.weight.dtype
        return tuple(dequantize4(q[idx], s[idx], b[idx]).to(dtype) for q, s, b in map(self.parts, ("w1", "w2", "w3")))

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The experts dequantised to the activations' dtype (for the dispatches that read whole stacks)."""
        dtype = self.gate.weight.dtype
        return tuple(dequantize4(*self.parts(n)).to(dtype) for n in ("w1", "w2", "w3"))

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}, int4 group {self.group_size}"


def experts_int4_reference(x: torch.Tensor, moe: Int4MoE, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Dequantise every expert to float32 and run the plain per-expert loop in float32."""
    w1, w2, w3 = (dequantize4(*moe.parts(n)) for n in ("w1", "w2", "w3"))
    return experts_reference(x.float(), StackedExperts(w1, w2, w3), idx, weights).to(x.dtype)


__all__ = [
    "BLOCK",
    "METHODS",
    "Int4Linear",
    "Int4MoE",
    "dequantize4",
    "experts_int4_reference",
    "linear_int4",
    "linear_int4_reference",
    "linear_int4pack",
    "pack",
    "quantize4",
    "to_int4pack",
    "unpack",
]
