"""Checks of text and numbers at the edges (argv, stdin, files, the Python API), shared by the CLI
and the library so both give the same clear error."""

from __future__ import annotations

from .errors import UserError

# A prompt larger than this is a mistake (/dev/zero, an endless pipe), not a prompt: 64 MiB is far
# beyond any context window (the largest configs allow 2**24 positions of a few bytes each).
MAX_PROMPT_BYTES = 64 * 2**20


def check_text(text: object, where: str) -> str:
    """``text`` as a str that encodes as UTF-8 (no lone surrogates: argv or stdin bytes that were
    not UTF-8 arrive as surrogate escapes, and the tokenizer would crash on them)."""
    if not isinstance(text, str):
        raise UserError(f"{where}: expected text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(
            f"{where}: not valid UTF-8 text (a lone surrogate or an undecodable byte at character {exc.start})"
        ) from None
    return text


def read_text_bounded(stream, where: str, limit: int = MAX_PROMPT_BYTES) -> str:
    """Read at most ``limit`` bytes of UTF-8 from a binary stream (characters from a text one); more
    is a clear error, not an allocation that grows until memory runs out."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{where}: more than {limit // 2**20} MiB; a prompt is expected, not an endless stream")
    if isinstance(data, str):  # a text stream (a replaced sys.stdin): already decoded
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: cannot read it ({exc})") from None


def check_seed(seed: object, where: str = "--seed") -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UserError(f"{where}: expected an integer in [0, 2**63), got {seed!r:.40}")
    return seed


__all__ = ["check_text", "read_text_bounded", "check_seed", "MAX_PROMPT_BYTES"]
