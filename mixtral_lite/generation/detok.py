"""Incremental detokenisation: text pieces for streaming, one token at a time.

Decoding token by token is wrong in two ways: a character can span several byte-fallback tokens
(``<0xF0><0x9F><0xA6><0x99>`` is one emoji), and SentencePiece drops the leading space of the first
piece it decodes. So we decode a short window of recent tokens and emit only the new characters,
holding them back while the tokens end in byte tokens or the text in an incomplete character
(U+FFFD). Byte tokens are held as a whole run because the ``tokenizers`` library decodes a run that
is not valid UTF-8 as one U+FFFD per byte, valid bytes included: a later byte can change the text
of earlier ones until a normal token ends the run.

The window cannot simply be cut anywhere: its first token would lose its leading space. When the
window grows, we restart it at a recent token behind an *anchor* (the tokens of "a", whose text is
fixed), and only after checking that the split decodes to exactly the same text. The invariant,
tested: the concatenation of all pieces equals ``decode(context + ids)[len(decode(context)):]``,
which is ``decode(ids)`` without context.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

CONTEXT_TOKENS = 8  # prompt tokens kept as context: enough to place the first piece's leading space
MAX_WINDOW = 24  # re-anchor the window when it holds more tokens than this
KEEP = 6  # tokens kept when re-anchoring (room for one multi-byte character: up to 4 byte tokens)
INCOMPLETE = "\ufffd"


class Detokenizer:
    """``push(token) -> new text`` (possibly empty); ``flush() -> rest`` once the tokens end."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        context: Sequence[int] = (),
        anchor: Sequence[int] = (),
        byte_ids: Collection[int] = frozenset(),
    ) -> None:
        """``context``: the tokens before the first pushed one (the prompt), so the first piece keeps
        its leading space; ``anchor``: tokens whose decoded text never changes what follows it
        (``tokenizer.encode("a", bos=False)``), without one the window never restarts; ``byte_ids``:
        the byte-fallback tokens (``tokenizer.byte_ids``)."""
        self._decode = decode
        self._byte_ids = byte_ids
        self._anchor = list(anchor)
        self._anchor_text = decode(self._anchor) if self._anchor else ""
        self._ids = list(context)[-CONTEXT_TOKENS:]  # the window (after the anchor, once anchored)
        self._anchored = False
        self._done = len(self._text())  # characters of the window text already accounted for

    def _text(self) -> str:
        return self._decode(self._anchor + self._ids if self._anchored else self._ids)

    def push(self, token: int) -> str:
        self._ids.append(token)
        if token in self._byte_ids:
            return ""  # wait for the end of the run of bytes
        text = self._text()
        if text.endswith(INCOMPLETE):
            return ""  # wait for the rest of the character
        piece = text[self._done :]
        self._done = max(self._done, len(text))
        if len(self._ids) > MAX_WINDOW and self._anchor_text:
            self._reanchor(text)
        return piece

    def flush(self) -> str:
        """Everything not yet returned, including an incomplete character as U+FFFD."""
        text = self._text()
        piece = text[self._done :]
        self._done = max(self._done, len(text))
        return piece

    def _reanchor(self, text: str) -> None:
        keep = self._ids[-KEEP:]
        left = self._decode(self._anchor + self._ids[:-KEEP] if self._anchored else self._ids[:-KEEP])
        right = self._decode(self._anchor + keep)
        if not right.startswith(self._anchor_text) or left + right[len(self._anchor_text) :] != text:
            return  # a character or a special spacing straddles the split: try again next token
        self._ids, self._anchored, self._done = keep, True, len(right)


def continuation_text(decode: Callable[[Sequence[int]], str], context: Sequence[int], ids: Sequence[int]) -> str:
    """The text ``ids`` add after ``context``: what a ``Detokenizer`` streams, computed in one go."""
    context = list(context)[-CONTEXT_TOKENS:]
    return decode(context + list(ids))[len(decode(context)) :]


class RowText:
    """One row's streamed text: detokenised, cut at the first stop string, and holding back any
    tail that could still become a stop string."""

    def __init__(self, tokenizer: Tokenizer, context: list[int], stops: list[str]) -> None:
        anchor = tokenizer.encode("a", bos=False)
        self.detok = Detokenizer(tokenizer.decode, context, anchor=anchor, byte_ids=tokenizer.byte_ids)
        self.stops = stops
        self.text = ""
        self.emitted = 0  # characters handed out
        self.checked = 0  # characters searched for stop strings
        self.stopped = False
        self.stop_hit: str | None = None  # the stop string found first in the text

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.text += self.detok.push(token)
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest of the text once the row ends (nothing after a stop string)."""
        if self.stopped:
            return ""
        self.text += self.detok.flush()
        return self._emit(final=True)[0]

    def _emit(self, final: bool) -> tuple[str, bool]:
        stopped = False
        if self.stops:
            start = max(0, self.checked - max(map(len, self.stops)) + 1)
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                at, self.stop_hit = min(hits, key=lambda h: h[0])
                self.text, stopped, final = self.text[:at], True, True
                self.stopped = True
            self.checked = len(self.text)
        end = len(self.text) if final else len(self.text) - self._partial_stop()
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece, stopped

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        held = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held


__all__ = ["Detokenizer", "RowText", "continuation_text"]
