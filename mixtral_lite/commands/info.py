"""Describe a checkpoint folder without loading the weights.

Reads the config and the tensor headers only, then reports the layout found, the weight files,
their dtypes and total bytes, the model shape, parameter counts, and every problem a load would
stop at (missing or unexpected keys, wrong shapes or dtypes, truncated files, a bad index).
Exits 0 when the folder would load, 1 when problems were found, 2 when it is not a checkpoint.

Examples:
  mixtral-lite info --model /data/Mixtral-8x7B-v0.1
  mixtral-lite info --model ./my-checkpoint --json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..generation.tokenizer import find_tokenizer
from ..model.cache import kv_bytes_per_token
from ..params import count_parameters
from ..weights.checkpoint import INDEX_FILE, open_checkpoint
from ..weights.loading import plan_load

HELP = "describe a checkpoint folder without loading the weights"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="a checkpoint folder (Hugging Face or original Mistral layout) or a GGUF file"
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from ..weights.gguf import is_gguf
    from ..weights.hub_cache import resolve_model

    if is_gguf(args.model):
        report = describe_gguf_file(args.model)
        print(json.dumps(report, indent=2) if args.json else format_gguf_report(report))
        return 1 if report["problems"] else 0
    report = describe(resolve_model(args.model))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["problems"] else 0


def describe_gguf_file(path: str | Path) -> dict[str, Any]:
    """``info`` for a GGUF file: its metadata, tensor types, the model they describe, problems."""
    from ..weights.gguf import describe_gguf

    r = describe_gguf(path)
    config = r.pop("config")
    counts = count_parameters(config)
    r["config"] = {
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "experts": config.num_experts,
        "experts_per_token": config.num_experts_per_tok,
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    r["parameters"] = {"total": counts.total, "active_per_token": counts.active}
    return r


def format_gguf_report(r: dict[str, Any]) -> str:
    c, p = r["config"], r["parameters"]
    types = ", ".join(f"{k} ({v})" for k, v in r["tensor_types"].items()) or "-"
    lines = [
        f"file:        {r['file']}",
        f"layout:      {r['layout']}, architecture {r['architecture']}, name {r['name'] or '-'}",
        f"tensors:     {r['tensors']:,}, types: {types}",
        f"total bytes: {r['total_bytes']:,} ({_size(r['total_bytes'])})",
        f"model:       {c['layers']} layers, hidden {c['hidden_size']}, {c['heads']} heads / {c['kv_heads']} kv heads "
        f"(head_dim {c['head_dim']}), {c['experts']} experts of {c['intermediate_size']}, "
        f"top-{c['experts_per_token']}, vocab {c['vocab_size']}",
        f"             rope_theta {c['rope_theta']:g}, max positions {c['max_position_embeddings']}, "
        f"tied embeddings {c['tie_word_embeddings']}",
        f"parameters:  {p['total']:,} total ({_count(p['total'])}), {p['active_per_token']:,} active per token",
        f"tokenizer:   {r['tokenizer'] or 'none in the metadata'}",
    ]
    return "\n".join(lines + _problem_lines(r["problems"], "file"))


def describe(path: str | Path) -> dict[str, Any]:
    """Everything ``info`` prints, as a dict; weights are never read."""
    with open_checkpoint(path, strict=False) as ckpt:
        config = ckpt.config
        plan = plan_load(ckpt, strict=False).tensors
        if ckpt.layout == "mistral":
            layout = f"original Mistral ({ckpt.files[0].name} + params.json)"
        elif ckpt.index_file is not None:
            layout = f"Hugging Face, sharded ({INDEX_FILE}, {len(ckpt.files)} shards)"
        else:
            layout = "Hugging Face, single file"
        counts = count_parameters(config)
        return {
            "folder": str(ckpt.folder),
            "layout": layout,
            "key_names": plan.naming,
            "config_file": ckpt.config_file.name,
            "model_type": ckpt.model_type,
            "files": [{"name": f.name, "bytes": f.stat().st_size if f.is_file() else None} for f in ckpt.files],
            "tensors": len(ckpt.tensors),
            "dtypes": dict(Counter(t.dtype for t in ckpt.tensors.values()).most_common()),
            "config_dtype": ckpt.config_dtype,
            "total_bytes": ckpt.total_bytes,
            "config": {
                "layers": config.num_hidden_layers,
                "hidden_size": config.hidden_size,
                "intermediate_size": config.intermediate_size,
                "heads": config.num_attention_heads,
                "kv_heads": config.num_key_value_heads,
                "head_dim": config.head_dim,
                "experts": config.num_experts,
                "experts_per_token": config.num_experts_per_tok,
                "router": config.moe.kind,
                "vocab_size": config.vocab_size,
                "rope_theta": config.rope_theta,
                "max_position_embeddings": config.max_position_embeddings,
                "sliding_window": config.sliding_window,
                "tie_word_embeddings": config.tie_word_embeddings,
                "family": config.family,
                "attention": "latent (MLA)" if config.attention.latent else "grouped-query",
                "kv_cache_bytes_per_token_bf16": kv_bytes_per_token(config, torch.bfloat16),
            },
            "parameters": {
                "total": counts.total,
                "active_per_token": counts.active,
                "in_files": sum(_numel(t.shape) for t in ckpt.tensors.values()),
            },
            "tokenizer": tokenizer.name if (tokenizer := find_tokenizer(ckpt.folder)) else None,
            "problems": ckpt.problems + plan.problems,
        }


def format_report(r: dict[str, Any]) -> str:
    c, p = r["config"], r["parameters"]
    lines = [
        f"folder:      {r['folder']}",
        f"layout:      {r['layout']}",
        f"key names:   {', '.join(r['key_names']) or '-'}",
        f"config:      {r['config_file']} (model_type {r['model_type']}, dtype {r['config_dtype'] or '-'})",
        f"files:       {len(r['files'])}",
    ]
    for f in r["files"]:
        size = "MISSING" if f["bytes"] is None else _size(f["bytes"])
        lines.append(f"  {f['name']:<40} {size:>10}")
    dtypes = ", ".join(f"{k} ({v})" for k, v in r["dtypes"].items()) or "-"
    lines += [
        f"tensors:     {r['tensors']:,}, dtypes: {dtypes}",
        f"total bytes: {r['total_bytes']:,} ({_size(r['total_bytes'])})",
        f"model:       {c['layers']} layers, hidden {c['hidden_size']}, {c['heads']} heads / {c['kv_heads']} kv heads "
        f"(head_dim {c['head_dim']}), {c['experts']} experts of {c['intermediate_size']}, top-{c['experts_per_token']} "
        f"({c['router']} routing), vocab {c['vocab_size']}",
        f"             rope_theta {c['rope_theta']:g}, max positions {c['max_position_embeddings']}, "
        f"sliding window {c['sliding_window']}, tied embeddings {c['tie_word_embeddings']}",
        f"             family {c['family']}, {c['attention']} attention, KV cache "
        f"{c['kv_cache_bytes_per_token_bf16']:,} bytes per token (bfloat16)",
        f"parameters:  {p['total']:,} total ({_count(p['total'])}), {p['active_per_token']:,} active per token "
        f"({_count(p['active_per_token'])}); {p['in_files']:,} in the files",
        f"tokenizer:   {r['tokenizer'] or 'none (generate needs tokenizer.model or tokenizer.json in the folder)'}",
    ]
    return "\n".join(lines + _problem_lines(r["problems"], "folder"))


def _problem_lines(problems: list[str], what: str) -> list[str]:
    """The report's last lines: each problem, or that the file or folder loads."""
    if not problems:
        return [f"problems:    none (the {what} loads)"]
    return [f"problems:    {len(problems)}", *(f"  - {msg}" for msg in problems)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _count(n: int) -> str:
    """5.9M, 46.7B: three significant digits at most, in the unit that fits."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


__all__ = ["add_arguments", "run", "describe", "format_report"]
