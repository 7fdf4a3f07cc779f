"""mixtral_lite: a small, fast, readable Mixtral-style sparse MoE decoder in PyTorch.

The names below are imported on first use (PEP 562), so ``mixtral-lite --help`` and
``python -m mixtral_lite --version`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ConfigError": "config",
    "MixtralConfig": "config",
    "MoEConfig": "config",
    "ParamCount": "params",
    "count_parameters": "params",
    "Mixtral": "model.mixtral",
    "KVCache": "model.cache",
    "quantize_model": "model.quant",
    "load_model": "weights.loading",
    "save_pretrained": "weights.saving",
    "generate": "generation.generate",
    "stream": "generation.generate",
    "GenerationOptions": "generation.generate",
    "PromptCache": "generation.prompt_cache",
    "GenerationResult": "generation.generate",
    "GenerationStats": "generation.generate",
    "TextStream": "generation.generate",
    "SamplingParams": "generation.sampling",
    "Tokenizer": "generation.tokenizer",
    "load_tokenizer": "generation.tokenizer",
    "UserError": "errors",
    "CpuKernels": "cpu.install",
    "install_cpu_kernels": "cpu.install",
    "uninstall_cpu_kernels": "cpu.install",
    "cpu_kernels_status": "cpu.install",
    "CudaKernels": "cuda.install",
    "install_cuda_kernels": "cuda.install",
    "uninstall_cuda_kernels": "cuda.install",
    "bundled_path": "bundle",
}

__all__ = [
    "GenerationOptions",
    "ConfigError",
    "CpuKernels",
    "CudaKernels",
    "GenerationResult",
    "GenerationStats",
    "KVCache",
    "Mixtral",
    "MixtralConfig",
    "MoEConfig",
    "ParamCount",
    "PromptCache",
    "SamplingParams",
    "TextStream",
    "Tokenizer",
    "UserError",
    "bundled_path",
    "count_parameters",
    "cpu_kernels_status",
    "generate",
    "install_cpu_kernels",
    "install_cuda_kernels",
    "load_model",
    "load_tokenizer",
    "quantize_model",
    "save_pretrained",
    "stream",
    "uninstall_cpu_kernels",
    "uninstall_cuda_kernels",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mixtral_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from .bundle import bundled_path
    from .config import ConfigError, MixtralConfig, MoEConfig
    from .cpu.install import CpuKernels, cpu_kernels_status, install_cpu_kernels, uninstall_cpu_kernels
    from .cuda.install import CudaKernels, install_cuda_kernels, uninstall_cuda_kernels
    from .errors import UserError
    from .generation.generate import GenerationOptions, GenerationResult, GenerationStats, TextStream, generate, stream
    from .generation.prompt_cache import PromptCache
    from .generation.sampling import SamplingParams
    from .generation.tokenizer import Tokenizer, load_tokenizer
    from .model.cache import KVCache
    from .model.mixtral import Mixtral
    from .model.quant import quantize_model
    from .params import ParamCount, count_parameters
    from .weights.loading import load_model
    from .weights.saving import save_pretrained
