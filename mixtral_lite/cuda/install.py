"""Installing the GPU kernels onto a model, once: ``install_cuda_kernels(model)``.

Mirrors the CPU backend (``mixtral_lite.cpu.install``): every module of a reference class with an
accelerated version (``modules.ACCELERATED``) whose weights all live on an accepted device type is
swapped for it (its class changes, its weights stay), the rest counted with the reason. CUDA needs
Triton importable; ``meta`` (the fake-GPU traces) needs nothing, its ops run by their shapes; the
CPU is accepted only when asked (the tests run the kernels in Triton's interpreter).
``quantize_model`` takes them off and installs them again for the int8 modules it makes.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from .modules import ACCELERATED, REFERENCE

DEVICE_TYPES = ("cuda", "meta")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclass
class CudaKernels:
    """What ``install_cuda_kernels`` did: the modules swapped and those left, with why."""

    installed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    device_types: tuple[str, ...] = DEVICE_TYPES

    def install(self, model: nn.Module) -> CudaKernels:
        """Install again (for a model whose modules changed), on the same device types."""
        return install_cuda_kernels(model, device_types=self.device_types)

    def uninstall(self, model: nn.Module) -> None:
        uninstall_cuda_kernels(model)

    def __str__(self) -> str:
        done = ", ".join(f"{n} {c}" for c, n in self.installed.items()) or "nothing"
        left = ", ".join(f"{n} {c}" for c, n in self.skipped.items())
        return f"GPU kernels: installed {done}" + (f"; left as they are {left}" if left else "")


def install_cuda_kernels(model: nn.Module, *, device_types: tuple[str, ...] = DEVICE_TYPES) -> CudaKernels:
    """Swap the modules of ``model`` whose weights live on ``device_types`` for their GPU versions
    (in place; installing twice re-decides). Returns the report, also kept as ``model.cuda_kernels``."""
    if getattr(model, "cuda_kernels", None) is not None:
        uninstall_cuda_kernels(model)
    installed: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    triton = None
    for m in model.modules():
        fast = ACCELERATED.get(type(m))
        if fast is None:
            continue
        name = type(m).__name__
        devices = {t.device.type for t in [*m.parameters(), *m.buffers()]}
        if devices - set(device_types):
            skipped[f"{name} (on {', '.join(sorted(devices - set(device_types)))})"] += 1
            continue
        if devices - {"meta"}:
            triton = triton_available() if triton is None else triton
            if not triton:
                skipped[f"{name} (Triton not installed)"] += 1
                continue
        m.__class__ = fast
        installed[name] += 1
    report = CudaKernels(dict(installed), dict(skipped), tuple(device_types))
    model.cuda_kernels = report
    return report


def uninstall_cuda_kernels(model: nn.Module) -> None:
    """Put the reference classes back (weights stay where and as they are)."""
    for m in model.modules():
        ref = REFERENCE.get(type(m))
        if ref is not None:
            m.__class__ = ref
    model.cuda_kernels = None


__all__ = ["DEVICE_TYPES", "CudaKernels", "install_cuda_kernels", "triton_available", "uninstall_cuda_kernels"]
