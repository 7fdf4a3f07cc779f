"""The GPU backend: Triton kernels for the int8 experts that read only the chosen experts
(``triton_moe.py``), registered as ``torch.library`` ops (``ops.py``), and the accelerated modules
that use them (``modules.py``), installed onto a model once (``install_cuda_kernels``). The
reference model never imports this package; Triton is imported only when a kernel first runs."""

from .install import CudaKernels, install_cuda_kernels, uninstall_cuda_kernels

__all__ = ["CudaKernels", "install_cuda_kernels", "uninstall_cuda_kernels"]
