"""Putting a placement onto a model, once: ``offload_experts(model, placement, reader)``.

Like the CPU kernels, offloading is installed, never checked per call inside the reference model:
each offloaded layer's MoE module changes class (``moe.offload_moe``) and its expert stacks move
into a store. ``load_model(experts_on=..., n_cpu_moe=..., expert_cache=...)`` does this before a
byte of a disk-resident expert is read; ``resolve_placement`` reads the free memory and calls the
pure planner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MixtralConfig
from ..errors import UserError
from ..model.mixtral import SparseMoE
from ..model.quant import Int8MoE
from ..weights.checkpoint import Checkpoint
from .cache import OffloadStats
from .moe import offload_moe
from .placement import Placement, plan_placement
from .stores import CachedExperts, DiskExperts, ExpertReader, HostExperts, Product, expert_product

# Rows from which a layer whose experts are in host memory copies them to the GPU instead of
# sending the hidden states to the CPU: an estimate (docs/offloading.md), not yet measured on a GPU.
COPY_MIN_TOKENS = 128


@dataclass
class Offload:
    """What ``offload_experts`` did (``model.offload``): the placement, the counters, and the
    reader whose memory maps the disk-resident experts are read from."""

    placement: Placement
    stats: OffloadStats
    reader: ExpertReader | None = None

    def __str__(self) -> str:
        return str(self.placement)


def cpu_product(x: torch.Tensor, ws, ss) -> torch.Tensor:
    """The per-expert product through the CPU kernels (``cpu.products``), tied to
    ``stores.expert_product`` by the tests."""
    from ..cpu.products import swiglu, swiglu_int8

    return swiglu(x, *ws) if ss is None else swiglu_int8(x, ws, ss)


def offload_experts(
    model: nn.Module,
    placement: Placement,
    reader: ExpertReader | None = None,
    *,
    cpu_kernels: bool = True,
    copy_min_tokens: int = COPY_MIN_TOKENS,
) -> Offload:
    """Move every offloaded layer's experts (``placement.experts[i]`` ``cpu`` or ``disk``) into a
    store, in place. ``cpu``: the stacks are copied to host memory (pinned beside a GPU) and the
    layer's device keeps an LRU of ``placement.cache`` experts for prefills of at least
    ``copy_min_tokens`` rows. ``disk``: ``reader`` reads each expert on demand into an in-memory
    LRU of ``placement.cache`` experts (the stacks may be meta tensors: they are never read).
    ``cpu_kernels``: the experts computed on the CPU use the CPU kernels' products (else the
    reference products, as a model without the kernels installed)."""
    if len(placement.experts) != len(model.layers):
        raise UserError(f"placement: {len(placement.experts)} layers given, the model has {len(model.layers)}")
    if getattr(model, "offload", None) is not None:
        raise UserError("offload: the model's experts are offloaded already")
    stats = OffloadStats()
    product: Product = cpu_product if cpu_kernels else expert_product
    for i, place in enumerate(placement.experts):
        if place == "device":
            continue
        moe = model.layers[i].feed_forward
        if not isinstance(moe, SparseMoE):
            raise UserError(f"placement: layer {i} has a dense feed-forward, no experts to place on {place}")
        int8 = isinstance(moe, Int8MoE)
        dev = moe.gate.weight.device
        n_experts = moe.w1.shape[0]
        if place == "cpu":
            pin = dev.type == "cuda"
            ws = tuple(_host(getattr(moe, p), pin) for p in ("w1", "w2", "w3"))
            ss = tuple(_host(s, pin) for s in moe.scales()) if int8 else None
            store = HostExperts(ws, ss, product)
        elif place == "disk":
            if reader is None:
                raise UserError("placement: experts on disk need the checkpoint to read them from")
            want = {
                p: (getattr(moe, p).dtype, getattr(moe, f"{p}_scale").dtype if int8 else None)
                for p in ("w1", "w2", "w3")
            }
            disk = DiskExperts(reader, i, n_experts, want, stats, product)
            store = CachedExperts(disk, torch.device("cpu"), placement.cache, stats, product)
        else:
            raise UserError(f"placement: layer {i}: expected one of device, cpu, disk, got {place!r}")
        prefill = None
        if dev.type != "cpu":
            prefill = CachedExperts(store, dev, placement.cache, stats, expert_product)
        offload_moe(moe, store, stats, prefill=prefill, copy_min_tokens=copy_min_tokens)
    model.offload = Offload(placement, stats, reader)
    return model.offload


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    return t.pin_memory() if pin else t


def free_memory(device: torch.device) -> dict[str, int]:
    """{device: free bytes, "cpu": available host memory}: what ``plan_placement`` places into."""
    free: dict[str, int] = {}
    if device.type == "cuda":
        free[str(device)] = torch.cuda.mem_get_info(device)[0]
    free["cpu"] = host_available()
    return free


def host_available() -> int:
    """MemAvailable from /proc/meminfo (the kernel's estimate of what can be allocated without
    swapping), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_placement(
    config: MixtralConfig,
    dtype: torch.dtype,
    device: torch.device,
    *,
    quantize: str | None,
    experts_on: str | None,
    n_cpu_moe: int | None,
    expert_cache: int | None,
    ckpt: Checkpoint,
) -> Placement:
    """The placement for a load: planned against the free memory now; disk placements need a
    checkpoint whose tensors can be memory-mapped (safetensors)."""
    placement = plan_placement(
        config,
        dtype,
        free_memory(device),
        quantize=quantize,
        experts_on=experts_on or "auto",
        n_cpu_moe=n_cpu_moe,
        cache=expert_cache,
    )
    if "disk" in placement.experts and ckpt.format != "safetensors":
        raise UserError(
            f"experts_on='disk': {ckpt.files[0]} is a {ckpt.format} file, which cannot be memory-mapped expert by "
            "expert; convert it to safetensors (load it and save_pretrained) or use experts_on='cpu'",
            param="experts_on",
        )
    return placement


__all__ = [
    "COPY_MIN_TOKENS",
    "Offload",
    "cpu_product",
    "free_memory",
    "host_available",
    "offload_experts",
    "resolve_placement",
]
