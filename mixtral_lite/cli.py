"""The ``mixtral-lite`` command: a thin map from subcommand names to modules.

Each subcommand lives in ``mixtral_lite/commands/<name>.py`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; its module docstring is its ``--help`` text.
Modules are imported only when their subcommand runs, so ``mixtral-lite params`` starts fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from . import __version__
from .errors import RunError, UserError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "generate text from a prompt (streams to stdout)"),
    "chat": ("chat", "interactive chat with an Instruct model"),
    "serve": ("serve", "serve a model over an OpenAI-compatible HTTP API (continuous batching)"),
    "params": ("params", "count total and active parameters of a model"),
    "info": ("info", "describe a checkpoint folder without loading the weights"),
    "bench": ("bench", "benchmark against transformers on the same weights"),
    "eval": ("eval", "perplexity of a text file, and KL divergence against a reference model"),
    "train": ("train", "train a model (any MoE variant) on a text file"),
    "train-tokenizer": ("train_tokenizer", "train a SentencePiece tokenizer on a text file"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default where it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "default" not in text
            and default not in (None, False, [], argparse.SUPPRESS)
            and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            text += " (default: %(default)s)"
        return text


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixtral-lite", description="Run, inspect and train Mixtral-style sparse Mixture-of-Experts models."
    )
    parser.add_argument("--version", action="version", version=f"mixtral-lite {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if names is not None and name not in names:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        module = importlib.import_module(f"mixtral_lite.commands.{module_name}")
        p = sub.add_parser(name, help=help_text, description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand: a user's error is one line and exit 2, Ctrl-C at any point (imports and
    loading too) one line and 130, a closed stdout (``| head``) a quiet exit."""
    for name in ("stdout", "stderr"):  # started with the stream closed (`>&-`): output goes nowhere, quietly
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # lives as long as the process
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("mixtral-lite: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a pipe closed by the reader


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _main(argv: list[str] | None) -> int:
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
    except RunError as exc:
        print(f"mixtral-lite {args.command}: error: {exc}", file=sys.stderr)
        if exc.exit_now:  # a broken process group's threads abort in their destructors at exit
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
        print(f"mixtral-lite {args.command}: error: cannot write: {exc.strerror}", file=sys.stderr)
        return 1
    except ValueError as exc:  # print() to a stdout that was closed under us
        if "closed file" not in str(exc):
            raise
        return 0


if __name__ == "__main__":
    sys.exit(main())
