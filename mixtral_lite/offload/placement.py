"""Where each layer's experts live: with the layer on the device, in host memory, or on disk.

Experts are almost all of an MoE's weights and a token reads only K of E of them per layer, so
they are the tensors worth keeping out of the fast memory; attention, norms, the router, the
embeddings and the KV cache stay with the model on its device. A placement names, per decoder
layer, where its expert stacks live:

- ``device``: with the rest of the layer (the plain, all-resident model);
- ``cpu``: in host memory, computed there on the routed tokens' hidden states (llama.cpp's
  ``--cpu-moe``, Fiddler); only meaningful when the model runs on a GPU;
- ``disk``: read on demand from the memory-mapped checkpoint into an LRU of experts in memory.

``plan_placement`` is a pure function of the config, dtype, quantisation and free bytes per
memory: the tests drive it with made-up sizes. Explicit placements (``experts_on``, ``n_cpu_moe``:
the first N layers' experts go there, as llama.cpp's ``--n-cpu-moe``) are checked to fit; ``auto``
offloads the fewest first layers that make the model fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import MixtralConfig
from ..errors import UserError

PLACES = ("device", "cpu", "disk")
EXPERTS_ON = ("auto", "cpu", "disk")
HEADROOM = 0.1  # share of each memory kept free for activations, the KV cache and the allocator
_EXPERT_TENSOR = re.compile(r"layers\.(\d+)\.feed_forward\.(w[123])(_scale)?\Z")


def expert_tensor(name: str) -> tuple[int, str] | None:
    """(layer, "w1"|"w2"|"w3") for a routed-expert tensor name (its int8 scale too), else None."""
    m = _EXPERT_TENSOR.match(name)
    return None if m is None else (int(m[1]), m[2])


@dataclass(frozen=True)
class ModelBytes:
    """Bytes of a model in one dtype/quantisation: everything but the routed experts, and each
    MoE layer's experts (0 for dense layers)."""

    rest: int
    experts: tuple[int, ...]  # per layer
    n_experts: int

    @property
    def per_expert(self) -> int:
        """Bytes of one expert (largest layer): what one cache slot or one read holds."""
        return max(self.experts) // self.n_experts if self.experts and self.n_experts else 0


def model_bytes(config: MixtralConfig, dtype: torch.dtype, quantize: str | None = None) -> ModelBytes:
    """Sizes from the model built on the meta device (every variant sized exactly), quantised
    there when asked: int8 weights are one byte plus a scale per output row."""
    from ..model.mixtral import Mixtral
    from ..model.quant import quantize_model

    with torch.device("meta"):
        model = Mixtral(config).to(dtype)
    if quantize is not None:
        quantize_model(model, quantize)
    experts = [0] * config.num_hidden_layers
    rest = 0
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        where = expert_tensor(name)
        if where is None:
            rest += n
        else:
            experts[where[0]] += n
    return ModelBytes(rest, tuple(experts), config.num_experts)


@dataclass(frozen=True)
class Placement:
    """Per layer, where its experts live (``PLACES``; dense layers say ``device``), and how many
    experts per offloaded layer the LRU keeps (on the device for ``cpu`` prefills, in memory for
    ``disk``). ``needed``: bytes each memory holds under this placement."""

    device: str
    experts: tuple[str, ...]
    cache: int = 0
    needed: tuple[tuple[str, int], ...] = ()

    @property
    def offloaded(self) -> list[int]:
        return [i for i, p in enumerate(self.experts) if p != "device"]

    @property
    def resident(self) -> bool:
        return not self.offloaded

    def __str__(self) -> str:
        if self.resident:
            return f"experts: all on {self.device}"
        parts = []
        for place in PLACES:
            layers = [i for i, p in enumerate(self.experts) if p == place]
            if layers:
                where = self.device if place == "device" else place
                parts.append(f"layers {_ranges(layers)} on {where}")
        need = ", ".join(f"{m} {_gb(b)}" for m, b in self.needed)
        return f"experts: {'; '.join(parts)}; cache {self.cache} per offloaded layer" + (
            f" (needs {need})" if need else ""
        )


