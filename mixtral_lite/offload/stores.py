"""Experts that live elsewhere, as ``Experts`` objects the one expert dispatch reads.

A store hands out one expert's weights where it computes (``weights(e)``); ``expert(x, e)`` runs
the per-expert product on them, so every placement goes through the reference dispatch
(``model.experts``) unchanged:

- ``HostExperts``: stacks in host memory, computed on the CPU;
- ``CachedExperts``: an LRU of experts copied from another store (host memory or disk) to where
  they compute; misses load, hits cost nothing;
- ``DiskExperts``: experts read on demand from the memory-mapped checkpoint (what
  ``CachedExperts`` over it keeps in memory above the page cache).

Axis legend: E experts, I expert intermediate size, D hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from ..model.experts import dispatch_experts, experts_sorted, swiglu
from ..model.quant import linear_int8, quantize_per_channel
from ..weights.checkpoint import SAFETENSORS_DTYPES, Checkpoint, Copy
from .cache import ExpertLRU, OffloadStats

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Weights = tuple[Triple, Triple | None]  # (w1, w2, w3) and their int8 scales (None: float weights)
Product = Callable[[torch.Tensor, Triple, Triple | None], torch.Tensor]
READERS = 6  # expert projections read from disk at once (``DiskExperts.load_many``)


def expert_product(x: torch.Tensor, ws: Triple, ss: Triple | None) -> torch.Tensor:
    """One expert on rows x [M, D]: the reference products (``SparseMoE.expert``, ``Int8MoE.expert``)."""
    if ss is None:
        return swiglu(x, *ws)
    (w1, w2, w3), (s1, s2, s3) = ws, ss
    return linear_int8(F.silu(linear_int8(x, w1, s1)) * linear_int8(x, w3, s3), w2, s2)


def weights_bytes(w: Weights) -> int:
    ws, ss = w
    return sum(t.numel() * t.element_size() for t in [*ws, *(ss or ())])


class ExpertStore:
    """What every store shares: ``n_experts``, the ``device`` it computes on, its ``product``.

    ``stacks()`` assembles every expert (a copy: the dispatches that would read whole stacks are
    not chosen for stores, see ``stacks_are_copies``)."""

    stacks_are_copies = True
    n_experts: int
    device: torch.device
    product: Product

    def weights(self, e: int) -> Weights:
        raise NotImplementedError

    @contextlib.contextmanager
    def holding(self, ids: list[int]) -> Iterator[None]:
        """Within the block, experts ``ids`` are at hand (stores that load them load them here,
        together); the stacks held in memory need nothing."""
        yield

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        ws, ss = self.weights(e)
        return self.product(x, ws, ss)

    def stacks(self) -> Triple:
        out = []
        for e in range(self.n_experts):
            ws, ss = self.weights(e)
            if ss is not None:
                ws = tuple(q.to(s.dtype) * s[..., None] for q, s in zip(ws, ss, strict=True))
            out.append(ws)
        return tuple(torch.stack([w[i] for w in out]) for i in range(3))


class HostExperts(ExpertStore):
    """Stacks (w1, w2, w3 [E, ...]; int8 with scales) in host memory, computed on the CPU."""

    def __init__(self, ws: Triple, ss: Triple | None, product: Product = expert_product) -> None:
        self.ws, self.ss = ws, ss
        self.n_experts = ws[0].shape[0]
        self.device = ws[0].device
        self.product = product

    def weights(self, e: int) -> Weights:
        return tuple(w[e] for w in self.ws), None if self.ss is None else tuple(s[e] for s in self.ss)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.ws, *(self.ss or ())])


class CachedExperts(ExpertStore):
    """An LRU of ``capacity`` experts of ``source`` on ``device``: a miss copies the expert there
    (from pinned host memory without waiting, on CUDA), counted in ``stats.bytes_copied`` when it
    crosses devices."""

    def __init__(
        self, source: ExpertStore, device: torch.device, capacity: int, stats: OffloadStats, product: Product
    ) -> None:
        self.source = source
        self.n_experts = source.n_experts
        self.device = torch.device(device)
        self.product = product
        self.stats = stats
        self.lru = ExpertLRU(capacity, stats)
        self._held: dict[int, Weights] = {}

    def weights(self, e: int) -> Weights:
        held = self._held.get(e)
        return held if held is not None else self.lru.get(e, self._load)

    @contextlib.contextmanager
    def holding(self, ids: list[int]) -> Iterator[None]:
        """Load the missing experts of ``ids`` at once (from disk ``READERS`` projections at a
        time: one stream reads a fraction of what the disk gives several), and keep them for the
        call even where the LRU is smaller than the call needs."""
        held: dict[int, Weights] = {}
        missing = []
        for e in dict.fromkeys(ids):
            item = self.lru.lookup(e)
            if item is None:
                missing.append(e)
            else:
                held[e] = item
        if missing and isinstance(self.source, DiskExperts):  # the reads overlap; copies need not
            loaded = [self._here(w) for w in self.source.load_many(missing, READERS)]
        else:
            loaded = [self._load(e) for e in missing]
        for e, item in zip(missing, loaded, strict=True):
            self.lru.put(e, item)
            held[e] = item
        self._held = held
        try:
            yield
        finally:
            self._held = {}

    def _load(self, e: int) -> Weights:
        return self._here(self.source.weights(e))

    def _here(self, w: Weights) -> Weights:
        ws, ss = w
        if ws[0].device == self.device:
            return ws, ss
        with self.stats.lock:
            self.stats.bytes_copied += weights_bytes((ws, ss))
        move = lambda t: t.to(self.device, non_blocking=t.is_pinned())  # noqa: E731
        return tuple(map(move, ws)), None if ss is None else tuple(map(move, ss))


class ExpertReader:
    """Expert slices of a checkpoint, read from its memory-mapped safetensors files.

    ``copies``: the load plan's copies of the expert tensors (any key layout: one key per expert,
    stacked, or transformers' fused ``gate_up_proj``). A slice is copied out of the map into fresh
    memory and the file's pages are dropped from this process, so resident memory holds what the
    LRU keeps, not the file."""

    def __init__(self, ckpt: Checkpoint, copies: list[Copy]) -> None:
        self.ckpt = ckpt
        self.copies: dict[str, list[Copy]] = {}
        for c in copies:
            self.copies.setdefault(c.name, []).append(c)

    def has(self, name: str) -> bool:
        return name in self.copies

    def file_dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.ckpt.tensors[self.copies[name][0].key].dtype]

    @torch.no_grad()
    def read(self, name: str, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """Expert ``e`` of tensor ``name`` in ``dtype`` (cast as loading casts), and the bytes read."""
        for c in self.copies.get(name, ()):
            if c.expert is None or c.expert == e:
                break
        else:
            raise KeyError(f"{self.ckpt.folder}: no file tensor holds expert {e} of {name}")
        src = self.ckpt.read(c.key)
        part = src if c.count == 1 else src.chunk(c.count, c.dim)[c.index]
        if c.expert is None:
            part = part[e]
        out = torch.empty(part.shape, dtype=dtype)
        out.copy_(part)
        n = part.numel() * part.element_size()
        del src, part
        self.ckpt.release(c.key)
        return out, n


class DiskExperts(ExpertStore):
    """One layer's experts read from the checkpoint on each ``weights(e)`` (wrap it in
    ``CachedExperts`` to keep some in memory). ``want``: each projection's (dtype, scale dtype or
    None): int8 slices come with their file scales; a float file read into int8 experts is cast to
    the scale dtype and quantised per expert, as ``quantize_model`` quantises a loaded stack."""

    def __init__(
        self,
        reader: ExpertReader,
        layer: int,
        n_experts: int,
        want: dict[str, tuple[torch.dtype, torch.dtype | None]],
        stats: OffloadStats,
        product: Product = expert_product,
    ) -> None:
        self.reader, self.n_experts = reader, n_experts
        self.names = {p: f"layers.{layer}.feed_forward.{p}" for p in ("w1", "w2", "w3")}
        self.want, self.stats, self.product = want, stats, product
        self.device = torch.device("cpu")

    def weights(self, e: int) -> Weights:
        return self._assemble([self._projection(e, p) for p in self.names])

    def load_many(self, ids: list[int], readers: int) -> list[Weights]:
        """Experts ``ids``, their projections read ``readers`` at a time (a disk gives several
        overlapping reads far more than one)."""
        tasks = [(e, p) for e in ids for p in self.names]
        with ThreadPoolExecutor(min(readers, len(tasks))) as pool:
            parts = list(pool.map(lambda t: self._projection(*t), tasks))
        k = len(self.names)
        return [self._assemble(parts[i * k : (i + 1) * k]) for i in range(len(ids))]

    def _projection(self, e: int, p: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        name = self.names[p]
        dtype, scale_dtype = self.want[p]
        if scale_dtype is None:
            w, n = self.reader.read(name, e, dtype)
            s = None
        elif self.reader.file_dtype(name) == torch.int8:
            w, n = self.reader.read(name, e, torch.int8)
            s, m = self.reader.read(name + "_scale", e, scale_dtype)
            n += m
        else:
            f, n = self.reader.read(name, e, scale_dtype)
            w, s = quantize_per_channel(f, scale_dtype)
        with self.stats.lock:
            self.stats.bytes_read += n
        return w, s

    @staticmethod
    def _assemble(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Weights:
        ws = tuple(w for w, _ in parts)
        ss = tuple(s for _, s in parts) if parts[0][1] is not None else None
        return ws, ss


def run_experts(
    x: torch.Tensor, store: ExpertStore, idx: torch.Tensor, weights: torch.Tensor, impl: str | Callable = "auto"
) -> torch.Tensor:
    """The reference dispatch over a store. Off the CPU ``auto`` sorts and loops over the chosen
    experts (one host read of the counts): a store must know which experts to fetch, and the
    sync-free dispatches would read every expert."""
    with store.holding(idx.unique().tolist()):
        if impl == "auto" and x.device.type != "cpu":
            return experts_sorted(x, store, idx, weights, grouped_mm=False)
        return dispatch_experts(x, store, idx, weights, impl)


__all__ = [
    "CachedExperts",
    "DiskExperts",
    "ExpertReader",
    "ExpertStore",
    "HostExperts",
    "expert_product",
    "run_experts",
    "weights_bytes",
]
