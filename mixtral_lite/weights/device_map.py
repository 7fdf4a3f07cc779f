"""Which device each decoder layer lives on.

A device map is one device per layer. The token embedding lives with layer 0 and the final norm +
lm_head with the last layer (with layer 0 when the lm_head is tied to the embedding);
``Mixtral.forward`` moves activations between layer devices.

Accepted forms (``resolve_device_map``):

- ``"auto"``: split the layers across the visible GPUs in proportion to their free memory
  (``plan_device_map``, a pure function of the config, dtype and free bytes);
- a list with one device per layer, e.g. ``["cuda:0"] * 16 + ["cuda:1"] * 16``;
- a dict of inclusive layer ranges (or single layers) to devices, e.g.
  ``{"0-15": "cuda:0", "16-31": "cuda:1"}``; every layer exactly once;
- the same as a string (for command lines): ``"0-15=cuda:0,16-31=cuda:1"``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import MixtralConfig
from ..errors import UserError

HEADROOM = 0.1  # share of each device's free memory kept for activations, the KV cache and kernels


def check_device(device: str | torch.device) -> torch.device:
    """A usable device: cpu, cuda or cuda:N (N among the visible GPUs); "cuda" means the current one."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"device: expected cpu, cuda or cuda:N, got {device!r} ({exc})") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UserError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise UserError(f"device {device!r}: CUDA is not available on this machine")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device("cuda", index)


def module_bytes(config: MixtralConfig, dtype: torch.dtype) -> list[int]:
    """Bytes per layer in ``dtype``, embedding counted in layer 0 and norm + lm_head in the last.

    Sizes come from the model built on the meta device, so every variant is sized exactly.
    """
    from ..model.mixtral import Mixtral

    with torch.device("meta"):
        model = Mixtral(config)
    item = torch.empty((), dtype=dtype).element_size()
    sizes = [sum(p.numel() for p in layer.parameters()) * item for layer in model.layers]
    layer_names = {id(p) for p in model.layers.parameters()}
    rest = {n: p for n, p in model.named_parameters() if id(p) not in layer_names}
    for name, p in rest.items():
        sizes[0 if name.startswith("tok_embeddings") or config.tie_word_embeddings else -1] += p.numel() * item
    return sizes


def plan_device_map(
    config: MixtralConfig, dtype: torch.dtype, free: dict[str, int], *, headroom: float = HEADROOM
) -> list[str]:
    """Spread the layers over ``free`` ({device: free bytes}, in order) in proportion to free memory.

    Layers stay in order and whole; a layer goes to the device whose share its middle byte falls in,
    or to the next device when it would overflow this one. Raises ``UserError`` naming the bytes
    needed and available when the model (or one layer) does not fit.
    """
    if not free:
        raise UserError("device_map: no devices to place the model on")
    devices = list(free)
    budget = [max(0, int(free[d] * (1 - headroom))) for d in devices]
    sizes = module_bytes(config, dtype)
    total, avail = sum(sizes), sum(budget)
    dtype_name = str(dtype).removeprefix("torch.")
    listing = ", ".join(f"{d} {_gb(b)}" for d, b in zip(devices, budget, strict=True))
    if total > avail:
        raise UserError(
            f"device_map: the model needs {_gb(total)} ({total:,} bytes) in {dtype_name}, the devices have "
            f"{_gb(avail)} ({avail:,} bytes) after keeping {headroom:.0%} free: {listing}"
        )
    bounds, acc = [], 0
    for b in budget:  # where each device's proportional share of the model ends
        acc += b
        bounds.append(total * acc / avail)
    used = [0] * len(devices)
    plan: list[str] = []
    d, position = 0, 0
    for i, size in enumerate(sizes):
        middle = position + size / 2
        while d < len(devices) - 1 and (middle > bounds[d] or used[d] + size > budget[d]):
            d += 1
        if used[d] + size > budget[d]:
            raise UserError(
                f"device_map: layer {i} needs {_gb(size)} ({size:,} bytes) but {devices[d]} has "
                f"{_gb(budget[d] - used[d])} ({budget[d] - used[d]:,} bytes) left (layers are not split): {listing}"
            )
        used[d] += size
        position += size
        plan.append(devices[d])
    return plan


def parse_device_map(spec: str | list | dict, num_layers: int) -> list[str]:
    """An explicit map (list, dict of ranges, or "0-15=cuda:0,16-31=cuda:1") -> one device per layer."""
    if isinstance(spec, str):
        items: dict = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            layers, sep, device = part.partition("=")
            if not sep:
                raise UserError(f"device_map: expected 'auto' or LAYERS=DEVICE[,...] like '0-15=cuda:0', got {part!r}")
            items[layers.strip()] = device.strip()
        spec = items
    if isinstance(spec, (list, tuple)):
        if len(spec) != num_layers:
            raise UserError(f"device_map: expected one device per layer ({num_layers}), got {len(spec)}")
        return [str(d) for d in spec]
    if not isinstance(spec, dict):
        raise UserError(f"device_map: expected 'auto', a list or a dict, got {type(spec).__name__}")
    plan: list[str | None] = [None] * num_layers
    for layers, device in spec.items():
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(layers))
        if m is None:
            raise UserError(f"device_map: expected a layer or range like '0-15', got {layers!r}")
        first, last = int(m[1]), int(m[2] or m[1])
        if first > last or last >= num_layers:
            raise UserError(f"device_map: range {layers!r} is outside layers 0-{num_layers - 1}")
        for i in range(first, last + 1):
            if plan[i] is not None:
                raise UserError(f"device_map: layer {i} is given twice ({plan[i]} and {device})")
            plan[i] = str(device)
    unset = [str(i) for i, d in enumerate(plan) if d is None]
    if unset:
        raise UserError(f"device_map: no device for layer(s) {', '.join(unset[:8])}{' ...' if len(unset) > 8 else ''}")
    return [d for d in plan if d is not None]


def resolve_device_map(device_map: str | list | dict, config: MixtralConfig, dtype: torch.dtype) -> list[torch.device]:
    """One checked device per layer; "auto" reads the free memory of every visible GPU."""
    if device_map == "auto":
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise UserError("device_map='auto': no CUDA GPU is visible (use device='cpu')")
        free = {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
        names = plan_device_map(config, dtype, free)
    else:
        names = parse_device_map(device_map, config.num_hidden_layers)
    return [check_device(n) for n in names]


def device_of(name: str, devices: list[torch.device], tied: bool) -> torch.device:
    """Where tensor ``name`` lives given one device per layer: layer tensors on their layer's device,
    the embedding with layer 0, the final norm and lm_head with the last layer (with layer 0 when
    the lm_head is the embedding: tied weights)."""
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return devices[int(m[1])]
    return devices[0] if tied or name.startswith("tok_embeddings.") else devices[-1]


def layer_devices(model: nn.Module) -> list[torch.device]:
    """The device of every decoder layer (e.g. to build a ``KVCache`` for a split model)."""
    return [next(layer.parameters()).device for layer in model.layers]


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


__all__ = [
    "check_device",
    "device_of",
    "layer_devices",
    "module_bytes",
    "parse_device_map",
    "plan_device_map",
    "resolve_device_map",
]
