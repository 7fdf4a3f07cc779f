"""Which slice of each parameter a rank holds, and turning a model into one rank's shard.

The model code is not forked: a rank's model is the ordinary ``Mixtral`` with smaller parameters
and its hooks set (``Attention.n_heads`` / ``n_kv_heads`` / ``reduce``, ``SparseMoE.dispatch`` /
``reduce``). ``param_slices`` is the single description of the split; the loader reads exactly
those slices from the files, and ``shard_model`` cuts them from a model already in memory (the
tests compare the two routes and the single-process model).

Every parameter must have a rule: a name this module does not know (a shared expert, a dense
layer of a variant) stops with an error instead of being silently replicated or dropped.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import MixtralConfig
from ..model.mixtral import Attention, Mixtral, SparseMoE
from .dist import AllReduce, ParallelError, ParallelState
from .expert import LocalExperts, check_expert_parallel, expert_parallel_slices, expert_range
from .tensor import check_tensor_parallel, head_split, tensor_parallel_slices

# Parameters with a rule: replicated (embeddings, norms, router, lm head) or split (attention by the
# tensor-parallel rule, stacked experts by both rules).
_KNOWN = re.compile(
    r"(?:(tok_embeddings|norm|output)\.weight"
    r"|layers\.\d+\.(attention_norm|ffn_norm|feed_forward\.gate)\.weight"
    r"|layers\.\d+\.attention\.w[qkvo]\.weight|layers\.\d+\.feed_forward\.w[123]"
    r"|layers\.\d+\.attention\.[qk]_norm\.weight)\Z"  # per-head q/k norms: replicated
)


def check_parallel(config: MixtralConfig, tp: int, ep: int) -> None:
    """Every size check, before any rank joins a group or reads a file."""
    moe = config.moe
    dense = [i for i in range(config.num_hidden_layers) if config.is_dense_layer(i)]
    if tp * ep > 1 and (moe.kind != "topk" or moe.n_shared_experts or dense):
        raise ParallelError(
            f"--tp {tp} --ep {ep}: parallel runs support top-k routed experts (moe.kind 'topk', no shared "
            f"experts or dense layers), got kind {moe.kind!r}, n_shared_experts {moe.n_shared_experts}, "
            f"dense layers {dense}"
        )
    a = config.attention
    if tp * ep > 1 and (a.latent or a.qkv_bias or a.qk_norm == "full" or a.clip_qkv is not None):
        raise ParallelError(
            f"--tp {tp} --ep {ep}: parallel runs support grouped-query attention with per-head q/k norms at "
            f"most; this {config.family} model has latent attention, q/k/v biases or a whole-projection q/k norm"
        )
    check_tensor_parallel(config, tp)
    check_expert_parallel(config, ep)


def param_slices(name: str, shape: tuple[int, ...], config: MixtralConfig, state: ParallelState) -> tuple[slice, ...]:
    """One slice per dimension of parameter ``name`` (full shape ``shape``) for this rank."""
    if not _KNOWN.match(name):
        raise ParallelError(f"tensor/expert parallel: no sharding rule for parameter {name!r}")
    cut = [slice(0, n) for n in shape]
    for rule in (
        tensor_parallel_slices(name, config, state.tp, state.tp_rank) if state.tp > 1 else None,
        expert_parallel_slices(name, config, state.ep, state.ep_rank) if state.ep > 1 else None,
    ):
        for dim, s in (rule or {}).items():
            cut[dim] = s
    return tuple(cut)


def local_shape(slices: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in slices)


def configure(model: Mixtral, state: ParallelState) -> Mixtral:
    """Set the hooks of a model whose parameters already hold this rank's slices."""
    if not state.distributed:
        return model
    heads = head_split(model.config, state.tp, state.tp_rank)
    first = expert_range(model.config, state.ep, state.ep_rank).start
    for block in model.layers:
        attn, moe = block.attention, block.feed_forward
        if not isinstance(attn, Attention) or not isinstance(moe, SparseMoE):
            raise ParallelError(f"tensor/expert parallel: unsupported layer {type(moe).__name__}")
        attn.n_heads = heads.q.stop - heads.q.start
        attn.n_kv_heads = heads.kv.stop - heads.kv.start
        attn.reduce = AllReduce(state.tp_group) if state.tp > 1 else None
        if state.ep > 1:
            impl = moe.dispatch.impl if isinstance(moe.dispatch, LocalExperts) else moe.dispatch
            moe.dispatch = LocalExperts(first, impl)
        moe.reduce = AllReduce(state.group)  # partial sums over I (tp) and over experts (ep)
    return model


@torch.no_grad()
def shard_model(model: Mixtral, state: ParallelState) -> Mixtral:
    """Cut this rank's slices out of a full model in memory (copies, so the full weights can go)."""
    check_parallel(model.config, state.tp, state.ep)
    if not state.distributed:
        return model
    for name, p in list(model.named_parameters()):
        local = p[param_slices(name, tuple(p.shape), model.config, state)]
        if local.shape != p.shape:
            _set_parameter(model, name, nn.Parameter(local.clone(), requires_grad=p.requires_grad))
    return configure(model, state)


def local_kv_heads(model: Mixtral) -> int:
    """Key/value heads this rank's cache must hold (``KVCache(..., num_kv_heads=...)``)."""
    return model.layers[0].attention.n_kv_heads


def _set_parameter(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, value)
