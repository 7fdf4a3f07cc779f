"""The GPU path without a GPU: run the model on ``meta`` tensors and record every aten op.

Meta tensors take every ``device.type != "cpu"`` branch and have shapes but no data, so building
full Mixtral-8x7B costs no memory and a data-dependent op cannot run unnoticed: ``Trace`` records
each op a forward pass dispatches (a ``TorchDispatchMode``) and flags the host syncs (an op whose
result the host must wait for: ``.item()``, ``nonzero``, ``bincount``, boolean indexing, a copy to
the CPU).

Bytes are a model of what a CUDA kernel per op would move, not a measurement: each op reads its
tensor inputs and writes its outputs, except where the kernel touches less than the operand:
gathers read what they produce; indexed writes write what they are given; ``_grouped_mm`` reads
only the expert groups that get rows (at most one per row); ``_weight_int8pack_mm`` reads its
matrix once per row (CUDA's kernel is a warp per output); the int8 MoE ops (``cuda/ops.py``) read
the experts some (token, slot) pair chose, counted as min(E, N*K) of them: exact at batch 1 (a
token's K experts differ), an upper bound beyond (meta tensors hold no routing, rows may share);
``scaled_dot_product_attention`` is one fused kernel (its backend predicted from the inputs:
CUDA's flash and memory-efficient kernels take no additive mask with ``enable_gqa``). Views launch
nothing and move nothing.

Axis legend: N tokens, E experts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..config import MixtralConfig
from ..cuda import install_cuda_kernels
from ..cuda.ops import int8_moe_down, int8_moe_gate_up
from ..generation.generate import decode_step, prefill
from ..model.cache import KVCache
from ..model.mixtral import Mixtral
from ..model.quant import quantize_model
from ..weights.device_map import layer_devices

aten = torch.ops.aten
GATE_UP_OP, DOWN_OP = int8_moe_gate_up._opoverload, int8_moe_down._opoverload

# Ops whose output depends on data the host must read first, or that copy to the host.
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.bincount.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,
}
# Ops that touch only part of an operand: bytes read = bytes of the output (plus the index).
GATHERS = {
    aten.index.Tensor,
    aten.index_select.default,
    aten.embedding.default,
    aten.gather.default,
}
# In-place indexed writes: bytes written = bytes of the source written (plus the index read).
INDEXED_WRITES = {
    aten.index_copy_.default,
    aten.index_add_.default,
    aten.index_put_.default,
    aten.scatter_.src,
    aten.scatter_.value,
    aten.masked_fill_.Scalar,
}
# Ops that allocate or describe and launch no kernel.
NO_KERNEL = {
    aten._unsafe_view.default,
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.detach.default,
}


class HostSync(RuntimeError):
    """A data-dependent op ran where the trace forbids one."""


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Op:
    name: str
    read: int
    written: int
    kernel: bool
    note: str = ""


@dataclass
class Trace:
    """What one traced region ran: its ops (in order), the syncs among them, bytes moved."""

    ops: list[Op] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)
    sdpa_backends: Counter = field(default_factory=Counter)

    @property
    def kernels(self) -> int:
        return sum(op.kernel for op in self.ops)

    @property
    def bytes(self) -> int:
        return sum(op.read + op.written for op in self.ops)

    def op_counts(self) -> Counter:
        return Counter(op.name for op in self.ops if op.kernel)

    def largest(self, n: int = 10) -> list[Op]:
        return sorted(self.ops, key=lambda op: op.read + op.written, reverse=True)[:n]


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, enable_gqa: bool) -> str:
    """The CUDA backend ``scaled_dot_product_attention`` would pick for these inputs (PyTorch's
    rules, simplified): flash takes no mask, memory-efficient takes a mask but not grouped heads,
    anything else falls back to the math backend (keys repeated to every head, upcast)."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    gqa = enable_gqa and q.shape[-3] != k.shape[-3]
    if mask is None and half and q.shape[-1] <= 256:
        return "flash"
    if not gqa and q.shape[-1] % 8 == 0:
        return "efficient"
    return "math"


class _SdpaAsOneKernel(TorchFunctionMode):
    """Record ``scaled_dot_product_attention`` as one op (its fused kernel), not its decomposition."""

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        backend = sdpa_backend(q, k, mask, kwargs.get("enable_gqa", False))
        self.trace.sdpa_backends[backend] += 1
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))  # no data to attend: the kernel's output shape
        read = nbytes(q) + nbytes(k) + nbytes(v) + (0 if mask is None else nbytes(mask))
        if backend == "math":  # keys and values expanded to every query head, scores materialised
            read += 2 * (nbytes(k) + nbytes(v)) * q.shape[-3] // k.shape[-3]
        self.trace.ops.append(Op("sdpa", read, nbytes(out), True, backend))
        return out


