"""The int8 kernels (the experts' two products, a plain matrix's) as ``torch.library`` custom
ops: one op per product, so CUDA graphs and
``torch.compile`` see one opaque call each, and meta / fake tensors trace them by their shapes
(the fake-GPU suite) without Triton or a GPU.

On CUDA tensors the ops launch the Triton kernels (``triton_moe.py``, imported on first call);
on CPU tensors they run the same kernels in Triton's interpreter, which is how the tests check
them without a GPU (nothing installs them onto a CPU model).

Axis legend: N tokens, K experts per token, P = N*K pairs, E experts, D hidden, F intermediate.
"""

from __future__ import annotations

import torch

GATE_UP = "mixtral_lite::int8_moe_gate_up"
DOWN = "mixtral_lite::int8_moe_down"
LINEAR = "mixtral_lite::int8_linear"


@torch.library.custom_op(GATE_UP, mutates_args=(), device_types=("cuda", "cpu"))
def int8_moe_gate_up(
    x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """x [N, D], int8 w1 w3 [E, F, D], scales [E, F], idx [N, K] -> h [P, F] in x's dtype:
    ``silu(x w1^T s1) * (x w3^T s3)`` of each (token, slot) pair's expert."""
    from .triton_moe import gate_up

    return gate_up(x, w1, s1, w3, s3, idx, interpret=x.device.type == "cpu")


@int8_moe_gate_up.register_fake
def _gate_up_shape(x, w1, s1, w3, s3, idx):
    return x.new_empty(idx.numel(), w1.shape[1])


@torch.library.custom_op(DOWN, mutates_args=(), device_types=("cuda", "cpu"))
def int8_moe_down(h: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h [P, F], int8 w2 [E, D, F], scales [E, D], idx [N, K] -> y [P, D] float32: ``h w2^T s2``
    of each pair's expert."""
    from .triton_moe import down

    return down(h, w2, s2, idx, interpret=h.device.type == "cpu")


@int8_moe_down.register_fake
def _down_shape(h, w2, s2, idx):
    return h.new_empty(h.shape[0], w2.shape[1], dtype=torch.float32)


@torch.library.custom_op(LINEAR, mutates_args=(), device_types=("cuda", "cpu"))
def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, I], int8 q [O, I], scales [O] -> x (q * scale)^T [M, O] in x's dtype."""
    from .triton_moe import linear

    return linear(x, q, scale, interpret=x.device.type == "cpu")


@int8_linear.register_fake
def _linear_shape(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])


def experts_int8_triton(
    x: torch.Tensor,
    qs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    idx: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The weighted sum of the chosen int8 experts for x [N, D] (idx, weights [N, K]): the two ops,
    then the routing weights combined in float32."""
    (w1, w2, w3), (s1, s2, s3) = qs, scales
    n, k = idx.shape
    h = int8_moe_gate_up(x, w1, s1, w3, s3, idx)
    y = int8_moe_down(h, w2, s2, idx).view(n, k, -1)  # [N, K, D]
    return torch.einsum("nkd,nk->nd", y, weights.float()).to(x.dtype)


__all__ = ["DOWN", "GATE_UP", "LINEAR", "experts_int8_triton", "int8_linear", "int8_moe_down", "int8_moe_gate_up"]
