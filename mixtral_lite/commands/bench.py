"""Benchmark mixtral_lite against transformers' MixtralForCausalLM on the same random weights.

Writes one random checkpoint with transformers (preset ``bench`` by default), loads it into both
models in the same dtype and thread count, checks that both pick the same greedy tokens, then
measures prefill and decode tokens/s, time to first token, peak memory and load time (medians),
our int8 weights, and the batch-1 decode roofline. Prints a table and writes JSON.

Examples:
  mixtral-lite bench
  mixtral-lite bench --quick
  mixtral-lite bench --dtype bfloat16 --threads 2 --out bench_out/bf16.json
"""

from __future__ import annotations

import argparse

from ..bench import add_arguments as _add_arguments
from ..bench import options_from_args, run_benchmark
from ..errors import UserError

HELP = "benchmark against transformers on the same weights"


def add_arguments(p: argparse.ArgumentParser) -> None:
    _add_arguments(p)


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if opts.compare:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError(
                "transformers is not installed: pip install 'mixtral-lite[bench]', or pass --ours-only to time "
                "mixtral_lite alone"
            ) from None
    result = run_benchmark(opts)
    return 0 if result["same_tokens_ok"] else 1
