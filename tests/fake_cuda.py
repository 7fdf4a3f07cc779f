"""Two (or more) CUDA devices faked on a CPU-only build, for the fake-GPU suite.

FakeTensors carry a ``cuda:N`` device and shapes but no data, so device placement is checked for
real (an op mixing ``cuda:0`` and ``cuda:1`` raises) and every ``device.type == "cuda"`` branch
runs. What the CPU build lacks is stood in for, and nothing else:
- some Tensor methods' C++ bindings (indexing ``x[i]``, ``x[i] = v``, ``~x``) open a device
  guard for the tensor's device, which this build cannot make for CUDA ("PyTorch is not linked
  with support for cuda devices"): ``_DeviceGuards`` retries such a call with the operands'
  device read as ``meta`` and puts the device back on the results (after checking the operands
  share one device; the shapes are FakeTensor's own);
- the CUDA runtime the generation loop calls (current stream, ``torch.cuda.stream``, events,
  synchronize, pinned host buffers and the copies into them): ``FakeCuda`` records which stream
  each device-to-host copy and each event used; a pinned buffer is a real CPU tensor of ones (a
  token that is not EOS: fake tensors hold no tokens to copy).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

META = torch.device("meta")
aten = torch.ops.aten


class _DeviceGuards(TorchFunctionMode):
    """Tensor methods whose C++ binding opens a device guard (indexing, ``~x``...) fail for CUDA
    here: such a call is retried with its fake operands' device read as ``meta``, and the device
    put back on the results. Operands on two CUDA devices raise, as a GPU would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except RuntimeError as exc:
            if "not linked with support for cuda" not in str(exc):
                raise
        fakes = [
            t for t in tree_flatten((args, kwargs))[0] if isinstance(t, FakeTensor) and t.fake_device.type == "cuda"
        ]
        saved = [(t, t.fake_device) for t in fakes]
        devices = {d for _, d in saved}
        if len(devices) != 1:
            raise RuntimeError(f"{func}: operands on devices {sorted(map(str, devices))}")
        (device,) = devices
        for t in fakes:
            t.fake_device = META
        try:
            out = func(*args, **kwargs)
        finally:
            for t, d in saved:
                t.fake_device = d
        for o in tree_flatten(out)[0]:
            if isinstance(o, FakeTensor) and o.fake_device == META:
                o.fake_device = device
        return out


class Stream:
    def __init__(self, device: torch.device, name: str = "default") -> None:
        self.device, self.name = device, name

    def __repr__(self) -> str:
        return f"Stream({self.device}, {self.name})"


@dataclass
class Runtime:
    """What the generation loop asked of the (fake) CUDA runtime."""

    current: dict[torch.device, Stream] = field(default_factory=dict)
    host_copies: list[tuple[torch.device, Stream]] = field(default_factory=list)  # (source device, stream)
    events: list[Event] = field(default_factory=list)
    synchronized: list[torch.device | None] = field(default_factory=list)

    def stream(self, device: torch.device | int | None = None) -> Stream:
        d = torch.device("cuda", 0 if device is None else device) if not isinstance(device, torch.device) else device
        return self.current.setdefault(d, Stream(d))


class Event:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime, self.stream, self.waited = runtime, None, False
        runtime.events.append(self)

    def record(self, stream: Stream | None = None) -> None:
        self.stream = stream if stream is not None else self.runtime.stream()

    def synchronize(self) -> None:
        self.waited = True

    def __repr__(self) -> str:
        return f"Event(recorded on {self.stream}, waited={self.waited})"


class _HostMemory(TorchDispatchMode):
    """Pinned host buffers (real CPU tensors) and the device-to-host copies into them (recorded)."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.empty.memory_format and kwargs.get("pin_memory"):
            with unset_fake_temporarily():
                return torch.ones(args[0], dtype=kwargs.get("dtype"))
        if func is aten.copy_.default and not isinstance(args[0], FakeTensor) and isinstance(args[1], FakeTensor):
            src = args[1].device
            self.runtime.host_copies.append((src, self.runtime.stream(src)))
            return args[0]
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda(monkeypatch):
    """``with fake_cuda(monkeypatch) as (mode, runtime):`` FakeTensor CUDA devices and the fake runtime."""
    runtime = Runtime()

    @contextlib.contextmanager
    def stream_context(stream: Stream):
        before = runtime.current.get(stream.device)
        runtime.current[stream.device] = stream
        try:
            yield stream
        finally:
            if before is None:
                runtime.current.pop(stream.device)
            else:
                runtime.current[stream.device] = before

    monkeypatch.setattr(torch.cuda, "current_stream", runtime.stream)
    monkeypatch.setattr(torch.cuda, "stream", stream_context)
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: Event(runtime))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: runtime.synchronized.append(device))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, _DeviceGuards(), _HostMemory(runtime):
        yield mode, runtime


def to_fake_devices(model: torch.nn.Module, mode: FakeTensorMode, devices: list[torch.device]) -> None:
    """Put a meta model's weights on fake CUDA devices the way ``load_model(device_map=...)`` does
    (``weights.device_map.device_of``): layer i on ``devices[i]``, the embedding on the first, the
    final norm and head on the last."""
    from mixtral_lite.weights.device_map import device_of

    tied = model.config.tie_word_embeddings
    for prefix, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in list(getattr(module, kind).items()):
                if t is None:
                    continue
                d = device_of(f"{prefix}.{name}" if prefix else name, devices, tied)
                fake = FakeTensor(mode, t.to(META), d)
                getattr(module, kind)[name] = (
                    torch.nn.Parameter(fake, requires_grad=False) if kind == "_parameters" else fake
                )
