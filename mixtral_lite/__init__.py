"""mixtral_lite: a small, fast, readable Mixtral-style sparse MoE decoder in PyTorch."""

from .cache import KVCache
from .config import ConfigError, MixtralConfig, MoEConfig
from .generate import generate, stream
from .loading import load_model
from .model import Mixtral
from .params import ParamCount, count_parameters
from .saving import save_pretrained
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "KVCache",
    "Mixtral",
    "MixtralConfig",
    "MoEConfig",
    "ParamCount",
    "count_parameters",
    "generate",
    "load_model",
    "load_tokenizer",
    "save_pretrained",
    "stream",
]
