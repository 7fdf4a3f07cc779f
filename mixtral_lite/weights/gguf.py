"""GGUF import: ``load_model("model.gguf")`` for Mixtral files as llama.cpp's converter writes them.

The file is read with the ``gguf`` package (llama.cpp's own reader, memory-mapped; it ships the
numpy dequantisation of the block formats). llama.cpp writes Mixtral as architecture ``llama``
with ``llama.expert_count`` experts; the tensors:

    token_embd.weight, output_norm.weight, output.weight (absent when tied)
    blk.N.attn_norm.weight, blk.N.attn_{q,k,v,output}.weight, blk.N.ffn_norm.weight,
    blk.N.ffn_gate_inp.weight (router), blk.N.ffn_{gate,down,up}_exps.weight (w1, w2, w3 stacked)

and the converter permutes the rows of attn_q and attn_k to the interleaved-pair rotary layout of
the original checkpoints, which this loader undoes (as for the original Mistral layout).

Tensor types, and where each goes:
- F32, F16, BF16: the model's dtype.
- Q4_0: exactly into this project's int4 format with group 32 (same nibble layout; scale d and
  offset -8 d, both float16), when every tensor of that module is Q4_0 and no ``quantize`` is
  asked; otherwise dequantised.
- Q8_0, Q4_K, Q6_K: dequantised to the model's dtype (exact in float32). They do not fit our
  formats exactly: Q8_0 has one scale per 32 inputs (our int8 has one per row), Q4_K's scales are
  products of a float16 and a 6-bit integer (not float16 numbers), Q6_K has 6-bit codes.
  ``quantize=`` then requantises tensor by tensor as for any other checkpoint.
Each tensor is converted on its own, so the peak is the model plus one float32 tensor.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, MixtralConfig
from ..errors import UserError
from ..generation.spm_proto import model_proto
from ..model.mixtral import Mixtral, SparseMoE
from ..model.quant4 import Int4Linear, Int4MoE
from .checkpoint import interleaved_to_half
from .quantized import QuantizationConfig, quantizers, structure

SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K")
Q4_0_GROUP = 32

# GGUF tensor name -> our name; {L} the layer
NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{L}.attn_norm.weight": "layers.{L}.attention_norm.weight",
    "blk.{L}.attn_q.weight": "layers.{L}.attention.wq.weight",
    "blk.{L}.attn_k.weight": "layers.{L}.attention.wk.weight",
    "blk.{L}.attn_v.weight": "layers.{L}.attention.wv.weight",
    "blk.{L}.attn_output.weight": "layers.{L}.attention.wo.weight",
    "blk.{L}.ffn_norm.weight": "layers.{L}.ffn_norm.weight",
    "blk.{L}.ffn_gate_inp.weight": "layers.{L}.feed_forward.gate.weight",
    "blk.{L}.ffn_gate_exps.weight": "layers.{L}.feed_forward.w1",
    "blk.{L}.ffn_down_exps.weight": "layers.{L}.feed_forward.w2",
    "blk.{L}.ffn_up_exps.weight": "layers.{L}.feed_forward.w3",
}
_PATTERNS = [(re.compile(re.escape(k).replace(r"\{L\}", r"(?P<L>\d+)") + r"\Z"), v) for k, v in NAMES.items()]


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".gguf" and p.is_file()


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError(f"{path}: reading GGUF needs the gguf package (pip install 'mixtral-lite[gguf]')") from None
    try:
        return GGUFReader(str(path), "r")
    except Exception as exc:  # bad magic, version, truncation: ValueError, IndexError, struct / numpy errors
        raise UserError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def _value(field) -> Any:
    """A metadata field as a Python value (str, number, or list)."""
    try:
        return field.contents()
    except AttributeError:  # older gguf: decode the parts by hand
        from gguf import GGUFValueType

        kind = field.types[0]
        if kind == GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        if kind == GGUFValueType.ARRAY:
            if len(field.types) > 1 and field.types[1] == GGUFValueType.STRING:
                return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            return [field.parts[i][0].item() for i in field.data]
        return field.parts[field.data[0]][0].item()


@dataclass
class GGUFFile:
    """A GGUF file's metadata and tensor table (the data stays memory-mapped)."""

    path: Path
    reader: Any
    meta: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf ReaderTensor

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.meta:
            raise UserError(f"{self.path}: metadata key {key} is missing (not a Mixtral GGUF from llama.cpp?)")
        return self.meta[key]


