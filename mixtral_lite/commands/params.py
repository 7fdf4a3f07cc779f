"""Count total and active (per token) parameters of a model, from its config alone.

Active parameters are those one token's forward pass reads: attention, norms, router, the top-k
routed experts of every layer (plus shared experts and dense layers, if any), and the embedding
table and lm_head counted in full.

Examples:
  mixtral-lite params --preset mixtral-8x7b
  mixtral-lite params --model /data/Mixtral-8x7B-v0.1 --json
  mixtral-lite params --config configs/tiny.json
"""

from __future__ import annotations

import argparse
import json

from ..config import ConfigError, MixtralConfig, available_presets
from ..params import ACTIVE_MEANS, count_parameters

HELP = "count total and active parameters of a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"a preset name: {', '.join(available_presets())}")
    src.add_argument(
        "--config", help="a config file: ours (configs/tiny.json, as for train), Hugging Face or Mistral params.json"
    )
    src.add_argument("--model", help="a model folder (reads its config only)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")


def load_config(args: argparse.Namespace) -> MixtralConfig:
    if args.preset:
        return MixtralConfig.from_preset(args.preset)
    if args.config:
        from .train import read_config_file  # the same files `train --config` takes

        return read_config_file(args.config)[0]
    from ..weights.hub_cache import resolve_model

    return MixtralConfig.from_pretrained(resolve_model(args.model))


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    counts = count_parameters(config)
    if args.json:
        print(json.dumps(counts.as_dict(), indent=2))
        return 0
    print(format_table(counts))
    return 0


def format_table(counts) -> str:
    rows = [("part", "total", "active per token")]
    for name, total in counts.breakdown.items():
        rows.append((name, f"{total:,}", f"{counts.active_breakdown[name]:,}"))
    rows.append(("sum", f"{counts.total:,}", f"{counts.active:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for j, r in enumerate(rows):
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}")
        if j == 0 or j == len(rows) - 2:
            lines.append("-" * (sum(widths) + 4))
    lines.append("")
    lines.append(f"total parameters:  {counts.total:,} ({_short(counts.total)})")
    lines.append(f"active per token:  {counts.active:,} ({_short(counts.active)})")
    lines.append(f"active means: {ACTIVE_MEANS}")
    return "\n".join(lines)


def _short(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


__all__ = ["add_arguments", "run", "ConfigError"]
