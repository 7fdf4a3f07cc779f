"""Chat with an Instruct model in the terminal; the conversation is kept between turns.

Type a message and press Enter; the answer streams to stdout. In a terminal the line can be
edited and the arrow keys recall earlier lines (readline). Commands: /help lists them, /reset
starts a new conversation, /exit (or Ctrl-D) quits. Ctrl-C stops the current answer and keeps the
conversation (with the part of the answer already shown). The keys and values of the conversation
so far stay in a cache between turns, so each turn runs only its new tokens. When the conversation
outgrows the model's context, the oldest turns are dropped.

Examples:
  mixtral-lite chat --model /data/Mixtral-8x7B-Instruct-v0.1 --system "Answer briefly."
  mixtral-lite chat --model DIR --temperature 0.7 --top-p 0.9 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..errors import UserError
from .generate import (
    BUNDLED,
    add_model_arguments,
    add_sampling_arguments,
    ensure_utf8,
    load,
    model_folder,
    sampling_options,
)

HELP = "interactive chat with an Instruct model"
COMMANDS = {
    "/help": "list these commands",
    "/reset": "start a new conversation",
    "/exit": "quit (Ctrl-D too)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", help="system prompt")
    add_sampling_arguments(p, max_new_tokens=512, temperature=0.0)
    p.add_argument("--stats", action="store_true", help="print timing to stderr after each answer")


class ChatSession:
    """A conversation: ``ask(text, on_piece)`` streams the answer and remembers both turns."""

    def __init__(self, model, tokenizer, *, system: str | None = None, **options) -> None:
        from ..generation.prompt_cache import PromptCache

        self.model, self.tokenizer, self.system, self.options = model, tokenizer, system, options
        self.turns: list[dict[str, str]] = []
        self.last_result = None
        self.cache = PromptCache()  # the conversation's keys and values, reused by the next turn

    def reset(self) -> None:
        self.turns = []
        self.cache.reset()

    def system_messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def messages(self) -> list[dict[str, str]]:
        return self.system_messages() + self.turns

    def ask(self, text: str, on_piece: Callable[[str], None]) -> str:
        """Answer ``text``. Ctrl-C (KeyboardInterrupt) inside ``on_piece`` or the model stops the
        answer early and keeps what was shown. A ``UserError`` leaves the conversation unchanged."""
        from ..generation.generate import stream

        self.last_result = None
        self.turns.append({"role": "user", "content": text})
        try:
            ids = self._fit(self.tokenizer.encode_chat(self.messages()))
            pieces = stream(self.model, self.tokenizer, ids, **self.options, continuation=False, cache=self.cache)
        except UserError:
            self.turns.pop()
            raise
        except KeyboardInterrupt:
            self.turns.pop()
            return ""
        answer = ""
        try:
            for piece in pieces:
                on_piece(piece)
                answer += piece
            self.last_result = pieces.result
        except KeyboardInterrupt:
            pieces.close()
        if answer:
            self.turns.append({"role": "assistant", "content": answer})
        else:  # no answer to keep: forget the question too, so the roles keep alternating
            self.turns.pop()
        return answer

    def _fit(self, ids: list[int]) -> list[int]:
        """Drop the oldest question/answer pairs until the prompt leaves room in the context; a
        question too long on its own raises ``UserError`` and drops nothing."""
        from ..generation.generate import check_prompt_lengths

        context = self.model.config.max_position_embeddings
        alone = self.tokenizer.encode_chat(self.system_messages() + self.turns[-1:])
        check_prompt_lengths([len(alone)], context)
        while len(ids) >= context:
            del self.turns[:2]
            print("(dropped the oldest turn: the conversation outgrew the context)", file=sys.stderr)
            ids = self.tokenizer.encode_chat(self.messages())
        return ids


def read_line(interactive: bool) -> str:
    """One line of input; raises EOFError at the end (Ctrl-D)."""
    if interactive:
        return input("> ")  # with readline imported: line editing and history
    line = sys.stdin.readline() if sys.stdin is not None else ""  # stdin closed (<&-): as at its end
    if not line:
        raise EOFError
    return line.removesuffix("\n").removesuffix("\r")


def run(args: argparse.Namespace) -> int:
    from ..config import MixtralConfig
    from ..generation.generate import prepare
    from ..generation.tokenizer import load_tokenizer

    options = sampling_options(args)
    folder = model_folder(args)
    tokenizer = load_tokenizer(folder, chat_template=args.chat_template)
    probe = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    prepare(MixtralConfig.from_pretrained(folder), tokenizer, [probe], **options)  # every flag, before loading
    model = load(args, folder)
    ensure_utf8(sys.stdout)
    session = ChatSession(model, tokenizer, system=args.system, **options)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (input() then edits lines and keeps a history)
        except ImportError:  # not on every platform
            pass
        print("Chat: /help lists the commands, /exit or Ctrl-D quits, Ctrl-C stops an answer.", file=sys.stderr)
    if folder == BUNDLED:
        print(
            "(the bundled model is a small demo trained on Shakespeare, not an instruction-tuned model: "
            "expect play-like text rather than answers; pass --model DIR for a real one)",
            file=sys.stderr,
        )

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    while True:
        try:
            line = read_line(interactive)
        except EOFError:
            if interactive:
                print(file=sys.stderr)  # Ctrl-D: end the prompt's line, as a shell does
            break
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
            print(file=sys.stderr)
            continue
        command = line.strip()
        if command == "/exit":
            break
        if command == "/help":
            for name, text in COMMANDS.items():
                print(f"  {name:8s} {text}", file=sys.stderr)
            print("  Ctrl-C   stop the current answer", file=sys.stderr)
            continue
        if command == "/reset":
            session.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if not command:
            continue
        if command.startswith("/") and command[1:].isalpha():
            print(f"unknown command {command}: /help lists the commands", file=sys.stderr)
            continue
        try:
            session.ask(line, show)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        show("\n")
        if session.last_result is None:
            print("(answer stopped)", file=sys.stderr)
        elif args.stats:
            result = session.last_result
            print(f"{result.stats.summary()} | finish: {result.finish_reason}", file=sys.stderr)
    return 0
