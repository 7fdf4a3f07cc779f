"""Benchmark mixtral_lite against transformers on the same random weights (``make bench``).

Writes a table to stdout and the full result to bench_out/bench.json; ``--help`` lists the
options (the same as ``mixtral-lite bench``).
"""

from __future__ import annotations

import argparse
import sys

from mixtral_lite.bench import add_arguments, options_from_args, run_benchmark
from mixtral_lite.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = run_benchmark(options_from_args(args))
    except UserError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    return 0 if result["same_tokens_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
