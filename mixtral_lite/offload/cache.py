"""The expert LRU (mixtral-offloading's cache) and the counters the stats line reports.

One ``ExpertLRU`` per offloaded layer keeps the most recently used experts' weights (on the device
for experts computed there, in memory for experts read from disk). The same class replays a
routing trace (``replay``) for the hit-rate table in docs/offloading.md, so the table measures the
cache that runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass
class OffloadStats:
    """Counters shared by every offloaded layer of a model (``model.offload.stats``).

    ``hits``/``misses``: expert lookups in the LRUs; ``bytes_read``: expert bytes read from the
    checkpoint files; ``bytes_copied``: expert bytes copied to the device (cache misses);
    ``bytes_moved``: hidden states and results sent between the device and the host; ``calls``:
    offloaded layer calls."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_copied: int = 0
    bytes_moved: int = 0
    calls: int = 0
    lock: ClassVar[threading.Lock] = threading.Lock()  # experts are read by several threads at once

    def snapshot(self) -> OffloadStats:
        return OffloadStats(**asdict(self))

    def since(self, before: OffloadStats) -> OffloadStats:
        return OffloadStats(**{k: v - getattr(before, k) for k, v in asdict(self).items()})

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self, tokens: int = 0) -> dict[str, Any]:
        """The counters, the hit rate, and per token (of ``tokens``) the bytes read and moved."""
        out: dict[str, Any] = {**asdict(self), "hit_rate": self.hit_rate}
        if tokens:
            out["bytes_read_per_token"] = self.bytes_read / tokens
            out["bytes_copied_per_token"] = self.bytes_copied / tokens
            out["bytes_moved_per_token"] = self.bytes_moved / tokens
        return out

    def summary(self, tokens: int) -> str:
        per = max(tokens, 1)
        parts = [f"expert cache hit rate {self.hit_rate:.0%}"]
        if self.bytes_read:
            parts.append(f"read {self.bytes_read / per / 1e6:.1f} MB/token")
        if self.bytes_copied:
            parts.append(f"copied {self.bytes_copied / per / 1e6:.1f} MB/token")
        if self.bytes_moved:
            parts.append(f"moved {self.bytes_moved / per / 1e3:.1f} KB/token")
        return ", ".join(parts)


class ExpertLRU:
    """The ``capacity`` most recently used experts of one layer: ``get(e, load)`` returns expert
    ``e``'s weights, calling ``load(e)`` on a miss and evicting the least recently used beyond
    ``capacity``. Capacity 0 keeps nothing (every lookup loads; the OS page cache still helps)."""

    def __init__(self, capacity: int, stats: OffloadStats | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"ExpertLRU: capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.stats = stats if stats is not None else OffloadStats()
        self._items: OrderedDict[int, Any] = OrderedDict()

    def __contains__(self, e: int) -> bool:
        return e in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[int]:
        """Cached experts, least recently used first."""
        return list(self._items)

    def get(self, e: int, load: Callable[[int], Any]) -> Any:
        item = self.lookup(e)
        if item is None:
            item = load(e)
            self.put(e, item)
        return item

    def lookup(self, e: int) -> Any:
        """Expert ``e``'s weights if cached (a hit, now the most recent), else None."""
        item = self._items.get(e)
        if item is not None:
            self._items.move_to_end(e)
            self.stats.hits += 1
        return item

    def put(self, e: int, item: Any) -> None:
        """Record a miss and keep ``item`` (evicting the least recently used beyond capacity)."""
        self.stats.misses += 1
        if self.capacity:
            while len(self._items) >= self.capacity:
                self._items.popitem(last=False)
            self._items[e] = item

    def clear(self) -> None:
        self._items.clear()


def replay(steps: Iterable[Iterable[int]], capacity: int) -> OffloadStats:
    """Hit and miss counts of one layer's LRU over a routing trace: ``steps`` holds each token's
    chosen experts, in order (what decoding asks of the cache)."""
    lru = ExpertLRU(capacity)
    for chosen in steps:
        for e in sorted(set(chosen)):
            lru.get(e, lambda e: True)
    return lru.stats


def reuse_rate(steps: list[list[int]]) -> float:
    """The routing's own locality: the share of a token's chosen experts that the token before it
    chose too (1.0: every token repeats the last one's experts)."""
    same = total = 0
    for before, now in zip(steps, steps[1:], strict=False):
        total += len(now)
        same += len(set(now) & set(before))
    return same / total if total else 0.0


__all__ = ["ExpertLRU", "OffloadStats", "replay", "reuse_rate"]
