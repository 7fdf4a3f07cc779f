"""The reference model: plain PyTorch modules, no accelerator (``mixtral.py`` reads top to bottom)."""

from .cache import KVCache
from .mixtral import Attention, Block, FeedForward, Linear, Mixtral, Output, RMSNorm, SparseMoE
from .quant import Int8Linear, Int8MoE, quantize_model

__all__ = [
    "Attention",
    "Block",
    "FeedForward",
    "Int8Linear",
    "Int8MoE",
    "KVCache",
    "Linear",
    "Mixtral",
    "Output",
    "RMSNorm",
    "SparseMoE",
    "quantize_model",
]
