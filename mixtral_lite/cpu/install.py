"""Installing the CPU kernels onto a model, once: ``install_cpu_kernels(model)``.

The decision is made for the model as it is then: every module of a reference class that has an
accelerated version (``modules.ACCELERATED``) and whose own weights are on the CPU is swapped for
it; everything else is left as it is and counted with the reason. The float32 weight matrices are
laid out for the products that will run them (``layout.py``): row-major for the C kernel, column-
major for PyTorch's matrix-vector product when the kernel cannot be built here.
Large weights then move onto 2 MiB pages (``hugepages.py``): decoding streams them, and fewer pages
mean fewer TLB misses.

What may change afterwards, and what happens then:
- a weight replaced, moved or converted (``.to()``, a new ``Parameter``, ``.data =``): caught. The
  accelerated modules check their inputs' and weights' dtype, device and layout per call and defer
  to the reference otherwise; the one-call layer rebuilds its plan when a weight's identity or
  address changes.
- quantising: caught. ``quantize_model`` takes the kernels off (``model.cpu_kernels.uninstall``)
  and installs them again for the int8 modules.
- anything else that swaps modules by hand: install again (``install_cpu_kernels`` re-decides).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from . import build
from .hugepages import place_on_huge_pages
from .layer import StepInputs
from .layout import cpu_layout
from .modules import ACCELERATED, REFERENCE, CpuBlock


@dataclass
class CpuKernels:
    """What ``install_cpu_kernels`` did: the C kernel's state, the modules swapped and those left."""

    kernel: str  # build.status(): "on (library)" or "off (why)"
    installed: dict[str, int] = field(default_factory=dict)  # reference class name -> modules swapped
    skipped: dict[str, int] = field(default_factory=dict)  # "Class (reason)" -> modules left as they are
    layout: str = ""
    huge_pages: str = ""  # what place_on_huge_pages moved

    def install(self, model: nn.Module) -> CpuKernels:
        """Install again (for a model whose modules changed); the model's new report."""
        return install_cpu_kernels(model)

    def uninstall(self, model: nn.Module) -> None:
        uninstall_cpu_kernels(model)

    def __str__(self) -> str:
        parts = [f"C kernel {self.kernel}"]
        if self.installed:
            parts.append("accelerated " + ", ".join(f"{n} {c}" for c, n in self.installed.items()))
        else:
            parts.append("nothing accelerated")
        if self.skipped:
            parts.append("left as they are " + ", ".join(f"{n} {c}" for c, n in self.skipped.items()))
        if self.layout:
            parts.append(self.layout)
        if self.huge_pages:
            parts.append(self.huge_pages)
        return "CPU kernels: " + "; ".join(parts)


def install_cpu_kernels(model: nn.Module) -> CpuKernels:
    """Swap the modules of ``model`` that run on the CPU for their accelerated versions (in place;
    installing twice re-decides for the model as it is now). Returns the report, also kept as
    ``model.cpu_kernels``."""
    if getattr(model, "cpu_kernels", None) is not None:
        uninstall_cpu_kernels(model)
    kernel = build.available()
    installed: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    step_inputs = StepInputs()
    for m in model.modules():
        fast = ACCELERATED.get(type(m))
        if fast is None:
            continue
        name = type(m).__name__
        devices = {t.device.type for t in [*m.parameters(), *m.buffers()]}
        if devices - {"cpu"}:
            skipped[f"{name} (on {', '.join(sorted(devices - {'cpu'}))})"] += 1
            continue
        m.__class__ = fast
        if fast is CpuBlock:
            m.step_inputs = step_inputs
        installed[name] += 1
    for m in model.modules():
        if isinstance(m, CpuBlock) and m.declined() is not None:
            skipped[f"one-call layer ({m.declined()})"] += 1
    cpu_layout(model, kernel=kernel)
    layout = "float32 matrices row-major" if kernel else "float32 matrices column-major (PyTorch's matrix-vector)"
    moved, nbytes = place_on_huge_pages(model) if installed else (0, 0)
    huge = f"{moved} weights ({nbytes / 2**20:.0f} MiB) on 2 MiB pages" if moved else ""
    report = CpuKernels(build.status(), dict(installed), dict(skipped), layout, huge)
    model.cpu_kernels = report
    return report


def uninstall_cpu_kernels(model: nn.Module) -> None:
    """Put the reference classes back (weights stay where and as they are)."""
    for m in model.modules():
        ref = REFERENCE.get(type(m))
        if ref is not None:
            m.__class__ = ref
            m.__dict__.pop("_layer_plan", None)  # holds the weights it was built for
            m.__dict__.pop("step_inputs", None)
    model.cpu_kernels = None


def cpu_kernels_status(model: nn.Module | None = None) -> str:
    """One line: what is installed on ``model`` (or, without one, whether the C kernel builds here)."""
    report = None if model is None else getattr(model, "cpu_kernels", None)
    if report is not None:
        return str(report)
    if model is not None:
        return f"CPU kernels: not installed (C kernel {build.status()})"
    return f"CPU kernels: C kernel {build.status()}"


__all__ = ["CpuKernels", "cpu_kernels_status", "install_cpu_kernels", "uninstall_cpu_kernels"]
