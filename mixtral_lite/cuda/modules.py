"""The GPU's accelerated modules: each subclasses the reference module it replaces and defers to
it wherever its kernel does not apply.

``CudaInt8MoE``: decoding (a few rows) runs the chosen int8 experts through the Triton ops
(``ops.py``), which read each chosen expert's int8 weights once and no other expert's; prefill,
training, expert parallelism's own dispatch and anything the kernel does not take stay
``Int8MoE``'s. ``CudaInt8Linear``: up to ``MAX_ROWS`` rows read the int8 matrix once (the
reference's fallback past 4 rows writes and reads a float copy of it).
"""

from __future__ import annotations

import torch

from ..model.quant import Int8Linear, Int8MoE
from .ops import experts_int8_triton, int8_linear

# (token, slot) pairs one kernel call takes: its routing ids and every pair's row live in one tile
# (decode batches; prefill dequantises once per layer and runs ``dense``).
MAX_PAIRS = 64
MAX_ROWS = 64  # rows of a plain int8 matrix's kernel call (the same tile)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def takes(x: torch.Tensor, moe: Int8MoE, idx: torch.Tensor) -> bool:
    """Whether the kernel runs these rows (x [N, D], idx [N, K]) of ``moe``."""
    if moe.dispatch != "auto" or idx.numel() > MAX_PAIRS or x.dtype not in DTYPES:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return all(t.is_contiguous() for t in (moe.w1, moe.w2, moe.w3, *moe.scales()))


class CudaInt8MoE(Int8MoE):
    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if takes(x, self, idx):
            return experts_int8_triton(x, (self.w1, self.w2, self.w3), self.scales(), idx, weights)
        return super().experts(x, idx, weights)


class CudaInt8Linear(Int8Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS or x.dtype not in DTYPES or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        if not (self.weight.is_contiguous() and self.scale.is_contiguous()):
            return super().forward(x)
        return int8_linear(x.reshape(rows, x.shape[-1]), self.weight, self.scale).view(*x.shape[:-1], -1)


# reference class -> its accelerated version
ACCELERATED = {Int8MoE: CudaInt8MoE, Int8Linear: CudaInt8Linear}
REFERENCE = {fast: ref for ref, fast in ACCELERATED.items()}

__all__ = ["ACCELERATED", "MAX_PAIRS", "MAX_ROWS", "REFERENCE", "CudaInt8Linear", "CudaInt8MoE", "takes"]
