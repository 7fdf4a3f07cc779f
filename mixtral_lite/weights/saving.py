"""``save_pretrained``: write a model in the Hugging Face layout that transformers loads.

Weights are written with the hub's key names (experts split back one per file key), routing
variants too where the key table has rows for their extra tensors; a variant tensor without a hub
name makes the whole file keep our own parameter names, which the loader maps to themselves for
``model_type: mixtral_lite`` checkpoints. Shards are streamed tensor by tensor, so saving needs no copy of the model.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_folder
from ..errors import UserError
from ..generation.tokenizer import Tokenizer, tokenizer_file
from .checkpoint import DTYPE_NAMES, INDEX_FILE, SAVE_ID_KEY, SINGLE_FILE
from .keymap import hf_items
from .loading import model_tensors
from .quantized import model_quantization_config

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_OLD_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?\Z")


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    max_shard_size: int | str = "5GB",
    *,
    tokenizer: Tokenizer | str | Path | None = None,
    into: Path | None = None,
) -> list[Path]:
    """Write ``config.json`` and the weights (one ``model.safetensors``, or ``model-0000N-of-0000M``
    shards of at most ``max_shard_size`` plus ``model.safetensors.index.json``); returns the files.

    The folder is replaced whole (``mixtral_lite.atomic``): a save killed at any point leaves the
    previous checkpoint complete, and a reader sees the old folder or the new one, never a mix.
    Earlier weight files are not carried over, so no stale shard is left beside the new index;
    other files (a tokenizer, notes) are. ``into``: write into this fresh folder instead, not
    atomically (a caller that switches a larger folder in itself, as training checkpoints do).
    ``tokenizer`` (a loaded tokenizer, its file or its model folder) is copied in too, so the
    folder is one that ``generate --model`` runs; without it the folder has weights only.
    An int8 model (``quantize_model``) is written as it is in memory, int8 buffers and scales under
    our own names (``model_type: mixtral_lite``); ``load_model`` reads it back without quantising.
    """
    source = _tokenizer_files(tokenizer) if tokenizer is not None else []
    config = model.config
    if any(hasattr(m, "num_weight_elements") for m in model.modules()):
        raise UserError("save_pretrained: the model is quantized; save it before quantizing")
    if getattr(model, "offload", None) is not None:
        raise UserError(
            "save_pretrained: the model's experts are offloaded (not in memory); load it without a placement to save it"
        )
    limit = parse_size(max_shard_size)
    tensors, _ = model_tensors(model)  # tied aliases (output.weight) are written once, under the other name
    quantization = model_quantization_config(model)
    if quantization is not None:  # int8/int4 buffers under our own names (``quantized.py``)
        items = list(tensors.items())
    else:
        try:
            if config.family != "mixtral":  # another family: written as our own variant, names as they are
                raise KeyError(config.family)
            items = list(hf_items(tensors))
        except KeyError:  # a variant parameter without a hub name: keep our own names (model_type mixtral_lite)
            if config.is_plain_mixtral:
                raise
            items = list(tensors.items())
    items = [(k, t.detach()) for k, t in items]
    shards = _split(items, limit)
    folder = Path(path)
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    config_data = {**config.to_hf_dict(), "torch_dtype": dtype, "dtype": dtype}
    if quantization is not None:  # transformers must refuse it rather than misread the int4 codes
        config_data.update(model_type="mixtral_lite", architectures=["MixtralLiteForCausalLM"])
        config_data["quantization_config"] = quantization.to_json()
    if into is not None:
        return [into / name for name in write_pretrained_files(into, shards, config_data, source)]
    names = {f.name for f in source}
    with atomic_folder(folder, keep=lambda name: not is_pretrained_file(name) and name not in names) as tmp:
        names = write_pretrained_files(tmp, shards, config_data, source)
    return [folder / name for name in names]


def is_pretrained_file(name: str) -> bool:
    """A file ``save_pretrained`` writes (so a new save does not carry the old one over)."""
    return name == "config.json" or _OLD_FILES.match(name) is not None


def write_pretrained_files(
    folder: Path, shards: list[list[tuple[str, torch.Tensor]]], config: dict, extra: Iterable[Path] = ()
) -> list[str]:
    """The weight files, the index, ``config.json`` and copies of ``extra`` into a fresh folder; every file carries one
    save id, so a reader can tell a folder of one save from files of two."""
    save_id = secrets.token_hex(8)
    meta = {SAVE_ID_KEY: save_id}
    written = []
    if len(shards) == 1:
        write_safetensors(folder / SINGLE_FILE, shards[0], meta)
        written.append(SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / name, shard, meta)
            written.append(name)
            weight_map.update({k: name for k, _ in shard})
        total = sum(t.numel() * t.element_size() for shard in shards for _, t in shard)
        params = sum(t.numel() for shard in shards for _, t in shard)
        index = {"metadata": {"total_size": total, "total_parameters": params, SAVE_ID_KEY: save_id}}
        index["weight_map"] = dict(sorted(weight_map.items()))
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(INDEX_FILE)
    (folder / "config.json").write_text(json.dumps({**config, SAVE_ID_KEY: save_id}, indent=2) + "\n")
    written.append("config.json")
    for file in extra:
        shutil.copyfile(file, folder / file.name)
        written.append(file.name)
    return written


def _tokenizer_files(tokenizer: Tokenizer | str | Path) -> list[Path]:
    """The file(s) to copy for ``tokenizer``: its model file, plus a tokenizer.json's tokenizer_config.json."""
    if isinstance(tokenizer, Tokenizer):
        file = getattr(tokenizer, "path", None)
        if file is None:
            raise TypeError(f"tokenizer: expected a tokenizer loaded from a file, got {type(tokenizer).__name__}")
    elif isinstance(tokenizer, str | Path):
        try:
            file = tokenizer_file(tokenizer)
        except UserError as exc:
            raise UserError(f"tokenizer: {exc}") from None
    else:
        raise TypeError(f"tokenizer: expected a Tokenizer, a file or a folder, got {type(tokenizer).__name__}")
    files = [Path(file)]
    extra = files[0].parent / "tokenizer_config.json"
    if files[0].suffix == ".json" and extra.is_file():
        files.append(extra)
    return files


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (decimal units as transformers)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if m is None:
            raise UserError(f"max_shard_size: expected bytes or a size like '5GB', got {size!r}")
        n = int(float(m[1]) * _UNITS[m[2] or ""])
    if n <= 0:
        raise UserError(f"max_shard_size: must be > 0, got {size!r}")
    return n


def _split(items: list[tuple[str, torch.Tensor]], limit: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Greedy shards in order; a tensor larger than ``limit`` gets a shard of its own."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, t in items:
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, t))
        size += n
    return shards


def write_safetensors(path: Path, items: Iterable[tuple[str, torch.Tensor]], metadata: dict | None = None) -> Path:
    """Write a safetensors file one tensor at a time (each copied to the CPU on its own).

    Format: 8-byte little-endian header length, a JSON header {key: {dtype, shape, data_offsets}}
    padded with spaces to a multiple of 8, then the tensors' bytes back to back.
    """
    items = list(items)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for key, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise UserError(f"{path}: {key}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return path


__all__ = ["save_pretrained", "write_safetensors", "parse_size", "is_pretrained_file"]
