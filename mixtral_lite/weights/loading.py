"""``load_model``: a checkpoint folder -> a ``Mixtral`` ready for inference.

The model is built on the meta device (no memory), every file key is matched and every shape
checked before a byte of weight data is read, then each tensor streams from its memory-mapped file
straight into storage allocated once, in the final dtype, on its final device. Nothing else is
held: peak host memory is the model in the target dtype (when it lives on the CPU) plus one tensor.
With ``quantize`` each weight is quantised as soon as it has arrived (``quantized.py``): the peak is
the quantised model plus one float tensor.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
from torch import nn

from ..cpu import install_cpu_kernels
from ..cuda import install_cuda_kernels
from ..errors import UserError
from ..heap import trim_heap
from ..model.mixtral import Mixtral
from ..model.quant import DEFAULT_GROUP_SIZE, quantize_model
from ..model.quant4 import ROWS_AT_ONCE  # int4's own row block (HQQ's stop is per block)
from ..offload.install import offload_experts, resolve_placement
from ..offload.placement import Placement, expert_tensor
from ..offload.stores import ExpertReader
from .checkpoint import Checkpoint, Copy, TensorPlan, match_tensors, open_checkpoint
from .device_map import check_device, device_of, resolve_device_map
from .gguf import is_gguf, read_gguf
from .quantized import QuantizationConfig, Quantizer, structure
from .quantized import quantizers as make_quantizers

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    device_map: str | list | dict | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    progress: bool | None = None,
    cpu_kernels: bool = True,
    experts_on: str | None = None,
    n_cpu_moe: int | None = None,
    expert_cache: int | None = None,
) -> Mixtral:
    """Load a checkpoint folder (Hugging Face or original Mistral layout) or a GGUF file (llama.cpp's,
    ``weights/gguf.py``) into a ``Mixtral``.

    ``dtype``: default bfloat16 when any weight goes to a GPU, float32 on the CPU; weights are cast
    one tensor at a time. ``device``: "cpu", "cuda" or "cuda:N". ``device_map``: "auto" or an
    explicit map (see ``weights.device_map``); excludes ``device``. ``quantize`` is passed to
    ``model.quant.quantize_model`` (``group_size``: its int4 group size). ``cpu_kernels``: install the CPU kernels
    (``mixtral_lite.install_cpu_kernels``) when every weight is on the CPU, the GPU's
    (``mixtral_lite.cuda.install_cuda_kernels``) when every weight is on CUDA devices. ``progress``: None
    shows a bar on a terminal for loads longer than a moment, True always, False never.

    ``experts_on`` ("cpu", "disk" or "auto"), ``n_cpu_moe`` (only the first N layers' experts) and
    ``expert_cache`` (experts per offloaded layer kept in an LRU) place the routed experts apart
    from the rest of the model (``mixtral_lite.offload``): disk-resident experts are never loaded,
    they are read from the memory-mapped files as tokens choose them. Raises ``UserError`` before
    returning anything when a file, key, shape, dtype or placement is wrong.
    """
    if is_gguf(path):
        if device_map is not None:
            raise UserError(f"device_map: not supported for GGUF files ({path})", param="device_map")
        if experts_on is not None or n_cpu_moe is not None:
            raise UserError(f"experts_on / n_cpu_moe: not supported for GGUF files ({path})", param="experts_on")
        devices = [check_device(device)]
        gdtype = resolve_dtype(dtype, devices)
        model, tensors = read_gguf(
            path, dtype=gdtype, device=devices[0], quantize=quantize, group_size=group_size or DEFAULT_GROUP_SIZE
        )
        assign_tensors(model, tensors, model_tensors(model)[1])
        del tensors  # as below: installing may move the weights
        model.eval()
        if cpu_kernels and devices[0].type == "cpu":
            install_cpu_kernels(model)
        return model
    ckpt = open_checkpoint(path)
    reader = None
    try:
        config = ckpt.config
        if device_map is not None:
            if str(device) != "cpu":  # the default; a map names every device itself
                raise UserError(f"device={device!r} and device_map: pass one of them")
            plan_dtype = resolve_dtype(dtype, [torch.device("cuda")] if device_map == "auto" else [])
            devices = resolve_device_map(device_map, config, plan_dtype)
        else:
            devices = [check_device(device)] * config.num_hidden_layers
        dtype = resolve_dtype(dtype, devices)
        if quantize is not None and ckpt.quantization is not None:
            raise UserError(f"quantize: {ckpt.folder} is already quantised ({ckpt.quantization.mode})")
        if group_size is not None and quantize is None:
            raise UserError("group_size: only used with quantize", param="group_size")
        plan = plan_load(ckpt, dtype=dtype)
        model, aliases, quantizers = plan.model, plan.aliases, {}
        expected = plan.expected
        placement = None
        if experts_on is not None or n_cpu_moe is not None:
            if device_map is not None and len(set(devices)) > 1:
                raise UserError("experts_on / n_cpu_moe: not combined with a device_map over several devices yet")
            quant = quantize or (ckpt.quantization.mode if ckpt.quantization is not None else None)
            if quant not in (None, "int8"):
                raise UserError(f"experts_on: offloaded experts are float or int8 weights, not {quant}")
            placement = resolve_placement(
                config, dtype, devices[0], quantize=quant, experts_on=experts_on, n_cpu_moe=n_cpu_moe,
                expert_cache=expert_cache, ckpt=ckpt,
            )  # fmt: skip
            if placement.resident:  # "auto" may find that everything fits
                placement = None
        if placement is None and quantize is not None:  # quantised tensor by tensor as they arrive
            qc = QuantizationConfig(quantize, group_size or DEFAULT_GROUP_SIZE, include_output=True)
            with torch.device("meta"):
                model = structure(Mixtral(config), qc, dtype)
            aliases = model_tensors(model)[1]
            quantizers = make_quantizers(model, list(expected))
        on_disk = _disk_tensors(expected, placement)
        where = {name: device_of(name, devices, config.tie_word_embeddings) for name in expected}
        copies = [c for c in plan.tensors.copies if c.name not in on_disk]
        tensors = _stream(ckpt, copies, expected, where, dtype, progress, quantizers)
        if on_disk:
            reader = ExpertReader(ckpt, [c for c in plan.tensors.copies if c.name in on_disk])
    finally:
        if reader is None:
            ckpt.close()
    assign_tensors(model, tensors, aliases, left_on_meta=on_disk)
    del tensors  # the model holds them now: installing may move them (huge pages) and free these
    model.eval()
    if placement is not None:
        if quantize is not None:  # the resident weights now; experts on disk are quantised as they are read
            quantize_model(model, quantize)
        offload_experts(model, placement, reader, cpu_kernels=cpu_kernels)
    if cpu_kernels and all(d.type == "cpu" for d in devices):
        install_cpu_kernels(model)
    elif cpu_kernels and all(d.type == "cuda" for d in devices):  # the GPU backend's, the same way
        install_cuda_kernels(model)
    return model


def _disk_tensors(expected: dict[str, torch.Tensor], placement: Placement | None) -> set[str]:
    """The expert tensors of the layers whose experts stay on disk (never streamed)."""
    if placement is None:
        return set()
    out = set()
    for name in expected:
        where = expert_tensor(name)
        if where is not None and placement.experts[where[0]] == "disk":
            out.add(name)
    return out


@dataclass
class LoadPlan:
    """A checkpoint matched against a model built on the meta device, before any weight is read."""

    model: Mixtral  # on the meta device
    expected: dict[str, torch.Tensor]  # the tensors a checkpoint must fill (``model_tensors``)
    aliases: dict[str, str]  # tied names
    tensors: TensorPlan  # file tensors -> model tensors, and the problems found


def plan_load(ckpt: Checkpoint, *, strict: bool = True, dtype: torch.dtype | None = None) -> LoadPlan:
    """Build the model on the meta device and match every file tensor to it; ``strict``: any
    problem (missing, unexpected or misshapen tensor) is a ``UserError`` naming the folder. A
    quantised checkpoint's model gets its module swaps first (its scales in ``dtype``)."""
    with torch.device("meta"):
        model = Mixtral(ckpt.config)
        if ckpt.quantization is not None:
            structure(model, ckpt.quantization, dtype or torch.float32)
    expected, aliases = model_tensors(model)
    tensors = match_tensors(ckpt, expected, aliases)
    if strict and tensors.problems:
        raise UserError(problems_summary(ckpt.folder, tensors.problems))
    return LoadPlan(model, expected, aliases, tensors)


def storage_dtype(meta: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Floating parameters take the load's ``dtype``; buffers keep the dtype the model declares."""
    return dtype if isinstance(meta, nn.Parameter) and meta.is_floating_point() else meta.dtype


def resolve_dtype(dtype: torch.dtype | str | None, devices: list[torch.device]) -> torch.dtype:
    """The weights' dtype: as asked, else bfloat16 when a GPU is involved and float32 on the CPU."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if any(d.type == "cuda" for d in devices) else torch.float32
    if isinstance(dtype, str):
        if dtype.lower().removeprefix("torch.") not in DTYPES:
            raise UserError(f"dtype: expected one of {sorted(set(DTYPES))}, got {dtype!r}")
        return DTYPES[dtype.lower().removeprefix("torch.")]
    if dtype not in DTYPES.values():
        raise UserError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
    return dtype


def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors a checkpoint must fill: {name: tensor} (parameters and persistent buffers, each
    once) and {alias: name} for tied names (``output.weight`` sharing ``tok_embeddings.weight``)."""
    expected: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
            expected[name] = t
    return expected, aliases


@torch.no_grad()
def _stream(
    ckpt: Checkpoint,
    copies: list[Copy],
    expected: dict[str, torch.Tensor],
    placement: dict[str, torch.device],
    dtype: torch.dtype,
    progress: bool | None,
    quantizers: dict[str, Quantizer] | None = None,
) -> dict[str, torch.Tensor]:
    """Copy every file tensor into its final storage, allocated on first touch; one source at a
    time. A tensor with a quantizer is replaced by its quantised buffers as soon as its last part
    has arrived (its float storage freed then); one expert of a stack (a per-expert file key) is
    quantised on its own into the stack's quantised buffers, so no float stack is ever held."""
    out: dict[str, torch.Tensor] = {}
    quantizers = quantizers or {}
    parts_left = Counter(c.name for c in copies if c.name in quantizers)
    total = sum(ckpt.tensors[k].nbytes for k in dict.fromkeys(c.key for c in copies))
    bar = _progress_bar(total, f"Loading {ckpt.folder.name}", progress)
    try:
        for key, group in groupby(copies, key=lambda c: c.key):
            src = ckpt.read(key)
            part = None
            for c in group:
                whole = c.expert is None and c.count == 1 and c.rope_heads is None and parts_left[c.name] == 1
                if c.name in quantizers and whole and src.dim() == 2 and src.shape == expected[c.name].shape:
                    _quantize_rows(out, ckpt, key, src, expected[c.name], quantizers[c.name], dtype, placement[c.name])
                    continue
                if c.name in quantizers and c.expert is not None and c.count == 1 and c.rope_heads is None:
                    _quantize_expert(out, c, src, expected[c.name], quantizers[c.name], dtype, placement[c.name])
                    continue
                dest = out.get(c.name)
                if dest is None:
                    meta = expected[c.name]
                    want = storage_dtype(meta, dtype)
                    dest = out[c.name] = torch.empty(meta.shape, dtype=want, device=placement[c.name])
                part = src if c.count == 1 else src.chunk(c.count, c.dim)[c.index]
                target = dest if c.expert is None else dest[c.expert]
                if c.rope_heads is None:
                    target.copy_(part)
                else:
                    _copy_interleaved_to_half(target, part, c.rope_heads)
                if c.name in parts_left:
                    parts_left[c.name] -= 1
                    if parts_left[c.name] == 0:
                        del target, dest
                        out.update(quantizers[c.name](out.pop(c.name)))
            del src, part
            ckpt.release(key)
            if quantizers:
                trim_heap()  # the float tensor just quantised is freed: its pages go back now
            if bar is not None:
                bar.update(ckpt.tensors[key].nbytes)
    finally:
        if bar is not None:
            bar.close()
    return out


def _quantize_rows(
    out: dict[str, torch.Tensor],
    ckpt: Checkpoint,
    key: str,
    src: torch.Tensor,
    meta: torch.Tensor,
    quantizer: Quantizer,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """A whole 2-D weight quantised straight from the file's view, a block of rows at a time, each
    block's file pages dropped once read: neither a float copy of the tensor nor all its file pages
    are ever held. Rows are independent, and the blocks are the ones ``quantize_model`` takes, so
    the buffers equal quantising the loaded tensor."""
    want = storage_dtype(meta, dtype)
    row_bytes = src[0].numel() * src.element_size() if len(src) else 0
    for i in range(0, len(src), ROWS_AT_ONCE):
        block = src[i : i + ROWS_AT_ONCE].to(device=device, dtype=want)
        _place(out, quantizer(block), len(src), slice(i, i + len(block)))
        del block
        ckpt.release(key, upto=(i + ROWS_AT_ONCE) * row_bytes)


def _quantize_expert(
    out: dict[str, torch.Tensor],
    c: Copy,
    src: torch.Tensor,
    meta: torch.Tensor,
    quantizer: Quantizer,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Expert ``c.expert`` of a stacked weight, quantised alone (as ``quantize_model`` quantises a
    stack: slice by slice) into the stack's quantised buffers, allocated at the first expert."""
    part = torch.empty(1, *meta.shape[1:], dtype=storage_dtype(meta, dtype), device=device)
    part[0].copy_(src)
    _place(out, quantizer(part), meta.shape[0], slice(c.expert, c.expert + 1))


def _place(out: dict[str, torch.Tensor], pieces: dict[str, torch.Tensor], rows: int, at: slice) -> None:
    """Quantised pieces written at rows ``at`` of their buffers, each allocated (``rows`` long, on
    the pieces' device) by the first piece that reaches it."""
    for name, piece in pieces.items():
        buf = out.get(name)
        if buf is None:
            buf = out[name] = torch.empty(rows, *piece.shape[1:], dtype=piece.dtype, device=piece.device)
        buf[at] = piece


def _copy_interleaved_to_half(dest: torch.Tensor, src: torch.Tensor, heads: int) -> None:
    """dest[h, j*hd/2 + i] = src[h, 2i + j]: ``checkpoint.interleaved_to_half`` without a temporary."""
    rows, dim = src.shape
    half = rows // heads // 2
    dest.view(heads, 2, half, dim).copy_(src.view(heads, half, 2, dim).transpose(1, 2))


def assign_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str], left_on_meta: set[str] = frozenset()
) -> None:
    """Put the loaded storage in place of the meta tensors (assign semantics) and re-tie aliases;
    ``left_on_meta``: tensors that stay meta (experts read from disk later)."""
    for name, t in tensors.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf in module._parameters:
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad and t.is_floating_point())
        else:
            module._buffers[leaf] = t
    for alias, name in aliases.items():
        module_name, _, leaf = alias.rpartition(".")
        source_module, _, source_leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, getattr(model.get_submodule(source_module), source_leaf))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n not in left_on_meta]
    if left:
        raise RuntimeError(f"load_model: tensors left on the meta device (not in the state dict?): {left[:5]}")


def _progress_bar(total: int, desc: str, progress: bool | None):
    """tqdm on stderr: forced on/off by ``progress``; by default only on a terminal, after 1 s."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, delay=0 if progress else 1.0, leave=False
    )


def problems_summary(folder: Path, problems: list[str]) -> str:
    more = (
        f" (and {len(problems) - 3} more; `mixtral-lite info --model {folder}` lists them)" if len(problems) > 3 else ""
    )
    return f"{folder}: " + "; ".join(problems[:3]) + more


__all__ = ["LoadPlan", "load_model", "model_tensors", "plan_load", "resolve_dtype", "storage_dtype"]
