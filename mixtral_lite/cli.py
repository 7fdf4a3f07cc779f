"""The ``mixtral-lite`` command: a thin map from subcommand names to modules.

Each subcommand lives in ``mixtral_lite/commands/<name>.py`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; its module docstring is its ``--help`` text.
Modules are imported only when their subcommand runs, so ``mixtral-lite params`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "generate text from a prompt (streams to stdout)"),
    "chat": ("chat", "interactive chat with an Instruct model"),
    "params": ("params", "count total and active parameters of a model"),
    "info": ("info", "describe a checkpoint folder without loading the weights"),
    "bench": ("bench", "benchmark against transformers on the same weights"),
    "train": ("train", "train a model (any MoE variant) on a text file"),
    "train-tokenizer": ("train_tokenizer", "train a SentencePiece tokenizer on a text file"),
}


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixtral-lite", description="Run, inspect and train Mixtral-style sparse Mixture-of-Experts models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if names is not None and name not in names:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        module = importlib.import_module(f"mixtral_lite.commands.{module_name}")
        p = sub.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = [a for a in argv if a in SUBCOMMANDS][:1]
    parser = build_parser(wanted)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        message = exc.for_flag() if exc.param and hasattr(args, exc.param) else str(exc)
        print(f"mixtral-lite {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
