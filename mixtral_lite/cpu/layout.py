"""Weight memory layouts for fast CPU decoding: the same parameters (names, shapes, values),
stored the way the CPU matrix kernels read them fastest.

Decoding multiplies one row of activations by every weight matrix, so its speed is the speed of
a matrix-vector product, which should stream the weights at memory bandwidth. On the CPU that
depends on the layout: float32 ``F.linear(x, w)`` with ``w`` [O, I] stored column-major (the
transpose contiguous) goes through BLAS's streaming "N" kernel, faster than row-major, while
bfloat16 is the other way round (PyTorch's reduced-precision kernel wants rows). So float32
matrices are stored column-major and the others row-major, unless the C kernel (``native.py``)
runs the decoding products: it streams rows in both dtypes, so then every matrix stays row-major
(docs/performance.md has the measurements). Shapes, names and values do not
change; only ``stride()`` does, and ``state_dict`` / ``save_pretrained`` see the same tensors.

A model converted to another dtype afterwards (``model.to(torch.bfloat16)``) keeps the strides it
had; ``install_cpu_kernels`` lays them out again.
"""

from __future__ import annotations

import torch
from torch import nn

COLUMN_MAJOR_DTYPES = (torch.float32,)


def is_column_major(w: torch.Tensor) -> bool:
    """The last two axes are stored transposed and contiguous (stacked experts: per expert)."""
    return w.dim() >= 2 and w.transpose(-1, -2).is_contiguous() and not w.is_contiguous()


def column_major(w: torch.Tensor, block: int = 256) -> torch.Tensor:
    """A copy of ``w`` with the same shape and values, stored column-major. Copied ``block`` rows at
    a time: each write then fills runs of ``block`` adjacent elements (a plain strided copy writes
    one element per cache line, several times slower)."""
    out = torch.empty(*w.shape[:-2], w.shape[-1], w.shape[-2], dtype=w.dtype, device=w.device).transpose(-1, -2)
    for r in range(0, w.shape[-2], block):
        out[..., r : r + block, :].copy_(w[..., r : r + block, :])
    return out


def wants_column_major(name: str, dim: int, dtype: torch.dtype, device: torch.device, *, kernel: bool) -> bool:
    """The rule: float32 weight matrices on the CPU, except the embedding table and routers, unless
    the C kernel (``native.py``) runs the decoding products (``kernel``): it reads rows."""
    if device.type != "cpu" or dim not in (2, 3) or dtype not in COLUMN_MAJOR_DTYPES or kernel:
        return False
    return not (name.startswith("tok_embeddings") or name.endswith("gate.weight"))


@torch.no_grad()
def cpu_layout(model: nn.Module, *, kernel: bool, compiled: bool = False) -> nn.Module:
    """Store the CPU weight matrices of ``model`` in the layout its dtype multiplies fastest.

    Touches 2-D and 3-D floating parameters on the CPU (attention, experts, dense feed-forward,
    output head); leaves the embedding table (read by rows), routers and anything on a GPU.
    ``compiled``: every matrix row-major, for a ``torch.compile``'d decode step, whose generated
    matrix-vector kernels reduce along rows.
    Returns the model.
    """
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, p in model.named_parameters():
        if p.device.type != "cpu" or p.dim() not in (2, 3) or not p.is_floating_point():
            continue
        if tied and name == "output.weight":
            continue
        if not compiled and wants_column_major(name, p.dim(), p.dtype, p.device, kernel=kernel):
            if not is_column_major(p):
                p.data = column_major(p.data)
        elif not p.is_contiguous():
            p.data = p.data.contiguous()
    return model


__all__ = ["COLUMN_MAJOR_DTYPES", "column_major", "cpu_layout", "is_column_major", "wants_column_major"]