def open_gguf(path: str | Path) -> GGUFFile:
    path = Path(path)
    reader = _reader(path)
    try:
        meta = {name: _value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    except Exception as exc:
        raise UserError(f"{path}: unreadable metadata ({type(exc).__name__}: {exc})") from None
    return GGUFFile(path, reader, meta, {t.name: t for t in reader.tensors})


def gguf_config(g: GGUFFile) -> MixtralConfig:
    """The model's shape from the metadata (``{arch}.*`` keys), checked like any config."""
    arch = g.require("general.architecture")
    experts = g.get(f"{arch}.expert_count", 0)
    if arch not in ("llama", "mixtral") or not experts:
        what = f"{arch!r}" + (" without experts" if arch == "llama" else "")
        raise UserError(f"{g.path}: general.architecture: expected Mixtral (llama with llama.expert_count), got {what}")
    tokens = g.get("tokenizer.ggml.tokens")
    embd = g.tensors.get("token_embd.weight")
    vocab = g.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and embd is not None:
        vocab = int(embd.shape[1])
    heads = g.require(f"{arch}.attention.head_count")
    hidden = g.require(f"{arch}.embedding_length")
    try:
        return MixtralConfig(
            vocab_size=int(vocab or 0),
            hidden_size=int(hidden),
            intermediate_size=int(
                g.get(f"{arch}.expert_feed_forward_length") or g.require(f"{arch}.feed_forward_length")
            ),
            num_hidden_layers=int(g.require(f"{arch}.block_count")),
            num_attention_heads=int(heads),
            num_key_value_heads=int(g.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(
                g.get(f"{arch}.attention.key_length") or g.get(f"{arch}.rope.dimension_count") or hidden // heads
            ),
            rms_norm_eps=float(g.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(g.get(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(g.get(f"{arch}.context_length", 32768)),
            tie_word_embeddings="output.weight" not in g.tensors,
            bos_token_id=int(g.get("tokenizer.ggml.bos_token_id", 1)),
            eos_token_id=int(g.get("tokenizer.ggml.eos_token_id", 2)),
            moe={"num_experts": int(experts), "num_experts_per_tok": int(g.get(f"{arch}.expert_used_count", 2))},
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise UserError(f"{g.path}: the metadata do not describe a valid model ({exc})") from None


def gguf_tokenizer_proto(path: str | Path) -> bytes:
    """The SentencePiece model of a GGUF file's ``tokenizer.ggml.*`` metadata (``spm_proto``)."""
    g = open_gguf(path)
    kind = g.get("tokenizer.ggml.model")
    if kind != "llama":
        raise UserError(f"{g.path}: tokenizer.ggml.model: expected 'llama' (SentencePiece), got {kind!r}")
    tokens = g.require("tokenizer.ggml.tokens")
    scores = g.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise UserError(f"{g.path}: tokenizer.ggml.tokens, scores and token_type differ in length")
    return model_proto(
        tokens, scores, types,
        unk_id=int(g.get("tokenizer.ggml.unknown_token_id", 0)),
        bos_id=int(g.get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(g.get("tokenizer.ggml.eos_token_id", 2)),
    )  # fmt: skip


def our_name(name: str) -> str | None:
    for pattern, template in _PATTERNS:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def _type_name(t) -> str:
    return getattr(t.tensor_type, "name", str(t.tensor_type))


def plan(g: GGUFFile, model: Mixtral) -> tuple[dict[str, Any], list[str]]:
    """{our name: gguf tensor} and the problems: unknown or missing names, wrong shapes, types
    this loader does not read."""
    expected = dict(model.state_dict(keep_vars=True))
    if model.config.tie_word_embeddings:
        expected.pop("output.weight", None)
    found: dict[str, Any] = {}
    problems, unexpected = [], []
    for name, t in g.tensors.items():
        ours = our_name(name)
        if ours is None or ours not in expected:
            unexpected.append(name)
            continue
        kind = _type_name(t)
        if kind not in SUPPORTED:
            problems.append(f"{name}: tensor type {kind} is not supported (expected one of {', '.join(SUPPORTED)})")
        shape = [int(d) for d in reversed(list(t.shape))]
        want = list(expected[ours].shape)
        if shape != want:
            problems.append(f"{name}: shape expected {want} (for {ours}), got {shape}")
        found[ours] = t
    if unexpected:
        problems.append("unexpected tensors (not part of a Mixtral model): " + ", ".join(unexpected[:5]))
    missing = [_gguf_name(n) for n in expected if n not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        problems.append("missing tensors: " + ", ".join(missing[:5]) + more)
    return found, problems


def _gguf_name(ours: str) -> str:
    m = re.match(r"layers\.(\d+)\.(.+)\Z", ours)
    for gname, template in NAMES.items():
        if m and template.startswith("layers.{L}.") and template[len("layers.{L}.") :] == m[2]:
            return gname.replace("{L}", m[1])
        if not m and template == ours:
            return gname
    return ours


def _float(t, dtype: torch.dtype) -> torch.Tensor:
    """A tensor dequantised (or read) as ``dtype``, in our shape."""
    from gguf.quants import dequantize

    shape = [int(d) for d in reversed(list(t.shape))]
    kind = _type_name(t)
    if kind == "F32":
        arr = np.array(t.data, dtype=np.float32)  # a copy: the mapping is read-only
    elif kind == "F16":
        arr = np.asarray(t.data).view(np.float16).astype(np.float32)
    else:
        arr = dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(arr).reshape(shape)).to(dtype)


def _q4_0(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 tensor as our int4 buffers: blocks of (float16 d, 16 bytes of nibbles) -> codes
    [..., O, I/2], scale d and offset -8 d [..., O, I/32]; w = (q - 8) d = q d + (-8 d) exactly."""
    shape = [int(d) for d in reversed(list(t.shape))]
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True))
    blocks = raw.reshape(*shape[:-1], shape[-1] // 32, 18)
    scale = blocks[..., :2].contiguous().view(torch.float16)[..., 0].contiguous()
    codes = blocks[..., 2:].reshape(*shape[:-1], shape[-1] // 2).contiguous()
    return codes, scale, (scale * -8).contiguous()


def _rope_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo the converter's permutation of attn_q / attn_k rows (any row-wise tensor)."""
    return interleaved_to_half(x, heads).contiguous()


@torch.no_grad()
def read_gguf(
    path: str | Path, *, dtype: torch.dtype, device: torch.device, quantize: str | None = None, group_size: int = 64
) -> tuple[Mixtral, dict[str, torch.Tensor]]:
    """The model of a Mixtral GGUF file (on the meta device but for its int4 modules) and the
    tensors that fill it (see the module docstring; ``loading.load_model`` puts them in place).
    With ``quantize`` every tensor is dequantised and requantised by that mode as it is read."""

    g = open_gguf(path)
    config = gguf_config(g)
    with torch.device("meta"):
        model = Mixtral(config)
    found, problems = plan(g, model)
    if problems:
        more = (
            f" (and {len(problems) - 3} more; `mixtral-lite info --model {path}` lists them)"
            if len(problems) > 3
            else ""
        )
        raise UserError(f"{g.path}: " + "; ".join(problems[:3]) + more)
    requantize = {}
    if quantize is not None:
        with torch.device("meta"):
            model = structure(Mixtral(config), QuantizationConfig(quantize, group_size, include_output=True), dtype)
        requantize = quantizers(model, list(found))
    int4 = set() if quantize is not None else _int4_modules(model, found)
    rope = {"attention.wq.weight": config.num_attention_heads, "attention.wk.weight": config.num_key_value_heads}
    out: dict[str, torch.Tensor] = {}
    for name, t in found.items():
        module_name, _, leaf = name.rpartition(".")
        heads = rope.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None
        if module_name in int4:
            parts = _q4_0(t)
            if heads is not None:
                parts = tuple(_rope_rows(p, heads) for p in parts)
            suffixes = ("weight", "scale", "offset") if leaf == "weight" else (leaf, f"{leaf}_scale", f"{leaf}_offset")
            for suffix, p in zip(suffixes, parts, strict=True):
                out[f"{module_name}.{suffix}"] = p.to(device)
            continue
        w = _float(t, dtype)
        w = (_rope_rows(w, heads) if heads is not None else w).to(device)
        if name in requantize:
            out.update(requantize[name](w))
        else:
            out[name] = w
        del w
    _swap_int4(model, int4, out)
    if int4:
        model.quantized = "gguf-q4_0"
        model.quantization = {"mode": "gguf-q4_0", "group_size": Q4_0_GROUP, "modules": len(int4)}
    return model, out


def _int4_modules(model: Mixtral, found: dict[str, Any]) -> set[str]:
    """Modules every tensor of which is Q4_0 (linear layers and expert stacks): held as int4."""
    out = set()
    for module_name, m in model.named_modules():
        if isinstance(m, SparseMoE):
            names = [f"{module_name}.{w}" for w in ("w1", "w2", "w3")]
        elif isinstance(m, nn.Linear) and module_name != "" and f"{module_name}.weight" in found:
            if module_name.endswith("gate"):
                continue  # the router stays float: it is tiny and decides the experts
            names = [f"{module_name}.weight"]
        else:
            continue
        if all(n in found and _type_name(found[n]) == "Q4_0" for n in names):
            out.add(module_name)
    return out


def _swap_int4(model: Mixtral, modules: set[str], tensors: dict[str, torch.Tensor]) -> None:
    """Replace the chosen meta modules by int4 ones built around the loaded buffers."""
    for module_name in modules:
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        m = model.get_submodule(module_name)
        if isinstance(m, SparseMoE):
            parts = {
                f"{w}{s}": tensors.pop(f"{module_name}.{w}{s}")
                for w in ("w1", "w2", "w3")
                for s in ("", "_scale", "_offset")
            }
            setattr(parent, child, Int4MoE(m, parts))
        else:
            p = [tensors.pop(f"{module_name}.{s}") for s in ("weight", "scale", "offset")]
            setattr(parent, child, Int4Linear(*p))


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """What ``info`` prints for a GGUF file; weights are never read."""
    g = open_gguf(path)
    config = gguf_config(g)
    with torch.device("meta"):
        model = Mixtral(config)
    _, problems = plan(g, model)
    return {
        "file": str(g.path),
        "layout": "GGUF (llama.cpp)",
        "architecture": g.get("general.architecture"),
        "name": g.get("general.name"),
        "file_type": g.get("general.file_type"),
        "tensors": len(g.tensors),
        "tensor_types": dict(Counter(_type_name(t) for t in g.tensors.values()).most_common()),
        "total_bytes": int(sum(int(t.n_bytes) for t in g.tensors.values())),
        "tokenizer": g.get("tokenizer.ggml.model"),
        "config": config,
        "problems": problems,
    }


__all__ = [
    "NAMES",
    "SUPPORTED",
    "describe_gguf",
    "gguf_config",
    "gguf_tokenizer_proto",
    "is_gguf",
    "read_gguf",
    "open_gguf",
]