class _Recorder(TorchDispatchMode):
    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = self._is_sync(func, args, kwargs)
        if sync:  # meta tensors have no data to read: the op cannot run, say which it was
            self.trace.syncs.append(sync)
            raise HostSync(f"host sync in the traced region: {sync} ({func})")
        out = func(*args, **kwargs)
        self.trace.ops.append(self._op(func, args, out))
        return out

    @staticmethod
    def _is_sync(func, args, kwargs) -> str | None:
        if func in SYNC_OPS:
            return str(func.overloadpacket.__name__)
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                return "boolean indexing"
        if func is aten._to_copy.default:
            dev = kwargs.get("device")
            src = args[0]
            if dev is not None and torch.device(dev).type == "cpu" and src.device.type != "cpu":
                return "copy to host"
        return None

    @staticmethod
    def _op(func, args, out) -> Op:
        name = func.overloadpacket.__name__
        if func.is_view or func in NO_KERNEL:
            return Op(name, 0, 0, False)
        inputs = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        written = sum(nbytes(o) for o in outputs)
        if func in GATHERS:
            read = written + sum(nbytes(i) for i in inputs[1:] if not i.is_floating_point())
        elif func in INDEXED_WRITES:
            rest = inputs[1:]
            written = sum(nbytes(i) for i in rest if i.is_floating_point()) or nbytes(inputs[0])
            read = sum(nbytes(i) for i in rest)
        elif func is aten._grouped_mm.default:
            x, w = inputs[0], inputs[1]
            groups = w.shape[0]
            used = min(groups, x.shape[0])  # a group without rows is skipped: its weights are not read
            read = nbytes(x) + nbytes(w) * used // groups + sum(nbytes(i) for i in inputs[2:])
        elif func is aten._weight_int8pack_mm.default:  # CUDA's kernel: the matrix once per row of x
            x, w = inputs[0], inputs[1]
            read = nbytes(x) + nbytes(w) * x.shape[0] + nbytes(inputs[2])
        elif func in (GATE_UP_OP, DOWN_OP):  # the int8 MoE kernels: only the experts some pair chose
            x, idx = inputs[0], inputs[-1]
            weights = inputs[1:-1]  # (w1, s1, w3, s3) or (w2, s2): [E, ...] each
            experts = weights[0].shape[0]
            used = min(experts, idx.numel())  # at most one expert per pair (an upper bound on meta)
            read = nbytes(x) + nbytes(idx) + sum(nbytes(w) for w in weights) * used // experts
        elif func is aten.copy_.default:
            read = nbytes(inputs[1])
            written = nbytes(inputs[0])
        else:
            read = sum(nbytes(i) for i in inputs)
        return Op(name, read, written, True)


class trace_ops:
    """``with trace_ops() as t: ...`` records every op into ``t`` (a ``Trace``) and raises
    ``HostSync`` at the first data-dependent op."""

    def __init__(self) -> None:
        self.trace = Trace()
        self._dispatch = _Recorder(self.trace)
        self._function = _SdpaAsOneKernel(self.trace)

    def __enter__(self) -> Trace:
        self._dispatch.__enter__()
        self._function.__enter__()
        return self.trace

    def __exit__(self, *exc) -> None:
        self._function.__exit__(*exc)
        self._dispatch.__exit__(*exc)


def meta_model(
    preset: str = "mixtral-8x7b",
    *,
    layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    int8: bool = False,
    kernels: bool = True,
) -> Mixtral:
    """A preset's exact shapes on the meta device (no memory), ``layers`` of them (default: all),
    quantised to int8 when asked, with the GPU kernels installed as loading onto CUDA does
    (``kernels``; without them: the reference modules' GPU branches)."""
    full = MixtralConfig.from_preset(preset)
    config = full if layers is None else MixtralConfig.from_dict({**full.to_dict(), "num_hidden_layers": layers})
    with torch.device("meta"):
        model = Mixtral(config).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if kernels:
        install_cuda_kernels(model)
    if int8:
        quantize_model(model)  # (installs the kernels again for the int8 modules)
    return model


def meta_cache(model: Mixtral, batch: int, length: int) -> KVCache:
    """A cache for the heads the model holds (all, or one rank's under tensor parallelism)."""
    kv = model.layers[0].attention.n_kv_heads
    return KVCache(model.config, batch, length, device=layer_devices(model), dtype=model.dtype, num_kv_heads=kv)


@torch.no_grad()
def trace_prefill(model: Mixtral, batch: int, prompt_len: int, cache_len: int) -> Trace:
    """The prompt's forward pass into a fresh cache."""
    cache = meta_cache(model, batch, cache_len)
    ids = torch.zeros(batch, prompt_len, dtype=torch.long, device=model.device)
    with trace_ops() as t:
        prefill(model, ids, cache, None)
    return t


@torch.no_grad()
def trace_decode(model: Mixtral, batch: int, position: int, cache_len: int) -> Trace:
    """One decode step at ``position`` (the cache holds ``position`` tokens before it)."""
    cache = meta_cache(model, batch, cache_len)
    dev = model.device
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    slot = torch.tensor([position], device=dev)
    positions = torch.full((batch, 1), position, device=dev)
    with trace_ops() as t:
        decode_step(model, tokens, cache, slot, positions)
    return t


def kv_bytes_attended(model: Mixtral, batch: int, cache_len: int) -> int:
    """Bytes of keys and values one decode step reads: every layer's cache, all its slots."""
    c = model.config
    size = torch.empty((), dtype=model.dtype).element_size()
    return 2 * c.num_hidden_layers * batch * c.num_key_value_heads * cache_len * c.head_dim * size


__all__ = [
    "HostSync",
    "Op",
    "Trace",
    "kv_bytes_attended",
    "meta_cache",
    "meta_model",
    "nbytes",
    "sdpa_backend",
    "trace_decode",
    "trace_ops",
    "trace_prefill",
]
