"""Handing freed heap memory back to the system.

glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, still resident: a loader
that frees one float tensor after another would otherwise hold the largest of them many times over.
"""

from __future__ import annotations

import ctypes


def trim_heap() -> None:
    """``malloc_trim(0)``: return the heap's free pages now (a no-op without glibc)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


__all__ = ["trim_heap"]
