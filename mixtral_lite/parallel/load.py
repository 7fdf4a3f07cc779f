"""Per-rank loading: each rank reads only its own slices of the checkpoint files.

The checkpoint is opened and checked exactly as ``load_model`` does (``checkpoint.open_checkpoint``
and ``match_tensors``: layout, every key, shape and dtype, before any weight byte is read). Then,
instead of copying whole tensors, each rank copies the region it owns out of the memory-mapped
file: whole heads of ``wq wk wv`` and the matching columns of ``wo``, its experts (``--ep``) and
its rows / columns of each expert's intermediate dimension (``--tp``); embeddings, norms, router
and lm head are replicated. Only the pages under that region are touched, and they are released
after each tensor, so a rank's resident memory is its shard plus one tensor's slice.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

import torch

from ..model.mixtral import Mixtral
from ..weights.checkpoint import Copy, interleaved_to_half, open_checkpoint
from ..weights.loading import assign_tensors, plan_load, resolve_dtype, storage_dtype
from .dist import ParallelError, ParallelState
from .shard import check_parallel, configure, local_shape, param_slices


def load_parallel(
    path: str | Path,
    state: ParallelState,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> Mixtral:
    """This rank's shard of the checkpoint folder ``path`` (eval mode, hooks set).

    ``dtype`` as in ``load_model`` (default bfloat16 on a GPU, float32 on the CPU); ``device``
    defaults to ``state.device``.
    """
    device = torch.device(state.device if device is None else device)
    with open_checkpoint(path) as ckpt:
        config = ckpt.config
        check_parallel(config, state.tp, state.ep)
        if ckpt.quantization is not None:
            mode = ckpt.quantization.mode
            raise ParallelError(f"{ckpt.folder}: {mode} weights: --tp/--ep shard float checkpoints only")
        dtype = resolve_dtype(dtype, [device])
        plan = plan_load(ckpt)
        model, expected = plan.model, plan.expected
        params = {name for name, _ in model.named_parameters()}
        slices = {
            name: param_slices(name, tuple(t.shape), config, state) if name in params else _whole(t)
            for name, t in expected.items()
        }
        tensors = _stream_slices(ckpt, plan.tensors.copies, expected, slices, dtype, device)
    assign_tensors(model, tensors, plan.aliases)
    return configure(model, state).eval()


@torch.no_grad()
def _stream_slices(
    ckpt,
    copies: list[Copy],
    expected: dict[str, torch.Tensor],
    slices: dict[str, tuple[slice, ...]],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Copy this rank's region of every file tensor into local storage, one source tensor at a time."""
    out: dict[str, torch.Tensor] = {}
    for key, group in groupby(copies, key=lambda c: c.key):
        src = ckpt.read(key)  # a view of the mapped file: nothing is read until sliced and copied
        for c in group:
            cut = slices[c.name]
            region = cut
            dest_index: tuple[int, ...] = ()
            if c.expert is not None:  # a per-expert file tensor fills one slice of a stacked parameter
                owned = cut[0]
                if not owned.start <= c.expert < owned.stop:
                    continue  # another rank's expert
                region, dest_index = cut[1:], (c.expert - owned.start,)
            part = src if c.count == 1 else src.chunk(c.count, c.dim)[c.index]
            part = part[region]
            if c.rope_heads is not None:  # whole heads: the per-head permutation commutes with the cut
                part = interleaved_to_half(part, part.shape[0] // (src.shape[0] // c.rope_heads))
            dest = out.get(c.name)
            if dest is None:
                want = storage_dtype(expected[c.name], dtype)
                dest = out[c.name] = torch.empty(local_shape(cut), dtype=want, device=device)
            dest[dest_index].copy_(part)
        del src
        ckpt.release(key)
    return out


def _whole(t: torch.Tensor) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in t.shape)
