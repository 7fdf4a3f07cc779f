"""A KV cache kept between ``generate`` calls, so a prompt that extends the previous one (the next
turn of a chat) prefills only its new tokens.

The cache remembers the token ids whose keys and values it holds. The next prompt reuses the
longest common prefix of those ids and itself (at least its last token is always run again, since
its logits pick the first new token); the slots after the prefix are marked empty and overwritten.
The cache grows (a new, larger allocation that keeps the prefix) when a prompt plus its new tokens
no longer fit: its size follows the conversation rather than the model's whole context, because
attention reads every slot of the cache at each step.
"""

from __future__ import annotations

import torch

from ..model.cache import KVCache

GROWTH = 256  # slots are allocated in multiples of this


class PromptCache:
    """One conversation's cache for ``generate(..., cache=PromptCache())`` (one prompt per call)."""

    def __init__(self) -> None:
        self.kv: KVCache | None = None
        self.ids: list[int] = []  # tokens held in slots 0 .. len(ids) - 1

    def reset(self) -> None:
        self.kv, self.ids = None, []

    def reuse(self, prompt: list[int]) -> int:
        """How many leading prompt tokens already sit in the cache (< len(prompt))."""
        n = 0
        for a, b in zip(self.ids, prompt[:-1], strict=False):
            if a != b:
                break
            n += 1
        return n

    def take(
        self, model: torch.nn.Module, prompt: list[int], length: int, devices, num_kv_heads: int
    ) -> tuple[KVCache, int]:
        """A cache of at least ``length`` slots holding this prompt's reusable prefix, and its size."""
        fits = self._fits(model, devices, num_kv_heads)
        kept = self.reuse(prompt) if fits else 0
        kv = self.kv if fits else None
        if kv is None or kv.max_seq_len < length:
            size = -(-length // GROWTH) * GROWTH
            new = KVCache(model.config, 1, size, device=devices, dtype=model.dtype, num_kv_heads=num_kv_heads)
            if kv is not None and kept:
                for old, fresh in ((kv.k, new.k), (kv.v, new.v)):
                    for o, f in zip(old, fresh, strict=True):
                        f[:, :, :kept].copy_(o[:, :, :kept])
                new.pos[:, :kept] = kv.pos[:, :kept]
                new.valid[:, :kept] = kv.valid[:, :kept]
            kv = new
        kv.valid[:, kept:] = False  # stale slots of an earlier, longer conversation
        self.kv, self.ids = kv, list(prompt[:kept])
        return kv, kept

    def hold(self, ids: list[int]) -> None:
        """Record the tokens now written to slots 0 .. len(ids) - 1."""
        self.ids = list(ids)

    def _fits(self, model: torch.nn.Module, devices, num_kv_heads: int) -> bool:
        """Whether the held cache has the layout this model needs now (dtype, heads, devices)."""
        kv = self.kv
        if kv is None:
            return False
        probe = KVCache(model.config, 1, 1, device="meta", dtype=model.dtype, num_kv_heads=num_kv_heads)
        want = devices if isinstance(devices, list) else [torch.device(devices)] * len(kv.k)

        def layout(ts):
            return [(t.dtype, t.shape[:2] + t.shape[3:]) for t in ts]

        return (
            layout(kv.k) == layout(probe.k)
            and layout(kv.v) == layout(probe.v)
            and [t.device for t in kv.k] == [torch.device(d) for d in want]
        )


__all__ = ["PromptCache"]
