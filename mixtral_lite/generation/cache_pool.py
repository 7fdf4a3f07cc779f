"""KV caches kept between ``generate`` calls for a compiled decode step.

A compiled step is specialised to its input shapes, and under CUDA graphs to the addresses of the
cache tensors too: a fresh cache per call would re-record the graph every time, and every new
(batch, prompt + new tokens) would compile again until dynamo's recompile limit. So the compiled
step carries a pool: cache lengths are rounded up to a bucket and one cache per (model, batch,
length) is reused (reset: every slot marked empty), so a graph is recorded once per bucket.
A longer cache only costs attention over masked slots.
"""

from __future__ import annotations

import weakref

import torch

from ..model.cache import KVCache


class CachePool:
    def __init__(self, bucket: int = 256, size: int = 4) -> None:
        self.bucket, self.size = bucket, size
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: KVCache}

    def length(self, length: int) -> int:
        """``length`` rounded up to the bucket."""
        return -(-length // self.bucket) * self.bucket

    def get(self, model: torch.nn.Module, batch: int, length: int, devices: list, num_kv_heads: int) -> KVCache:
        """An empty cache of at least ``length`` slots for ``batch`` rows, the same object for the
        same bucket; at most ``size`` caches are kept per model (the least recently used goes)."""
        length = self.length(length)
        held = self._caches.setdefault(model, {})
        key = (batch, length, model.dtype, tuple(torch.device(d) for d in devices), num_kv_heads)
        cache = held.pop(key, None)
        if cache is None:
            cache = KVCache(model.config, batch, length, device=devices, dtype=model.dtype, num_kv_heads=num_kv_heads)
        else:
            cache.reset()
        held[key] = cache  # the most recently used last
        while len(held) > self.size:
            del held[next(iter(held))]
        return cache


__all__ = ["CachePool"]
