"""Quantised checkpoints and quantising while loading.

A quantised model saves under its own parameter names (``model_type: mixtral_lite``, so
transformers refuses the folder instead of misreading it) with every int8/int4 buffer (codes,
scales, offsets) and a ``quantization_config`` in ``config.json``:

    {"quant_method": "mixtral_lite", "mode": "int4-hqq", "group_size": 64, "include_output": true,
     "format": 1}

``load_model`` reads it back without the original weights: the model is built on the meta device,
given the same module swaps (``structure``), and matched strictly against the file like any other
layout. ``quantizers`` is the other direction: loading a float folder with ``quantize=``, each
weight is quantised as soon as its last file tensor has arrived and its float copy dropped, so
the float model is never held whole (peak: the quantised model plus one float tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..model.mixtral import Mixtral
from ..model.quant import MODES, SPECS, Int8Linear, Int8MoE, quantize_model, quantize_per_channel
from ..model.quant4 import Int4Linear, Int4MoE, quantize4

QUANT_METHOD = "mixtral_lite"
FORMAT = 1


@dataclass(frozen=True)
class QuantizationConfig:
    mode: str
    group_size: int
    include_output: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "mode": self.mode,
            "group_size": self.group_size,
            "include_output": self.include_output,
            "format": FORMAT,
        }


def read_quantization_config(raw: object, source: str) -> QuantizationConfig | None:
    """The ``quantization_config`` of a config.json (None when absent); a clear error for another
    tool's format (GPTQ, AWQ, bitsandbytes ...) or a malformed entry."""
    if raw is None:
        return None
    where = f"{source}: quantization_config"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected an object, got {type(raw).__name__}")
    method = raw.get("quant_method")
    if method != QUANT_METHOD:
        raise UserError(f"{where}: quant_method {method!r} is not supported (only {QUANT_METHOD!r}, ours)")
    if raw.get("format") != FORMAT:
        raise UserError(f"{where}: format expected {FORMAT}, got {raw.get('format')!r}")
    mode, group, output = raw.get("mode"), raw.get("group_size"), raw.get("include_output")
    if mode not in MODES:
        raise UserError(f"{where}: mode expected one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 32 or group % 32:
        raise UserError(f"{where}: group_size expected a positive multiple of 32, got {group!r}")
    if not isinstance(output, bool):
        raise UserError(f"{where}: include_output expected true or false, got {output!r}")
    return QuantizationConfig(mode, group, output)


def model_quantization_config(model: nn.Module) -> QuantizationConfig | None:
    info = getattr(model, "quantization", None)
    if not getattr(model, "quantized", None) or info is None:
        return None
    return QuantizationConfig(info["mode"], info["group_size"], info["include_output"])


def structure(model: Mixtral, qc: QuantizationConfig, dtype: torch.dtype) -> Mixtral:
    """Give a meta-device model the module swaps of ``qc`` (in ``dtype``), so its state dict
    names and shapes are those of the quantised checkpoint. No weight data is touched."""
    model.to(dtype)
    quantize_model(model, qc.mode, include_output=qc.include_output, group_size=qc.group_size)
    return model


Quantizer = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def quantizers(quantized: Mixtral, float_names: list[str]) -> dict[str, Quantizer]:
    """For each float tensor name whose module ``quantized`` (a model after ``structure``) holds in
    int8 or int4: the function turning that float tensor into the module's buffers, exactly as
    ``quantize_model`` computes them."""
    method = SPECS[quantized.quantized].method
    out: dict[str, Quantizer] = {}
    for name in float_names:
        module_name, _, leaf = name.rpartition(".")
        m = quantized.get_submodule(module_name)
        if isinstance(m, Int4Linear) and leaf == "weight":
            names = (f"{module_name}.weight", f"{module_name}.scale", f"{module_name}.offset")
            out[name] = _int4(names, m.group_size, method)
        elif isinstance(m, Int8Linear) and leaf == "weight":
            out[name] = _int8((f"{module_name}.weight", f"{module_name}.scale"), m.scale.dtype)
        elif isinstance(m, Int4MoE) and leaf in ("w1", "w2", "w3"):
            names = tuple(f"{module_name}.{leaf}{s}" for s in ("", "_scale", "_offset"))
            out[name] = _int4(names, m.group_size, method)
        elif isinstance(m, Int8MoE) and leaf in ("w1", "w2", "w3"):
            scale = getattr(m, f"{leaf}_scale")
            out[name] = _int8((f"{module_name}.{leaf}", f"{module_name}.{leaf}_scale"), scale.dtype)
    return out


def _int4(names: tuple[str, ...], group_size: int, method: str) -> Quantizer:
    return lambda t: dict(zip(names, quantize4(t, group_size, method), strict=True))


def _int8(names: tuple[str, ...], scale_dtype: torch.dtype) -> Quantizer:
    return lambda t: dict(zip(names, quantize_per_channel(t, scale_dtype), strict=True))


__all__ = [
    "FORMAT",
    "QUANT_METHOD",
    "QuantizationConfig",
    "model_quantization_config",
    "quantizers",
    "read_quantization_config",
    "structure",
]
