"""Weight matrices on 2 MiB pages (Linux transparent huge pages), for batch-1 decoding.

Decoding streams every active weight once per token. On 4 KiB pages that is one TLB miss per 4 KiB
read, and in a virtual machine each miss walks two sets of page tables; on 2 MiB pages the misses
are 512 times fewer. PyTorch's CPU allocator takes ordinary 4 KiB pages (and the system's THP
setting is usually ``madvise``: only memory that asks for huge pages gets them), so
``install_cpu_kernels`` moves each large weight into memory that asks: an anonymous mapping
aligned to 2 MiB and advised ``MADV_HUGEPAGE`` before its first write. Shapes, strides, values,
names and the ``Parameter`` objects stay; only the addresses change (as ``cpu_layout``'s copies do),
which the one-call layer's plans notice and follow. ``MIXTRAL_LITE_HUGEPAGES=0`` switches it off
(docs/performance.md has the A/B).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
from pathlib import Path

import torch
from torch import nn

from ..heap import trim_heap

HUGE = 2 << 20
MIN_BYTES = 2 * HUGE  # smaller tensors would sit mostly on the 4 KiB pages at their ends
_MADV_HUGEPAGE = 14  # linux/mman.h
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Linux with transparent huge pages not switched off, and not switched off here."""
    if os.environ.get("MIXTRAL_LITE_HUGEPAGES", "1") == "0" or platform.system() != "Linux":
        return False
    try:
        return "[never]" not in _THP.read_text()
    except OSError:
        return False


def _madvise(address: int, length: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(address, length, _MADV_HUGEPAGE) == 0


def on_huge_pages(t: torch.Tensor) -> bool:
    """Whether ``t`` already lives where ``huge_page_copy`` puts tensors (2 MiB aligned; PyTorch's own
    allocator aligns to 64 bytes, and its large blocks start just past a page boundary)."""
    return t.data_ptr() % HUGE == 0


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` in a private anonymous mapping aligned to 2 MiB, whose whole 2 MiB
    pages were advised ``MADV_HUGEPAGE`` before the copy first touched them (the last partial page
    stays on 4 KiB pages, so no memory is wasted). The tensor keeps the mapping alive."""
    n = t.numel() * t.element_size()
    m = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    probe = ctypes.c_char.from_buffer(m)
    base = ctypes.addressof(probe)
    del probe  # the buffer export: the tensor below holds its own
    offset = -base % HUGE
    _madvise(base + offset, n // HUGE * HUGE)
    out = torch.frombuffer(m, dtype=torch.uint8, count=n, offset=offset).view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


@torch.no_grad()
def place_on_huge_pages(model: nn.Module) -> tuple[int, int]:
    """Move every contiguous CPU weight of at least ``MIN_BYTES`` that decoding streams (parameters
    and int8 buffers; not the embedding table, read one row per token) onto huge pages, in place.
    Returns (tensors moved, their bytes); (0, 0) where ``available()`` is False."""
    if not available():
        return 0, 0
    moved, nbytes = 0, 0
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        size = t.numel() * t.element_size()
        if t.device.type != "cpu" or size < MIN_BYTES or not t.is_contiguous() or name.startswith("tok_embeddings"):
            continue
        if id(t) in seen or on_huge_pages(t) or t.untyped_storage().nbytes() != size:
            continue  # tied (already moved), already there, or a view into a larger storage
        seen.add(id(t))
        t.data = huge_page_copy(t.data)
        trim_heap()  # hand the old storage's pages back now: the peak stays the model plus one tensor
        moved, nbytes = moved + 1, nbytes + size
    return moved, nbytes


__all__ = ["available", "huge_page_copy", "on_huge_pages", "place_on_huge_pages"]
