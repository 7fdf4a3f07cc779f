"""The CPU backend: a C kernel for decoding (``csrc/``, built on first use), oneDNN and split products
for the shapes PyTorch's defaults run slowly, and the accelerated modules that use them, installed
onto a model once (``install_cpu_kernels``). The reference model never imports this package."""

from .install import CpuKernels, cpu_kernels_status, install_cpu_kernels, uninstall_cpu_kernels

__all__ = ["CpuKernels", "cpu_kernels_status", "install_cpu_kernels", "uninstall_cpu_kernels"]