def plan_placement(
    config: MixtralConfig,
    dtype: torch.dtype,
    free: dict[str, int],
    *,
    quantize: str | None = None,
    experts_on: str = "auto",
    n_cpu_moe: int | None = None,
    cache: int | None = None,
    headroom: float = HEADROOM,
) -> Placement:
    """Place every layer's experts given ``free`` ({memory: free bytes}; the first key is the
    model's device, ``"cpu"`` is host memory and may be that device).

    ``experts_on``: ``cpu`` or ``disk`` puts the experts of the first ``n_cpu_moe`` MoE layers
    (default: all) there; ``auto`` keeps everything on the device when it fits, else offloads the
    fewest first layers (to host memory beside a GPU when it has room, else to disk). ``cache``:
    experts per offloaded layer kept in the LRU (default: as many as fit, at most half of them).
    Raises ``UserError`` naming the bytes needed and available when even this does not fit.
    """
    if not free:
        raise UserError("placement: no memory to place the model in")
    if experts_on not in EXPERTS_ON:
        raise UserError(f"experts_on: expected one of {', '.join(EXPERTS_ON)}, got {experts_on!r}", param="experts_on")
    device = next(iter(free))
    on_cpu = device == "cpu"
    if on_cpu and experts_on == "cpu":
        raise UserError(
            "experts_on: 'cpu' keeps the experts in host memory beside a GPU, but the model runs on the CPU; "
            "use 'disk' to keep them out of memory",
            param="experts_on",
        )
    sizes = model_bytes(config, dtype, quantize)
    moe_layers = [i for i, b in enumerate(sizes.experts) if b]
    n_layers = config.num_hidden_layers
    if n_cpu_moe is not None:
        if isinstance(n_cpu_moe, bool) or not isinstance(n_cpu_moe, int) or not 0 <= n_cpu_moe <= n_layers:
            raise UserError(
                f"n_cpu_moe: expected a number of layers in 0..{n_layers}, got {n_cpu_moe!r}",
                param="n_cpu_moe",
            )
        if experts_on == "auto":
            experts_on = "disk" if on_cpu else "cpu"
    if cache is not None and (
        isinstance(cache, bool) or not isinstance(cache, int) or not 0 <= cache <= config.num_experts
    ):
        raise UserError(
            f"expert_cache: expected 0..{config.num_experts} experts per layer, got {cache!r}", param="expert_cache"
        )
    budget = {m: max(0, int(b * (1 - headroom))) for m, b in free.items()}

    def layout(count: int, place: str) -> list[str]:
        chosen = set(moe_layers[:count])
        return [place if i in chosen else "device" for i in range(n_layers)]

    if experts_on != "auto":
        count = len(moe_layers) if n_cpu_moe is None else min(n_cpu_moe, len(moe_layers))
        return _checked(device, layout(count, experts_on), sizes, budget, cache, headroom)
    try:
        return _checked(device, layout(0, "device"), sizes, budget, cache, headroom)
    except UserError:
        pass
    for place in ("disk",) if on_cpu else ("cpu", "disk"):  # the fewest first layers offloaded that fit
        for count in range(1, len(moe_layers) + 1):
            try:
                return _checked(device, layout(count, place), sizes, budget, cache, headroom)
            except UserError:
                continue
    return _checked(device, layout(len(moe_layers), "disk"), sizes, budget, cache, headroom)  # or says why not


def _checked(
    device: str, experts: list[str], sizes: ModelBytes, budget: dict[str, int], cache: int | None, headroom: float
) -> Placement:
    """The placement if every memory holds what it must (choosing the cache when not given)."""
    host = "cpu"
    on_cpu = device == host
    need = {device: sizes.rest}
    need.setdefault(host, 0)
    for i, place in enumerate(experts):
        where = device if place == "device" else host if place == "cpu" else None
        if where is not None:
            need[where] += sizes.experts[i]
    offloaded = [i for i, p in enumerate(experts) if p != "device"]
    # The LRU lives on the device for ``cpu`` layers (prefill copies) and in memory for ``disk``.
    n_cpu, n_disk = (sum(experts[i] == p for i in offloaded) for p in ("cpu", "disk"))
    slots = {device: n_cpu + n_disk} if on_cpu else {device: n_cpu, host: n_disk}
    one = sizes.per_expert
    if cache is None:
        fits = []
        for m, n in slots.items():
            if n:
                left = budget.get(m, 0) - need[m]
                fits.append(max(0, left // (one * n)) if one else 0)
        cache = min([sizes.n_experts // 2, *fits]) if fits else 0
    for m, n in slots.items():
        need[m] += cache * one * n
    avail = {m: budget.get(m, 0) for m in need}
    short = [m for m in need if need[m] > avail[m]]
    if short:
        listing = ", ".join(
            f"{m} needs {_gb(need[m])} ({need[m]:,} bytes), has {_gb(avail[m])} ({avail[m]:,} bytes)" for m in short
        )
        where = "; ".join(
            f"{p} {_ranges([i for i, q in enumerate(experts) if q == p])}" for p in PLACES if p in experts
        )
        raise UserError(
            f"placement: does not fit with experts on {where} and a cache of {cache} per offloaded layer: {listing} "
            f"(after keeping {headroom:.0%} free)"
        )
    needed = tuple((m, b) for m, b in need.items() if b)
    return Placement(device, tuple(experts), cache, needed)


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for a, b in zip(layers, [*layers[1:], None], strict=True):
        start = a if start is None else start
        if b != a + 1:
            out.append(str(a) if a == start else f"{start}-{a}")
            start = None
    return ",".join(out)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


__all__ = ["EXPERTS_ON", "PLACES", "ModelBytes", "Placement", "expert_tensor", "model_bytes", "plan_placement"]
