"""Many-row float32 products on the CPU through oneDNN instead of BLAS.

``F.linear`` in float32 on the CPU goes to BLAS (MKL in the PyTorch wheels). oneDNN's matrix
product, which PyTorch already uses for bfloat16, is faster for the shapes a prefill multiplies
(docs/performance.md), on row-major and column-major weights alike, and it is called the same way
(``x @ w.T``, float32 accumulation, no copy of the weight). Few rows (decoding) keep the
matrix-vector paths of ``gemv.py``.

``onednn_linear(x, w)`` equals ``F.linear(x, w)`` up to the order of the float32 additions; the
tests tie the two. Training (autograd) and ``torch.compile`` keep ``F.linear``.
"""

from __future__ import annotations

import torch

ONEDNN_MIN_ROWS = 8  # rows from which a float32 CPU product goes to oneDNN (fewer: gemv.py)
HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w.T`` should run through oneDNN: float32 on the CPU, ``ONEDNN_MIN_ROWS`` rows or
    more, no autograd, not while tracing for ``torch.compile``."""
    if not HAS_ONEDNN_LINEAR or x.device.type != "cpu" or w.dim() != 2:
        return False
    if x.dtype != torch.float32 or w.dtype != torch.float32 or x.numel() < ONEDNN_MIN_ROWS * x.shape[-1]:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    return not torch.compiler.is_compiling()


def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias) for x [..., I], w [O, I] through oneDNN's inner product."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


__all__ = ["HAS_ONEDNN_LINEAR", "ONEDNN_MIN_ROWS", "onednn_linear", "use_onednn"]
